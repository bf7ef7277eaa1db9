"""Why a port cannot be bound, told as one line a user can act on.

The gRPC port is checked before gRPC binds it: gRPC's core logs its own failure to stderr, and the
user should see one line that names the port and the flag that moves it.
"""

from __future__ import annotations

import errno
import socket

from rapidserve.server.errors import RapidServeError

__all__ = ["bare_host", "bind_error", "check_bindable", "host_port"]


def bare_host(host: str) -> str:
    """``host`` without the brackets an IPv6 address takes in an address with a port (``[::]`` -> ``::``)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC and URLs take it: an IPv6 address in brackets, whether or not it came so."""
    bare = bare_host(host)
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def check_bindable(host: str, port: int, what: str, port_flag: str, host_flag: str) -> None:
    """Raise ``RapidServeError`` saying why ``host:port`` cannot be bound, if it cannot (0 always can)."""
    if port == 0:
        return
    problem = _problem(host, port, what, port_flag, host_flag)
    if problem is not None:
        raise RapidServeError(problem)


def bind_error(host: str, port: int, what: str, port_flag: str, host_flag: str) -> RapidServeError:
    """The error for a bind that failed: why, where a fresh try can tell, in one line."""
    problem = _problem(host, port, what, port_flag, host_flag)
    return RapidServeError(problem or f"cannot listen on {host}:{port} for {what}: {_move(port_flag)}")


def _move(port_flag: str) -> str:
    return f"pick another with {port_flag} PORT (0 picks a free one)"


def _problem(host: str, port: int, what: str, port_flag: str, host_flag: str) -> str | None:
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            bare_host(host) or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        return f"the {what} address {host!r} does not resolve ({exc}): fix {host_flag}"
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and the metrics server do
            probe.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"the {what} port {port} is already in use on {host}: {_move(port_flag)}"
        if exc.errno == errno.EACCES:
            return f"the {what} port {port} needs privileges this process lacks: {_move(port_flag)}"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"the {what} address {host} is not one of this machine's: fix {host_flag}"
        return f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc}): {_move(port_flag)}"
    return None
