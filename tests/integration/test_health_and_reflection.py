"""The gRPC health service and server reflection, served from rapidserve's own descriptors, against a
real server: what they answer, and how they refuse a hostile caller."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from standard_services import health_check, health_watch, reflect

from rapidserve import protos
from rapidserve.server import health as health_module
from rapidserve.server import reflection
from rapidserve.server.admission import Admission
from rapidserve.server.health import HealthService
from rapidserve.server.transport import health_handler

pytestmark = [pytest.mark.timeout(120), pytest.mark.frontends(1, 2)]

SERVICES = {
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
}
Request = protos.ServerReflectionRequest


@pytest.fixture(scope="module")
def channel(shared_server):
    with grpc.insecure_channel(shared_server.url) as opened:
        yield opened


def _files(response) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response.error_response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in response.file_descriptor_response.file_descriptor_proto
    ]


def test_health_check_follows_readiness_and_refuses_unknown_services(channel) -> None:
    check = health_check(channel)
    for service in ("", "inference.GRPCInferenceService"):
        assert (
            check(protos.HealthCheckRequest(service=service), timeout=10).status == protos.HealthCheckResponse.SERVING
        )
    with pytest.raises(grpc.RpcError) as info:
        check(protos.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health_watch(channel)(protos.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert next(watch).status == protos.HealthCheckResponse.SERVICE_UNKNOWN
    watch.cancel()


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_lists_and_describes_every_service(channel, version: str) -> None:
    """The files a client gets describe each service completely: a fresh pool built from them alone
    resolves every method's messages."""
    listed, *described = reflect(
        channel, [Request(list_services=""), *(Request(file_containing_symbol=s) for s in sorted(SERVICES))], version
    )
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for response in described:
        files = _files(response)
        assert len({f.name for f in files}) == len(files)
        for file in reversed(files):  # the file first, then what it imports
            if file.name not in added:
                pool.Add(file)
                added.add(file.name)
    assert all(pool.FindServiceByName(name).methods for name in SERVICES)
    infer = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"


def test_reflection_finds_nested_member_and_method_symbols_with_their_imports(channel) -> None:
    symbols = {
        "inference.ModelInferRequest.InferInputTensor": "grpc_service.proto",  # a nested message
        "inference.ModelInferRequest.model_name": "grpc_service.proto",  # a field
        "inference.GRPCInferenceService.ModelInfer": "grpc_service.proto",  # a method
        "inference.TYPE_FP32": "model_config.proto",  # an enum value (its enum's sibling)
        "grpc.health.v1.HealthCheckResponse.ServingStatus": "health.proto",  # a nested enum
        "grpc.health.v1.Health.Watch": "health.proto",
    }
    responses = list(reflect(channel, [Request(file_containing_symbol=s) for s in symbols]))
    for (symbol, expected), response in zip(symbols.items(), responses, strict=True):
        names = [f.name for f in _files(response)]
        assert names[0] == expected, symbol
        assert response.original_request.file_containing_symbol == symbol
    by_name = list(reflect(channel, [Request(file_by_filename="grpc_service.proto")]))
    assert [f.name for f in _files(by_name[0])] == ["grpc_service.proto", "model_config.proto"]  # with its import


def test_reflection_errors_stay_on_the_stream(channel) -> None:
    """Unknown names, extensions (we define none) and an empty request each get an error_response;
    the stream answers the next request."""
    not_found, invalid = grpc.StatusCode.NOT_FOUND.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    requests = [
        Request(file_containing_symbol="inference.Nothing"),
        Request(file_by_filename="nothing.proto"),
        Request(file_containing_extension={"containing_type": "inference.ModelInferRequest", "extension_number": 100}),
        Request(all_extension_numbers_of_type="inference.Nothing"),
        Request(),
        Request(file_containing_symbol="x" * (reflection.MAX_NAME_CHARS + 1)),
        Request(all_extension_numbers_of_type="inference.ModelInferRequest"),
    ]
    answers = list(reflect(channel, requests))
    assert [a.error_response.error_code for a in answers[:6]] == [not_found] * 4 + [invalid] * 2
    assert all(len(a.error_response.error_message) <= 1024 for a in answers)
    known = answers[6].all_extension_numbers_response
    assert answers[6].WhichOneof("message_response") == "all_extension_numbers_response"
    assert known.base_type_name == "inference.ModelInferRequest" and list(known.extension_number) == []


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_reflection_refuses_oversized_garbage_and_endless_streams(shared_server, channel, monkeypatch) -> None:
    main, _ = shared_server.server.admissions
    big = Request(file_containing_symbol="x" * reflection.MAX_REQUEST_BYTES)
    with pytest.raises(grpc.RpcError) as info:
        list(reflect(channel, [Request(list_services=""), big]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(reflect(channel, [b"\xff\xff\xff"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    monkeypatch.setattr(reflection, "MAX_REQUESTS_PER_STREAM", 5)  # (read when a stream starts)
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in reflect(channel, [Request(list_services="")] * 50):
            answers.append(answer)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(answers) == 5
    assert main.held == 0  # every request's bytes went back to the budget


# one process only: reads the in-flight budget of the one process
@pytest.mark.frontends(1)
def test_reflection_requests_are_admitted_against_the_budget(shared_server, channel) -> None:
    main, _ = shared_server.server.admissions

    async def fill() -> int:
        full = main.budget - main.held
        assert main.admit(full)
        return full

    async def release(size: int) -> None:
        main.release(size)

    full = shared_server.run(fill())
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(reflect(channel, [Request(list_services="")]))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        shared_server.run(release(full))
    assert len(list(reflect(channel, [Request(list_services="")]))) == 1


async def test_health_watch_streams_every_change_and_open_watchers_are_bounded(monkeypatch) -> None:
    """The health service alone on a real server, read through a health budget as the server does."""
    service = HealthService()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((health_handler(service, Admission(8 * 2**20, 2**20, 2.0, "the health budget")),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    serving, not_serving = protos.HealthCheckResponse.SERVING, protos.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_watch(channel)(protos.HealthCheckRequest(service="svc"))
            other = health_watch(channel)(protos.HealthCheckRequest(service="svc"))
            assert (await watch.read()).status == protos.HealthCheckResponse.SERVICE_UNKNOWN
            assert (await other.read()).status == protos.HealthCheckResponse.SERVICE_UNKNOWN
            for status in (serving, not_serving, serving):
                service.set("svc", status)
                service.set("unrelated", status)  # changes of other services are not sent
                assert (await watch.read()).status == status
                assert (await other.read()).status == status
            assert (await health_check(channel)(protos.HealthCheckRequest(service="svc"))).status == serving
            monkeypatch.setattr(health_module, "MAX_WATCHERS", 2)
            refused = health_watch(channel)(protos.HealthCheckRequest(service="svc"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await refused.read()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watch.cancel()
            other.cancel()
            while service.watchers:  # the server sees the cancellations
                await asyncio.sleep(0.01)
            again = health_watch(channel)(protos.HealthCheckRequest(service="svc"))
            assert (await again.read()).status == serving
            again.cancel()
    finally:
        await server.stop(0)


async def test_open_health_watchers_hold_no_budget_so_checks_keep_answering() -> None:
    """Watch streams live long: the bytes of their requests go back to the health budget once parsed,
    and a request naming a service longer than any real one is refused, so watchers opened by a hostile
    caller never starve the probes."""
    service = HealthService()
    service.set("", protos.HealthCheckResponse.SERVING)
    budget = Admission(8 * 2**20, 2**20, 2.0, "the health budget")  # as for --grpc-max-message-bytes 1MiB
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((health_handler(service, budget),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch, check = health_watch(channel), health_check(channel)
            # 200 watchers naming 60 KB services: 12 MB, more than the whole budget if they were held
            big = [watch(protos.HealthCheckRequest(service="s" * 60_000)) for _ in range(200)]
            codes = []
            for call in big:
                try:
                    await call.read()
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code())
            assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, set(codes)
            # as many watchers of the longest name taken stay open, and cost the budget nothing
            longest = "s" * (health_module.MAX_REQUEST_BYTES - 8)
            held = [watch(protos.HealthCheckRequest(service=longest)) for _ in range(200)]
            for call in held:
                assert (await call.read()).status == protos.HealthCheckResponse.SERVICE_UNKNOWN
            assert service.watchers == 200
            assert (await check(protos.HealthCheckRequest(), timeout=10)).status == protos.HealthCheckResponse.SERVING
            assert budget.held == 0, budget.held
            for call in held:
                call.cancel()
    finally:
        await server.stop(0)
