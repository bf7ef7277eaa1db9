"""rapidserve's own clients against a real TLS server: ``Client``, ``AsyncClient`` (stream and unary),
the bench's HTTP/2 client (unary and stream), ``rapidserve infer``, ``rapidserve health`` and
``rapidserve bench``. Each works over TLS and mutual TLS; each fails UNAVAILABLE, fast, when TLS is
on one side only, when the server's certificate does not verify, or when mutual TLS lacks a trusted
client certificate; each sends the headers a restricted protocol asks for. Bad options are refused
before anything is sent, without echoing a header's value (it may be a secret)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from certs import Pki, make_pki
from testmodels import ADD_SUB_CONFIG, add_sub_graph, write_model

from rapidserve import protos
from rapidserve.cli import main
from rapidserve.clients import AsyncClient, Client, InferenceServerError
from rapidserve.clients._h2grpc import Connection, ssl_context
from rapidserve.clients.connection import parse_header, tls
from rapidserve.common import codec
from rapidserve.server.settings import TlsSettings

pytestmark = [pytest.mark.timeout(60), pytest.mark.frontends(1, 2)]
A = np.arange(16, dtype=np.float32).reshape(1, 16)
B = np.full((1, 16), 0.5, dtype=np.float32)
SUM = A + B
KEY, SECRET = "triton-grpc-protocol-key", "s3cret-value"
OK = "OK"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tls-repo")
    write_model(repo, "add_sub", add_sub_graph(), ADD_SUB_CONFIG)
    return repo


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates of an unrelated CA: the server must not trust its client certificate, nor the
    client a server certificate it signed."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), "b")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    np.save(folder / "a.npy", A)
    np.save(folder / "b.npy", B)
    return ["--input", f"INPUT0={folder / 'a.npy'}", "--input", f"INPUT1={folder / 'b.npy'}", "--output", "OUTPUT0"]


def server_tls(pki: Pki, mutual: bool = False) -> TlsSettings:
    return TlsSettings(pki.server_cert, pki.server_key, pki.ca if mutual else None, mutual)


def trusting(pki: Pki, client_pki: Pki | None = None, **more: Any) -> dict[str, Any]:
    """Client options that verify the server with ``pki``'s CA (and present ``client_pki``'s client
    certificate)."""
    options: dict[str, Any] = {"ssl": True, "root_certificates": pki.ca, **more}
    if client_pki is not None:
        options.update(private_key=client_pki.client_key, certificate_chain=client_pki.client_cert)
    return options


def cli_flags(options: dict[str, Any]) -> list[str]:
    flags = ["--ssl"] if options.get("ssl") else []
    for name in ("root_certificates", "private_key", "certificate_chain", "ssl_target_name"):
        if options.get(name) is not None:
            flags += ["--" + name.replace("_", "-"), str(options[name])]
    for key, value in (options.get("headers") or {}).items():
        flags += ["-H", f"{key}: {value}"]
    return flags


# ---- one call from each client: "OK" (its answer checked) or the status code's name, and the message


def _grpc_client(url: str, options: dict[str, Any]) -> tuple[str, str]:
    try:
        with Client(url, timeout_s=5, **options) as client:
            got = client.infer("add_sub", {"INPUT0": A, "INPUT1": B})
    except InferenceServerError as exc:
        return exc.code.name, exc.message
    np.testing.assert_array_equal(got["OUTPUT0"], SUM)
    return OK, ""


async def _async_client(url: str, options: dict[str, Any], streaming: bool) -> tuple[str, str]:
    try:
        async with AsyncClient(url, timeout_s=5, streaming=streaming, **options) as client:
            got = await client.infer("add_sub", {"INPUT0": A, "INPUT1": B})
    except InferenceServerError as exc:
        return exc.code.name, exc.message
    np.testing.assert_array_equal(got["OUTPUT0"], SUM)
    return OK, ""


async def _h2(url: str, options: dict[str, Any], streaming: bool) -> tuple[str, str]:
    security = tls(**{k: v for k, v in options.items() if k != "headers"})
    context = security.ssl_context() if security is not None else None
    try:
        connection = await Connection.open(url, 5, ssl=context, server_hostname=security and security.target_name,
                                           headers=options.get("headers"))  # fmt: skip
    except TimeoutError:  # (an OSError too: caught first, so that a hang never passes for a refusal)
        return "TIMEOUT", ""
    except OSError as exc:  # open raises where grpcio's calls end UNAVAILABLE
        return "UNAVAILABLE", f"{type(exc).__name__}: {exc}"
    request = codec.encode_request("add_sub", {"INPUT0": A, "INPUT1": B}, request_id="7")
    try:
        if not streaming:
            reply = await connection.unary(protos.method_path("ModelInfer"), request.SerializeToString(), 5)
            if reply.code.name != OK:
                return reply.code.name, reply.message
            answer = protos.ModelInferResponse.FromString(reply.response or b"")
        else:
            answers: asyncio.Queue[bytes] = asyncio.Queue()
            stream = await connection.stream(protos.method_path("ModelStreamInfer"), answers.put_nowait, 5)
            stream.write(request.SerializeToString())
            got = asyncio.ensure_future(answers.get())
            await asyncio.wait([got, stream.status], return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                status = stream.status.result()
                return status.code.name, status.message
            wrapped = protos.ModelStreamInferResponse.FromString(got.result())
            assert wrapped.error_message == "" and wrapped.infer_response.id == "7"
            stream.end()
            answer = wrapped.infer_response
    finally:
        connection.close()
        await connection.wait_closed()
    np.testing.assert_array_equal(codec.decode_response(answer)["OUTPUT0"], SUM)
    return OK, ""


def _cli_infer(url: str, options: dict[str, Any], inputs: list[str], capsys: Any) -> tuple[str, str]:
    code = main(["infer", "add_sub", "--url", url, "--timeout-s", "5", *inputs, *cli_flags(options)])
    out, err = capsys.readouterr()
    if code != 0:
        status = re.search(r"\[(\w+)\] (.*)", err)
        return (status.group(1), status.group(2)) if status else (f"exit {code}", err)
    header, body = out.split("\n", 1)
    assert header == "OUTPUT0 float32 [1, 16]"
    np.testing.assert_allclose(np.array(re.findall(r"-?\d+\.?\d*", body), np.float32), SUM[0], atol=1e-4)
    return OK, ""


def _cli_health(url: str, options: dict[str, Any], capsys: Any) -> tuple[str, str]:
    code = main(["health", "--url", url, "--timeout-s", "5", *cli_flags(options)])
    out, err = capsys.readouterr()
    if code == 0:
        assert out.strip() == "SERVING"
        return OK, ""
    status = re.search(r"unhealthy: (\w+): (.*)", err)
    return (status.group(1), status.group(2)) if status else (f"exit {code}", err)


def outcomes(server: Any, inputs: list[str], capsys: Any, url: str = "", **options: Any) -> dict[str, tuple[str, str]]:
    """Each client's outcome of one call to ``server`` (or to ``url``) with the same options. The
    asyncio clients run on the server's event loop: grpc.aio objects must share one loop per process."""
    url = url or server.url
    return {
        "Client": _grpc_client(url, options),
        "AsyncClient stream": server.run(_async_client(url, options, True)),
        "AsyncClient unary": server.run(_async_client(url, options, False)),
        "h2grpc unary": server.run(_h2(url, options, False)),
        "h2grpc stream": server.run(_h2(url, options, True)),
        "rapidserve infer": _cli_infer(url, options, inputs, capsys),
        "rapidserve health": _cli_health(url, options, capsys),
    }


def codes(results: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {client: code for client, (code, _) in results.items()}


def all_are(code: str, results: dict[str, tuple[str, str]]) -> bool:
    return set(codes(results).values()) == {code}


# ---- the tests


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_every_client_works_over_tls(serve: Callable[..., Any], repo: Path, pki: Pki, inputs: list[str],
                                     capsys: Any, mutual: bool) -> None:  # fmt: skip
    server = serve(repo, tls=server_tls(pki, mutual))
    results = outcomes(server, inputs, capsys, **trusting(pki, pki if mutual else None))
    assert all_are(OK, results), results
    # the certificate names localhost and 127.0.0.1: either works as the URL's host or as the target name
    by_name = outcomes(server, inputs, capsys, url=server.url.replace("127.0.0.1", "localhost"),
                       **trusting(pki, pki if mutual else None, ssl_target_name="localhost"))  # fmt: skip
    assert all_are(OK, by_name), by_name


def test_mutual_tls_refuses_a_client_without_a_trusted_certificate(
    serve: Callable[..., Any], repo: Path, pki: Pki, other_pki: Pki, inputs: list[str], capsys: Any
) -> None:
    server = serve(repo, tls=server_tls(pki, mutual=True))
    missing = outcomes(server, inputs, capsys, **trusting(pki))
    assert all_are("UNAVAILABLE", missing), missing
    assert all("client certificate" in message for _, message in missing.values()), missing  # what to check
    untrusted = outcomes(server, inputs, capsys, **trusting(pki, other_pki))  # signed by another CA
    assert all_are("UNAVAILABLE", untrusted), untrusted


def test_tls_on_one_side_only_fails_unavailable(
    serve: Callable[..., Any], repo: Path, pki: Pki, inputs: list[str], capsys: Any
) -> None:
    tls_server, plain_server = serve(repo, tls=server_tls(pki)), serve(repo)
    plaintext = outcomes(tls_server, inputs, capsys)
    assert all_are("UNAVAILABLE", plaintext), plaintext
    assert all("expect TLS" in message for _, message in plaintext.values()), plaintext
    to_plain = outcomes(plain_server, inputs, capsys, **trusting(pki))
    assert all_are("UNAVAILABLE", to_plain), to_plain
    assert all_are(OK, outcomes(plain_server, inputs, capsys))  # (the same calls work in plaintext)


def test_the_servers_certificate_is_verified(
    serve: Callable[..., Any], repo: Path, pki: Pki, other_pki: Pki, inputs: list[str], capsys: Any
) -> None:
    server = serve(repo, tls=server_tls(pki))
    other_ca = outcomes(server, inputs, capsys, **trusting(other_pki))
    assert all_are("UNAVAILABLE", other_ca), other_ca
    assert all("verif" in message.lower() for _, message in other_ca.values()), other_ca
    wrong_name = outcomes(server, inputs, capsys, **trusting(pki, ssl_target_name="not-the-server.example"))
    assert all_are("UNAVAILABLE", wrong_name), wrong_name  # the target name replaced the URL's host


def test_restricted_protocols_need_the_header_from_every_client(
    serve: Callable[..., Any], repo: Path, pki: Pki, inputs: list[str], capsys: Any
) -> None:
    restricted = ((("inference", "health", "metadata"), "key", SECRET),)
    server = serve(repo, tls=server_tls(pki, mutual=True), restricted_protocols=restricted)
    options = trusting(pki, pki)
    without = outcomes(server, inputs, capsys, **options)
    assert all_are("PERMISSION_DENIED", without), codes(without)
    wrong = outcomes(server, inputs, capsys, **options, headers={KEY: SECRET + "x"})
    assert all_are("PERMISSION_DENIED", wrong), codes(wrong)
    right = outcomes(server, inputs, capsys, **options, headers={KEY.upper(): SECRET, "x-request-tag": "a b"})
    assert all_are(OK, right), right


def test_a_stream_refused_at_once_reports_the_servers_status(serve: Callable[..., Any], repo: Path) -> None:
    """A server that ends a stream at once (no access key) races with the client's first write, and
    grpc.aio then reports INTERNAL 'Internal error from Core' instead of the server's status (a few in
    a hundred here): the client asks once more, unary, to learn the real one."""
    server = serve(repo, restricted_protocols=((("inference",), "key", SECRET),))

    async def refusals() -> dict[str, int]:
        seen: dict[str, int] = {}
        for _ in range(150):
            try:
                async with AsyncClient(server.url, timeout_s=5, streaming=True) as client:
                    await client.infer("add_sub", {"INPUT0": A, "INPUT1": B})
            except InferenceServerError as exc:
                seen[exc.code.name] = seen.get(exc.code.name, 0) + 1
        return seen

    assert server.run(refusals()) == {"PERMISSION_DENIED": 150}


def test_the_commands_take_header_forms_and_the_environment(
    serve: Callable[..., Any], repo: Path, pki: Pki, inputs: list[str], capsys: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    restricted = ((("inference", "health"), "key", SECRET),)
    server = serve(repo, tls=server_tls(pki, mutual=True), restricted_protocols=restricted)
    tls_flags = cli_flags(trusting(pki, pki))
    (tmp_path / "secret").write_text(SECRET + "\n")
    for header in (f"{KEY}={SECRET}", f"{KEY}: @{tmp_path / 'secret'}"):
        assert main(["infer", "add_sub", "--url", server.url, *inputs, *tls_flags, "-H", header]) == 0
        assert main(["health", "--url", server.url, *tls_flags, "--header", header]) == 0
    # a container's health check: everything from RAPIDSERVE_* variables; the certificate options imply TLS
    monkeypatch.setenv("RAPIDSERVE_URL", server.url)
    monkeypatch.setenv("RAPIDSERVE_ROOT_CERTIFICATES", str(pki.ca))
    monkeypatch.setenv("RAPIDSERVE_PRIVATE_KEY", str(pki.client_key))
    monkeypatch.setenv("RAPIDSERVE_CERTIFICATE_CHAIN", str(pki.client_cert))
    monkeypatch.setenv("RAPIDSERVE_HEADER", f"{KEY}: {SECRET}")
    capsys.readouterr()
    assert main(["health"]) == 0 and capsys.readouterr().out.strip() == "SERVING"
    # a flag given on the command line replaces the variable, never adds to it
    assert main(["health", "-H", f"{KEY}: wrong"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err


FAST = ["--measurement-interval", "150", "--warmup-s", "0.1", "--stability-percentage", "1000", "--max-trials", "3",
        "--quiet", "--concurrency", "2"]  # fmt: skip


def test_bench_over_mutual_tls_with_headers(
    serve: Callable[..., Any], repo: Path, pki: Pki, tmp_path: Path, capsys: Any
) -> None:
    server = serve(repo, tls=server_tls(pki, mutual=True), restricted_protocols=((("inference",), "key", SECRET),))
    tls_flags = cli_flags(trusting(pki, pki))
    out = tmp_path / "bench.json"
    for streaming in ([], ["--streaming"]):
        assert main(["bench", "add_sub", "--url", server.url, *tls_flags, "-H", f"{KEY}: {SECRET}", *FAST,
                     *streaming, "--out", str(out)]) == 0  # fmt: skip
        (row,) = json.loads(out.read_text())
        assert row["errors"] == {} and row["requests_per_s"] > 0, row
        assert row["server_avg_batch"] >= 1  # the statistics came through the same TLS options
        # without the header: metadata is open, every inference is refused (and counted so)
        assert main(["bench", "add_sub", "--url", server.url, *tls_flags, *FAST, *streaming, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())
        assert set(row["errors"]) == {"PERMISSION_DENIED"} and row["requests_per_s"] == 0, row
    capsys.readouterr()
    assert main(["bench", "add_sub", "--url", server.url, *FAST]) == 2  # plaintext against TLS
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["bench", "add_sub", "--url", server.url, *cli_flags(trusting(pki)), *FAST]) == 2  # no client cert
    assert "UNAVAILABLE" in capsys.readouterr().err


# ---- bad options: refused where they are given, the value of a header never echoed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"root_certificates": "ca.pem"}, "only apply to TLS: pass ssl=True"),
        ({"ssl_target_name": "name"}, "only apply to TLS"),
        ({"ssl": True, "private_key": "key.pem"}, "needs both private_key and certificate_chain"),
        ({"headers": {"Bad Name": "v"}}, "header name 'Bad Name'"),
        ({"headers": {"grpc-timeout": "1S"}}, "set by gRPC itself"),
        ({"headers": {"content-type": "text/plain"}}, "set by gRPC itself"),
        ({"headers": {"token-bin": "v"}}, "binary (-bin) headers are not supported"),
        ({"headers": {"x-token": SECRET + "\r\ninjected: 1"}}, "'x-token' must be printable ASCII"),
        ({"headers": {"x-token": SECRET + "é"}}, "'x-token' must be printable ASCII"),
    ],
)
def test_bad_client_options_are_refused_before_any_call(options: dict[str, Any], message: str) -> None:
    for make in (Client, AsyncClient):
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            make("127.0.0.1:1", **options)
        assert SECRET not in str(caught.value)


def test_certificate_files_are_checked_when_the_client_is_made(tmp_path: Path, pki: Pki) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(ValueError, match=r"root_certificates .*ca\.der is not a PEM file"):
        Client("127.0.0.1:1", ssl=True, root_certificates=not_pem)
    with pytest.raises(FileNotFoundError):
        Client("127.0.0.1:1", ssl=True, root_certificates=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="no usable PEM certificate"):
        ssl_context(not_pem)
    with pytest.raises(ValueError, match="are not a PEM certificate and its key"):
        ssl_context(pki.ca, private_key=pki.server_key, certificate_chain=pki.client_cert)  # a key of another

    async def open_with(**options: Any) -> None:
        await Connection.open("127.0.0.1:1", **options)

    with pytest.raises(ValueError, match="server_hostname applies to TLS only"):
        asyncio.run(open_with(server_hostname="localhost"))
    with pytest.raises(ValueError, match="'x-token' must be printable ASCII"):
        asyncio.run(open_with(headers={"x-token": "a\nb"}))


def test_the_commands_refuse_bad_options_clearly(tmp_path: Path, pki: Pki, capsys: Any) -> None:
    url = ["--url", "127.0.0.1:1"]
    for header in (SECRET, f": {SECRET}", f"x-token: {SECRET}\x7f"):
        assert main(["health", *url, "-H", header]) == 1  # (2 means "reserved" to a container health check)
        assert main(["infer", "add_sub", *url, "-H", header]) == 2
        assert main(["bench", "add_sub", *url, "-H", header, *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 3 and SECRET not in err, err
    assert main(["infer", "add_sub", *url, "--root-certificates", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem" in capsys.readouterr().err
    assert main(["health", *url, "-H", f"x-token: @{tmp_path / 'missing'}"]) == 1
    assert "cannot read the value of header 'x-token'" in capsys.readouterr().err
    mismatched = ["--private-key", str(pki.server_key), "--certificate-chain", str(pki.client_cert)]
    assert main(["bench", "add_sub", *url, *mismatched, *FAST]) == 2  # before any connection is made
    assert "are not a PEM certificate and its key" in capsys.readouterr().err
    assert parse_header("X-Token:  a:b=c ") == ("x-token", "a:b=c")  # the first separator splits
    assert parse_header("x-token=a: b") == ("x-token", "a: b")
