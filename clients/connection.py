"""How rapidserve's clients and commands reach a server: TLS (tritonclient's option names) and headers
sent with every call. Checked once, when a client or connection is made, so a mistake is a clear
``ValueError`` there rather than a failed handshake or a refused call later. Error messages name a
header, never its value: headers carry secrets (``triton-grpc-protocol-<key>``)."""

from __future__ import annotations

import argparse
import re
import ssl as _ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "Headers",
    "Tls",
    "add_arguments",
    "channel",
    "check_headers",
    "client_options",
    "hint",
    "http_ssl_context",
    "parse_header",
    "servers",
    "ssl_context",
    "tls",
]

Headers = tuple[tuple[str, str], ...]
_NAME = re.compile(r"[0-9a-z_.-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")  # gRPC's rule for text metadata: printable ASCII
# set by the gRPC/HTTP/2 layer itself; a second copy would make the request malformed
_RESERVED = {"content-type", "te", "user-agent", "host", "connection", "keep-alive", "transfer-encoding", "upgrade"}


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS towards the server: the CA to verify its certificate with (None: the system's CAs), a client
    certificate and key for mutual TLS, and the name the server's certificate must carry when that is
    not the host in the URL (an address, or a name the certificate was not made for)."""

    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None
    target_name: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain (PEM files)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            _pem(self.root_certificates, "root_certificates"),
            _pem(self.private_key, "private_key"),
            _pem(self.certificate_chain, "certificate_chain"),
        )

    def ssl_context(self) -> _ssl.SSLContext:
        """For the bench's HTTP/2 client, ``rapidserve.clients._h2grpc`` (ALPN h2)."""
        return ssl_context(self.root_certificates, self.private_key, self.certificate_chain)


def http_ssl_context(tls: Tls) -> _ssl.SSLContext:
    """The same verification and client certificate for the HTTP/1.1 clients of ``https://`` URLs."""
    return ssl_context(tls.root_certificates, tls.private_key, tls.certificate_chain, alpn=("http/1.1",))


def ssl_context(
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    certificate_chain: str | Path | None = None,
    alpn: tuple[str, ...] = ("h2",),
) -> _ssl.SSLContext:
    """A client TLS context for the bench's HTTP/2 connections (``rapidserve.clients._h2grpc``): verifies the
    server against ``root_certificates`` (a PEM file; None: the system's CAs), presents ``certificate_chain``
    and ``private_key`` (PEM files) for mutual TLS, and offers ALPN ``h2``, which gRPC servers require."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both private_key and certificate_chain (PEM files)")
    try:
        context = _ssl.create_default_context(cafile=root_certificates)
    except _ssl.SSLError as exc:
        raise ValueError(f"root_certificates {root_certificates} holds no usable PEM certificate ({exc})") from None
    if certificate_chain is not None:
        try:
            context.load_cert_chain(certificate_chain, private_key)
        except _ssl.SSLError as exc:
            raise ValueError(f"certificate_chain {certificate_chain} and private_key {private_key} are not a PEM "
                             f"certificate and its key ({exc})") from None  # fmt: skip
    context.set_alpn_protocols(list(alpn))
    return context


def tls(
    ssl: bool = False,
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    certificate_chain: str | Path | None = None,
    ssl_target_name: str | None = None,
) -> Tls | None:
    """The TLS settings of tritonclient-style arguments; None for plaintext."""
    options = {"root_certificates": root_certificates, "private_key": private_key,
               "certificate_chain": certificate_chain, "ssl_target_name": ssl_target_name}  # fmt: skip
    given = [name for name, value in options.items() if value]
    if not ssl:
        if given:
            raise ValueError(f"{', '.join(given)} only apply to TLS: pass ssl=True")
        return None

    def path(value: str | Path | None) -> Path | None:
        return Path(value) if value else None

    return Tls(path(root_certificates), path(private_key), path(certificate_chain), ssl_target_name or None)


def _pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def hint(details: str, tls: Tls | None) -> str:
    """What to check when gRPC reports only that the server closed the connection during its
    handshake: TLS on one side only, or a client certificate that mutual TLS asks for."""
    if "Socket closed" not in details:
        return ""
    if tls is None:
        return " (does the server expect TLS?)"
    return " (does the server require a client certificate?)" if tls.certificate_chain is None else ""


def check_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> Headers:
    """Headers as gRPC metadata pairs: names lower-cased, both checked against what gRPC accepts."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
    checked = []
    for name, value in pairs:
        key = str(name).strip().lower()
        if not _NAME.fullmatch(key):
            raise ValueError(f"header name {name!r} must be letters, digits, '-', '_' or '.'")
        if key.startswith("grpc-") or key in _RESERVED:
            raise ValueError(f"header '{key}' is set by gRPC itself")
        if key.endswith("-bin"):
            raise ValueError(f"header '{key}': binary (-bin) headers are not supported, only text")
        if not isinstance(value, str) or not _VALUE.fullmatch(value):
            raise ValueError(f"the value of header '{key}' must be printable ASCII text")
        checked.append((key, value))
    return tuple(checked)


def servers(url: str | Sequence[str]) -> list[str]:
    """The servers a client calls in turn: ``url`` is one, several separated by commas, or a list.
    Several must be gRPC addresses (HOST:PORT): the HTTP clients speak to one server."""
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else [u.strip() for u in url]
    if not urls or not all(urls):
        raise ValueError(f"an empty server address in {url!r}")
    if len(urls) > 1 and any(u.startswith(("http://", "https://")) for u in urls):
        raise ValueError(f"several servers ({', '.join(urls)}): gRPC addresses (HOST:PORT) only")
    return urls


def channel(url: str, tls: Tls | None, options: list[tuple[str, Any]], *, aio: bool = False) -> Any:
    """A gRPC channel (``grpc.aio`` with ``aio``), over TLS when ``tls`` is given."""
    module: Any = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(url, options=options)
    if tls.target_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.target_name)]
    return module.secure_channel(url, tls.credentials(), options=options)


# ---- the commands' options (rapidserve infer, health, bench)


def parse_header(text: str) -> tuple[str, str]:
    """``NAME: VALUE`` or ``NAME=VALUE`` (split at whichever comes first); a value ``@FILE`` is read from
    FILE (trailing newline stripped), so that a secret never shows in a process listing."""
    colon, equals = text.find(":"), text.find("=")
    cut = min(i for i in (colon, equals, len(text)) if i >= 0)
    name, value = text[:cut].strip(), text[cut + 1 :].strip()
    if cut == len(text) or not name:
        raise ValueError("--header expects 'NAME: VALUE' or NAME=VALUE")  # (not echoed: it may hold a secret)
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the value of header '{name}' from {value[1:]}: {exc}") from None
    return check_headers([(name, value)])[0]


def add_arguments(
    parser: argparse.ArgumentParser, env: Callable[..., Any] | None = None, ssl_default: Any = False
) -> None:
    """The TLS and header options; ``env(name, default, many=False)`` supplies defaults from the
    environment (the ``RAPIDSERVE_*`` variables of ``rapidserve.cli``), and ``ssl_default`` the value of
    ``--ssl`` when it is not given (the CLI's checked ``RAPIDSERVE_SSL``)."""

    def default(name: str, value: Any = None, many: bool = False) -> Any:
        return env(name, value, many=many) if env is not None else value

    group = parser.add_argument_group("TLS and headers")
    group.add_argument(
        "--ssl",
        action="store_true",
        default=ssl_default,
        help="connect over TLS (implied by the three certificate options and --ssl-target-name)",
    )
    group.add_argument("--root-certificates", default=default("root-certificates"), metavar="PEM",
                       help="CA to verify the server's certificate with (default: the system's)")  # fmt: skip
    group.add_argument("--private-key", default=default("private-key"), metavar="PEM",
                       help="client key, for mutual TLS (with --certificate-chain)")  # fmt: skip
    group.add_argument("--certificate-chain", default=default("certificate-chain"), metavar="PEM",
                       help="client certificate chain, for mutual TLS (with --private-key)")  # fmt: skip
    group.add_argument("--ssl-target-name", default=default("ssl-target-name"), metavar="NAME",
                       help="the name the server's certificate must carry, when not the URL's host")  # fmt: skip
    group.add_argument(
        "-H",
        "--header",
        action="append",
        default=None,
        metavar="'NAME: VALUE'",
        help="a header sent with every call, e.g. 'triton-grpc-protocol-KEY: VALUE' (repeatable; NAME=VALUE "
        "works too; VALUE @FILE reads it from FILE)",
    )
    parser.set_defaults(header_env=default("header", [], many=True))  # used only when no -H is given


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Client``/``AsyncClient`` keyword arguments from the parsed options; ValueError says what is wrong."""
    files = (args.root_certificates, args.private_key, args.certificate_chain, args.ssl_target_name)
    headers = args.header if args.header is not None else getattr(args, "header_env", [])
    return {
        "ssl": bool(args.ssl or any(files)),
        "root_certificates": args.root_certificates,
        "private_key": args.private_key,
        "certificate_chain": args.certificate_chain,
        "ssl_target_name": args.ssl_target_name,
        "headers": dict(parse_header(h) for h in headers),
    }
