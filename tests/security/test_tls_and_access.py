"""The server side of TLS, mutual TLS, certificate reloads, restricted protocols and listen addresses,
with certificates made at test time and grpcio's own client."""

from __future__ import annotations

import shutil
import signal
import socket
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from certs import Pki, make_pki
from remote import RemoteServer
from standard_services import health_check
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model

from rapidserve import protos
from rapidserve.server.access import parse_restriction, protocol_of
from rapidserve.server.settings import TlsSettings

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tls")
    write_model(repo, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    return repo


def _credentials(pki: Pki, client_cert: bool = True) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        pki.ca.read_bytes(),
        pki.client_key.read_bytes() if client_cert else None,
        pki.client_cert.read_bytes() if client_cert else None,
    )


def _live(channel: grpc.Channel, metadata: tuple = ()) -> bool:
    call = channel.unary_unary(
        protos.method_path("ServerLive"), response_deserializer=protos.ServerLiveResponse.FromString
    )
    return bool(call(protos.ServerLiveRequest().SerializeToString(), timeout=5, metadata=metadata).live)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_tls_serves_tls_clients_and_refuses_plaintext(repo: Path, pki: Pki, serve) -> None:
    server = serve(repo, tls=TlsSettings(pki.server_cert, pki.server_key))
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(pki.ca.read_bytes())) as channel:
        assert _live(channel)
    with grpc.insecure_channel(server.url) as channel:
        assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE
    other = make_pki(pki.ca.parent / "other", "other")  # a client that trusts another CA refuses the server
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(other.ca.read_bytes())) as channel:
        assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_root(repo: Path, pki: Pki, serve) -> None:
    server = serve(repo, tls=TlsSettings(pki.server_cert, pki.server_key, pki.ca, mutual=True))
    with grpc.secure_channel(server.url, _credentials(pki)) as channel:
        assert _live(channel)
    with grpc.secure_channel(server.url, _credentials(pki, client_cert=False)) as channel:
        assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE
    stranger = make_pki(pki.ca.parent / "stranger", "stranger")  # a certificate from another CA
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), stranger.client_key.read_bytes(), stranger.client_cert.read_bytes()
    )
    with grpc.secure_channel(server.url, credentials) as channel:
        assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE


def test_a_reload_serves_new_connections_with_the_new_certificate(repo: Path, tmp_path: Path, serve) -> None:
    old, new = make_pki(tmp_path / "old", "old"), make_pki(tmp_path / "new", "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    server = serve(repo, tls=TlsSettings(cert, key))
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(old.ca.read_bytes())) as channel:
        assert _live(channel)
    key.write_bytes(b"not a key")  # a broken reload keeps the certificates in use
    server.reload_certificates()
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(old.ca.read_bytes())) as channel:
        assert _live(channel)
    shutil.copy(new.server_cert, cert)  # a rotation half done: the new certificate with the old key
    shutil.copy(old.server_key, key)
    server.reload_certificates()
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(old.ca.read_bytes())) as channel:
        assert _live(channel)
    shutil.copy(new.server_cert, cert)
    shutil.copy(new.server_key, key)
    server.reload_certificates()
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(new.ca.read_bytes())) as channel:
        assert _live(channel)
    with grpc.secure_channel(server.url, grpc.ssl_channel_credentials(old.ca.read_bytes())) as channel:
        assert _code(lambda: _live(channel)) == grpc.StatusCode.UNAVAILABLE


def test_sighup_reloads_the_certificates_of_the_running_server(repo: Path, tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old", "old"), make_pki(tmp_path / "new", "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    remote = RemoteServer(
        "--model-repository", str(repo), "--no-metrics", "--grpc-use-ssl", "true",
        "--grpc-server-cert", str(cert), "--grpc-server-key", str(key),
    )  # fmt: skip
    try:
        with grpc.secure_channel(remote.url, grpc.ssl_channel_credentials(old.ca.read_bytes())) as channel:
            assert _live(channel)
        shutil.copy(new.server_cert, cert)
        shutil.copy(new.server_key, key)
        remote.proc.send_signal(signal.SIGHUP)
        remote.wait_for_line("TLS certificates reloaded")
        with grpc.secure_channel(remote.url, grpc.ssl_channel_credentials(new.ca.read_bytes())) as channel:
            assert _live(channel)
    finally:
        assert remote.stop() == 0, remote.log


RESTRICTED = ((("inference", "model-repository"), "admin-key", "s3cret"), (("health",), "probe", "ok"))


def test_restricted_protocols_need_their_header_and_value(repo: Path, serve) -> None:
    server = serve(repo, restricted_protocols=RESTRICTED, model_control_mode="explicit", load_models=("add_sub",))
    admin = (("triton-grpc-protocol-admin-key", "s3cret"),)
    probe = (("triton-grpc-protocol-probe", "ok"),)
    with grpc.insecure_channel(server.url) as channel:

        def call(rpc: str, request: bytes, metadata: tuple = ()) -> grpc.StatusCode:
            return _code(lambda: channel.unary_unary(protos.method_path(rpc))(request, timeout=5, metadata=metadata))

        infer = protos.ModelInferRequest(model_name="add_sub").SerializeToString()
        index = protos.RepositoryIndexRequest().SerializeToString()
        assert call("ModelInfer", infer) == grpc.StatusCode.PERMISSION_DENIED
        assert (
            call("ModelInfer", infer, (("triton-grpc-protocol-admin-key", "s3cre"),))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert call("ModelInfer", infer, probe) == grpc.StatusCode.PERMISSION_DENIED  # another group's header
        assert call("ModelInfer", infer, admin) == grpc.StatusCode.INVALID_ARGUMENT  # let in; the request is empty
        assert call("RepositoryIndex", index) == grpc.StatusCode.PERMISSION_DENIED
        assert call("RepositoryIndex", index, admin) == grpc.StatusCode.OK
        assert _code(lambda: _live(channel)) == grpc.StatusCode.PERMISSION_DENIED
        assert _live(channel, probe)
        check = health_check(channel)
        assert _code(lambda: check(protos.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        serving = protos.HealthCheckResponse.SERVING
        assert check(protos.HealthCheckRequest(), timeout=5, metadata=probe).status == serving
        # protocols without a group stay open
        metadata_request = protos.ServerMetadataRequest().SerializeToString()
        assert call("ServerMetadata", metadata_request) == grpc.StatusCode.OK
        stream = channel.stream_stream(protos.method_path("ModelStreamInfer"))
        assert _code(lambda: list(stream(iter([infer]), timeout=5))) == grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_belongs_to_a_protocol() -> None:
    for method in protos.SERVICE.methods:
        assert protocol_of(protos.method_path(method.name)) is not None, method.name
    assert protocol_of("/grpc.health.v1.Health/Check") == "health"
    assert protocol_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "metadata"


def test_restriction_values_come_from_a_file_and_bad_groups_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("from-a-file\n")
    assert parse_restriction(f"inference,statistics:my-key=@{secret}") == (
        ("inference", "statistics"),
        "my-key",
        "from-a-file",
    )
    for text in ("inference:key", "infer:key=v", ":key=v", "inference:=v", "inference:key="):
        with pytest.raises(ValueError):
            parse_restriction(text)


def test_the_cli_refuses_a_protocol_in_two_groups(repo: Path) -> None:
    with pytest.raises(RuntimeError, match="more than one --grpc-restricted-protocol group"):
        RemoteServer(
            "--model-repository", str(repo), "--no-metrics",
            "--grpc-restricted-protocol", "inference,health:k1=v1", "--grpc-restricted-protocol", "health:k2=v2",
        )  # fmt: skip


def test_metrics_can_listen_on_another_address_than_grpc(repo: Path, serve) -> None:
    server = serve(repo, host="0.0.0.0", metrics_host="127.0.0.1")
    assert server.server._metrics._http.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as reply:
        assert b"rapidserve_" in reply.read()
    outside = _non_loopback_address()
    if outside is not None:  # reachable over gRPC, not over /metrics
        with grpc.insecure_channel(f"{outside}:{server.server.port}") as channel:
            assert _live(channel)
        with pytest.raises(OSError):
            socket.create_connection((outside, server.server.metrics_port), timeout=5).close()


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_flag_replaces_its_environment_variable_instead_of_adding_to_it(tmp_path: Path, monkeypatch) -> None:
    from rapidserve import cli

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("RAPIDSERVE_MODEL_REPOSITORY", str(first))
    monkeypatch.setenv("RAPIDSERVE_LOAD_MODEL", "x,y")
    args = cli._parser().parse_args(["serve", "--model-repository", str(second), "--load-model", "z"])
    settings, _ = cli._settings(args)
    assert settings.model_repositories == (second,)
    assert settings.load_models == ("z",)
    settings, _ = cli._settings(cli._parser().parse_args(["serve"]))
    assert settings.model_repositories == (first,) and settings.load_models == ("x", "y")


def test_limits_gRPC_cannot_hold_are_refused_at_start(repo: Path) -> None:
    with pytest.raises(RuntimeError, match="--grpc-max-message-bytes must be between 1 and 2147483647"):
        RemoteServer("--model-repository", str(repo), "--grpc-max-message-bytes", "3GiB")


def test_restriction_groups_come_from_the_environment_separated_by_semicolons(repo: Path, tmp_path: Path) -> None:
    """The value the docs give: several groups, protocols separated by commas, a value read from a file."""
    secret = tmp_path / "admin-key"
    secret.write_text("s3cret\n")
    env = {"RAPIDSERVE_GRPC_RESTRICTED_PROTOCOL": f"model-repository,statistics:admin-key=@{secret}; inference:k=v"}
    remote = RemoteServer("--model-repository", str(repo), "--no-metrics", env=env)
    try:
        with grpc.insecure_channel(remote.url) as channel:

            def call(rpc: str, request: bytes, metadata: tuple = ()) -> grpc.StatusCode:
                return _code(
                    lambda: channel.unary_unary(protos.method_path(rpc))(request, timeout=10, metadata=metadata)
                )

            ready = channel.unary_unary(
                protos.method_path("ServerReady"), response_deserializer=protos.ServerReadyResponse.FromString
            )
            while not ready(protos.ServerReadyRequest().SerializeToString(), timeout=10).ready:
                time.sleep(0.05)
            index = protos.RepositoryIndexRequest().SerializeToString()
            statistics = protos.ModelStatisticsRequest().SerializeToString()
            infer = protos.ModelInferRequest(model_name="add_sub").SerializeToString()
            assert call("RepositoryIndex", index) == grpc.StatusCode.PERMISSION_DENIED
            assert call("RepositoryIndex", index, (("triton-grpc-protocol-admin-key", "s3cret"),)) == grpc.StatusCode.OK
            assert call("ModelStatistics", statistics) == grpc.StatusCode.PERMISSION_DENIED
            assert call("ModelInfer", infer) == grpc.StatusCode.PERMISSION_DENIED
            assert call("ModelInfer", infer, (("triton-grpc-protocol-k", "v"),)) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert remote.stop() == 0, remote.log


@pytest.mark.parametrize("hidden_by", ["metadata", "model-repository"])
def test_an_unknown_model_lists_no_loaded_models_when_their_names_are_restricted(
    repo: Path, serve, hidden_by: str
) -> None:
    """The loaded models' names are what the restricted RepositoryIndex and metadata calls tell: an
    inference caller without their key learns none of them from a NOT_FOUND."""
    restricted = (((hidden_by,), "admin-key", "s3cret"),)
    open_server = serve(repo, model_control_mode="explicit", load_models=("add_sub",))
    closed_server = serve(
        repo, restricted_protocols=restricted, model_control_mode="explicit", load_models=("add_sub",)
    )
    infer = protos.ModelInferRequest(model_name="nope").SerializeToString()
    details = {}
    for name, server in (("open", open_server), ("closed", closed_server)):
        with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(protos.method_path("ModelInfer"))(infer, timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        details[name] = info.value.details()
    assert "add_sub" in details["open"], details
    assert "add_sub" not in details["closed"] and "unknown model 'nope'" in details["closed"], details
