"""rapidserve's protobuf classes, held in a private descriptor pool: package ``inference``, the gRPC
health service and server reflection.

tritonclient registers its own ``inference.*`` messages in protobuf's default pool; keeping ours in a
separate pool lets both live in one process. The wire format is identical, so messages serialize to
the same bytes either way. Health and reflection come from our own ``.proto`` files too: the generated
code of grpcio-health-checking and grpcio-reflection refuses to load under an older protobuf runtime,
which another package (tritonclient) may well have picked.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from rapidserve.protos._descriptor_set import DESCRIPTOR_SET

# every .proto of ours, as FileDescriptorProto messages (reflection serves them as they are)
FILES: tuple[descriptor_pb2.FileDescriptorProto, ...] = tuple(
    descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET).file
)
POOL = descriptor_pool.DescriptorPool()
for _file in FILES:
    POOL.Add(_file)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVICE = POOL.FindServiceByName(SERVICE_NAME)
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
# v1alpha first: what most clients ask for; v1 has the same messages under another package
REFLECTION_SERVICE_NAMES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


def message_class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


def _message(name: str, package: str = "inference") -> Any:
    return message_class(POOL.FindMessageTypeByName(f"{package}.{name}"))


DataType = EnumTypeWrapper(POOL.FindEnumTypeByName("inference.DataType"))

# model_config.proto
ModelConfig = _message("ModelConfig")
ModelInput = _message("ModelInput")
ModelOutput = _message("ModelOutput")
ModelInstanceGroup = _message("ModelInstanceGroup")
ModelVersionPolicy = _message("ModelVersionPolicy")
ModelDynamicBatching = _message("ModelDynamicBatching")
ModelWarmup = _message("ModelWarmup")

# grpc_service.proto
ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
InferParameter = _message("InferParameter")
InferTensorContents = _message("InferTensorContents")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
ModelStreamInferResponse = _message("ModelStreamInferResponse")
ModelConfigRequest = _message("ModelConfigRequest")
ModelConfigResponse = _message("ModelConfigResponse")
ModelStatisticsRequest = _message("ModelStatisticsRequest")
ModelStatisticsResponse = _message("ModelStatisticsResponse")
ModelStatistics = _message("ModelStatistics")
RepositoryIndexRequest = _message("RepositoryIndexRequest")
RepositoryIndexResponse = _message("RepositoryIndexResponse")
RepositoryModelLoadRequest = _message("RepositoryModelLoadRequest")
RepositoryModelLoadResponse = _message("RepositoryModelLoadResponse")
RepositoryModelUnloadRequest = _message("RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse = _message("RepositoryModelUnloadResponse")

# health.proto (grpc.health.v1): HealthCheckResponse.SERVING, .NOT_SERVING, ... are its status values
HealthCheckRequest = _message("HealthCheckRequest", "grpc.health.v1")
HealthCheckResponse = _message("HealthCheckResponse", "grpc.health.v1")

# reflection_v1alpha.proto; reflection_v1.proto's messages are the same on the wire
ServerReflectionRequest = _message("ServerReflectionRequest", "grpc.reflection.v1alpha")
ServerReflectionResponse = _message("ServerReflectionResponse", "grpc.reflection.v1alpha")


def varint(value: int) -> bytes:
    """A non-negative integer in protobuf's varint wire encoding (for messages patched as bytes)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def method_path(rpc: str) -> str:
    """The gRPC path of one RPC of GRPCInferenceService, e.g. ``/inference.GRPCInferenceService/ModelInfer``."""
    return f"/{SERVICE_NAME}/{SERVICE.methods_by_name[rpc].name}"
