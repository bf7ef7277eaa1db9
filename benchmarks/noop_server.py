"""The no-op ceiling probe: the fastest Python gRPC server that speaks enough KServe v2 for
perf_analyzer, answering every inference with a prebuilt response and running no model.

uvloop + grpc.aio + generic handlers on raw bytes, as in the hot-path issue's ceiling measurement.
Served model: "mlp" (x FP32 [-1, 64] -> y FP32 [-1, 10]). rapidserve's throughput is reported as a
fraction of this server's, measured in the same run on the same core.

    python benchmarks/noop_server.py [--port 0]
"""

from __future__ import annotations

import argparse
from typing import Any

import grpc
import numpy as np
import uvloop

from rapidserve import protos

SERVICE = protos.SERVICE_NAME


def _responses() -> dict[str, bytes]:
    metadata = protos.ModelMetadataResponse(name="mlp", versions=["1"], platform="onnxruntime_onnx")
    metadata.inputs.add(name="x", datatype="FP32", shape=[-1, 64])
    metadata.outputs.add(name="y", datatype="FP32", shape=[-1, 10])
    config = protos.ModelConfigResponse()
    config.config.name, config.config.platform, config.config.max_batch_size = "mlp", "onnxruntime_onnx", 32
    config.config.input.add(name="x", data_type=protos.DataType.Value("TYPE_FP32"), dims=[64])
    config.config.output.add(name="y", data_type=protos.DataType.Value("TYPE_FP32"), dims=[10])
    infer = protos.ModelInferResponse(model_name="mlp", model_version="1")
    infer.outputs.add(name="y", datatype="FP32", shape=[1, 10])
    infer.raw_output_contents.append(np.zeros((1, 10), np.float32).tobytes())
    return {
        "ServerLive": protos.ServerLiveResponse(live=True).SerializeToString(),
        "ServerReady": protos.ServerReadyResponse(ready=True).SerializeToString(),
        "ModelReady": protos.ModelReadyResponse(ready=True).SerializeToString(),
        "ModelMetadata": metadata.SerializeToString(),
        "ModelConfig": config.SerializeToString(),
        "ModelInfer": infer.SerializeToString(),
        "ModelStatistics": protos.ModelStatisticsResponse().SerializeToString(),
        "ServerMetadata": protos.ServerMetadataResponse(name="noop", version="0").SerializeToString(),
    }


def _handler() -> grpc.GenericRpcHandler:
    answers = _responses()
    infer = answers["ModelInfer"]
    request_class = protos.ModelInferRequest
    wrap = protos.ModelStreamInferResponse

    def unary(answer: bytes) -> Any:
        async def handle(request: bytes, context: Any) -> bytes:
            return answer

        return grpc.unary_unary_rpc_method_handler(handle)

    async def stream(requests: Any, context: Any) -> Any:
        async for raw in requests:
            response = wrap()
            response.infer_response.ParseFromString(infer)
            response.infer_response.id = request_class.FromString(raw).id
            yield response.SerializeToString()

    handlers = {name: unary(answer) for name, answer in answers.items()}
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(stream)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_handler(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"no-op server listening on 127.0.0.1:{bound}\nserver ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    uvloop.run(main(parser.parse_args().port))
