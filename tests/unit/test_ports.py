"""Hosts as users write them for ``--host``: gRPC takes an IPv6 address in brackets (``[::]``), so the
port check before the bind must take it too, and still name a busy port."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from rapidserve.server.errors import RapidServeError
from rapidserve.server.ports import check_bindable


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6(), reason="needs IPv6 on the loopback interface")


@pytest.fixture
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """An IPv6 wildcard socket bound and listening (the port is busy for '::' and '[::]')."""
    with socket.socket(socket.AF_INET6) as holder:
        holder.bind(("::", 0))
        holder.listen()
        yield holder, int(holder.getsockname()[1])


@needs_ipv6
@pytest.mark.parametrize("host", ["[::]", "::", "[::1]", "0.0.0.0", "127.0.0.1", "localhost"])
def test_a_free_port_on_every_way_of_writing_a_host_passes(host: str) -> None:
    with socket.socket(socket.AF_INET6) as probe:  # a port free on both families, most likely
        probe.bind(("::", 0))
        port = int(probe.getsockname()[1])
    check_bindable(host, port, "gRPC", "--grpc-port", "--host")


@needs_ipv6
@pytest.mark.parametrize("host", ["[::]", "::"])
def test_a_busy_port_behind_a_bracketed_host_is_named(host: str, held_port: tuple[socket.socket, int]) -> None:
    _, port = held_port
    with pytest.raises(RapidServeError, match=f"the gRPC port {port} is already in use"):
        check_bindable(host, port, "gRPC", "--grpc-port", "--host")


@needs_ipv6
@pytest.mark.parametrize("host", ["[::]", "::"])
async def test_the_server_listens_on_an_ipv6_host_written_either_way(host: str, tmp_path) -> None:
    import grpc

    from rapidserve import protos
    from rapidserve.server.app import InferenceServer
    from rapidserve.server.settings import ServerSettings

    server = InferenceServer(
        ServerSettings(model_repositories=(tmp_path,), host=host, grpc_port=0, metrics_port=0, http_port=0)
    )
    try:
        await server.start()
        assert server.port and server.metrics_port
        async with grpc.aio.insecure_channel(f"[::1]:{server.port}") as channel:
            live = channel.unary_unary(
                f"/{protos.SERVICE_NAME}/ServerLive",
                request_serializer=protos.ServerLiveRequest.SerializeToString,
                response_deserializer=protos.ServerLiveResponse.FromString,
            )
            assert (await live(protos.ServerLiveRequest(), timeout=10)).live
    finally:
        await server.stop(0)
