"""The KServe v2 REST protocol, client side, with Triton's binary tensor data extension: an inference
request becomes one body (a JSON header, then every input's raw bytes in input order), an answer body
becomes numpy arrays (binary or JSON outputs), and the other endpoints' JSON becomes the same values
and protobuf messages the gRPC client returns. Pure functions over bytes: no I/O here.

Paths are built from quoted names; a response is checked as strictly as the gRPC codec checks one
(known datatypes, shapes numpy can hold, binary sizes that add up to the body)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from google.protobuf import json_format

from rapidserve import protos
from rapidserve.clients.types import Arrays, InferenceServerError, ModelMetadata, code_of_http_status
from rapidserve.common.codec import check_bytes_size, checked_shape, deserialize_bytes, from_raw, tensor_to_raw
from rapidserve.common.datatypes import BYTES, DATATYPES, datatype_of
from rapidserve.common.errors import InvalidTensor, shown
from rapidserve.common.types import ParamValue, TensorSpec

__all__ = [
    "HEADER_LENGTH",
    "Endpoint",
    "InferBody",
    "decode_infer",
    "encode_infer",
    "error_of",
    "index_of",
    "load_body",
    "metadata_of",
    "model_path",
    "parse_url",
    "proto_of",
    "timeout_us",
]

HEADER_LENGTH = "Inference-Header-Content-Length"  # the JSON part's length when binary data follows it


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an ``http://`` or ``https://`` URL points: host, port (80/443 when not given), TLS or not,
    and the path the ``/v2/...`` endpoints hang below (usually empty)."""

    host: str
    port: int
    tls: bool
    prefix: str = ""

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_url(url: str) -> Endpoint:
    """An HTTP endpoint; ``ValueError`` says what is wrong with the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"URL {url!r}: expected http:// or https://")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"URL {url!r}: only scheme, host, port and a path prefix are allowed")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"URL {url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"URL {url!r} names no host")
    tls = parts.scheme == "https"
    return Endpoint(parts.hostname, port or (443 if tls else 80), tls, parts.path.rstrip("/"))


def model_path(model: str, version: str = "", tail: str = "") -> str:
    """``/v2/models/<model>[/versions/<version>][/<tail>]`` with the names quoted."""
    path = f"/v2/models/{quote(model, safe='')}"
    if version:
        path += f"/versions/{quote(version, safe='')}"
    return f"{path}/{tail}" if tail else path


@dataclass(frozen=True, slots=True)
class InferBody:
    """An inference request body and the length of its JSON header (the rest is binary tensor data)."""

    body: bytes
    header_length: int

    def headers(self) -> dict[str, str]:
        return {HEADER_LENGTH: str(self.header_length), "Content-Type": "application/octet-stream"}


def encode_infer(
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str] = (),
    *,
    request_id: str = "",
    parameters: Mapping[str, ParamValue] | None = None,
    binary: bool = True,
) -> InferBody:
    """Every input as binary data and every output asked for as binary data (``binary_data_output``), or
    with ``binary=False`` all as JSON (``data`` lists; BYTES as UTF-8 strings, FP16/BF16 as numbers)."""
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array.dtype)
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            raw = tensor_to_raw(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = _json_data(name, array, datatype)
        tensors.append(tensor)
    header: dict[str, Any] = {}
    if request_id:
        header["id"] = request_id
    header["parameters"] = {**(parameters or {}), "binary_data_output": binary}
    header["inputs"] = tensors
    if outputs:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": binary}} for name in outputs]
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise ValueError("NaN and infinity have no JSON form: send them as binary data") from None
    return InferBody(b"".join([text, *blobs]), len(text))


def _json_data(name: str, array: np.ndarray[Any, Any], datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == BYTES:
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat]
        except UnicodeDecodeError:
            raise ValueError(f"input '{name}' holds bytes that are not UTF-8: send it as binary data") from None
    if datatype in ("FP16", "BF16"):
        flat = flat.astype(np.float32)
    return flat.tolist()  # type: ignore[no-any-return]


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise InvalidTensor(f"the {what} is not JSON: {shown(body[:80].decode('utf-8', 'replace'))}") from None


def decode_infer(body: bytes, header_length: int | None) -> Arrays:
    """Numpy outputs of an inference answer: ``header_length`` is its Inference-Header-Content-Length
    (None: the body is all JSON). Binary outputs are read-only views of ``body``, in response order."""
    if header_length is None:
        header_length = len(body)
    if not 0 <= header_length <= len(body):
        raise InvalidTensor(f"{HEADER_LENGTH} {header_length} is outside the body's {len(body)} bytes")
    answer = _json(body[:header_length], "inference response")
    tensors = answer.get("outputs", []) if isinstance(answer, dict) else None
    if not isinstance(tensors, list):
        raise InvalidTensor("the inference response has no 'outputs' list")
    view = memoryview(body)
    at = header_length
    outputs: Arrays = {}
    for tensor in tensors:
        name, datatype, shape, count, size = _output_header(tensor)
        if size is None:
            outputs[name] = _from_json(name, datatype, shape, count, tensor.get("data"))
            continue
        if at + size > len(body):
            raise InvalidTensor(f"output '{shown(name)}': binary_data_size {size} runs past the body's end")
        chunk = view[at : at + size]
        at += size
        if datatype == BYTES:
            check_bytes_size(name, chunk, count, "output")
            outputs[name] = deserialize_bytes(name, bytes(chunk), count, "output").reshape(shape)
        else:
            outputs[name] = from_raw(name, datatype, DATATYPES[datatype], shape, count, chunk, "output")
    if at != len(body):
        raise InvalidTensor(f"the inference response has {len(body) - at} bytes after its outputs' binary data")
    return outputs


def _output_header(tensor: Any) -> tuple[str, str, list[int], int, int | None]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise InvalidTensor("an output of the inference response is not an object with a 'name'")
    name, datatype, dims = tensor["name"], tensor.get("datatype"), tensor.get("shape")
    if datatype not in DATATYPES:
        raise InvalidTensor(f"output '{shown(name)}': unknown datatype '{shown(str(datatype))}'")
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidTensor(f"output '{shown(name)}': 'shape' is not a list of integers")
    shape, count = checked_shape("output", name, dims)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidTensor(f"output '{shown(name)}': binary_data_size {shown(str(size))} is not a byte count")
    return name, datatype, shape, count, size


def _from_json(name: str, datatype: str, shape: list[int], count: int, data: Any) -> np.ndarray[Any, Any]:
    """A JSON output's values (flat or nested, row-major) as an array of ``shape``."""
    flat = _flatten(name, data)
    if len(flat) != count:
        raise InvalidTensor(f"output '{shown(name)}': 'data' has {len(flat)} elements, expected {count} for {shape}")
    if datatype == BYTES:
        if not all(isinstance(v, str) for v in flat):
            raise InvalidTensor(f"output '{shown(name)}': BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8") for v in flat]
        return array.reshape(shape)
    floating = datatype in ("FP16", "BF16", "FP32", "FP64")  # (numpy calls bfloat16's kind "V")
    if not floating and not all(isinstance(v, (int, bool)) for v in flat):
        raise InvalidTensor(f"output '{shown(name)}': {datatype} data must be integers or booleans")
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, TypeError, ValueError) as exc:
        raise InvalidTensor(f"output '{shown(name)}': data is not {datatype}: {exc}") from None


def _flatten(name: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise InvalidTensor(f"output '{shown(name)}': neither binary_data_size nor a 'data' list")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 64:
                    raise InvalidTensor(f"output '{shown(name)}': 'data' is nested too deep")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def error_of(status: int, body: bytes) -> InferenceServerError:
    """The error an HTTP answer other than 200 means: the server's ``{"error": ...}`` message if it
    sent one, else the status itself."""
    message = ""
    try:
        answer = json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        message = answer["error"]
    elif body:
        message = " ".join(body[:200].decode("utf-8", "replace").split())
    return InferenceServerError(code_of_http_status(status), message or f"HTTP status {status}", status)


def metadata_of(body: bytes) -> ModelMetadata:
    answer = _json(body, "model metadata")

    def specs(key: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                     for t in answer.get(key, []))  # fmt: skip

    try:
        return ModelMetadata(answer["name"], tuple(answer.get("versions", [])), answer.get("platform", ""),
                             specs("inputs"), specs("outputs"))  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidTensor(f"the model metadata is not a v2 metadata object ({exc!r})") from None


def proto_of(body: bytes, message: Any) -> Any:
    """A JSON answer as an instance of the protobuf class ``message`` (e.g. ``protos.ModelConfig``), as the
    gRPC side returns it; fields it does not know are skipped, as a newer server may send some."""
    try:
        return json_format.ParseDict(_json(body, message.DESCRIPTOR.name), message(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise InvalidTensor(f"the {message.DESCRIPTOR.name} answer does not parse: {exc}") from None


def index_of(body: bytes) -> Any:
    """The repository index (a JSON list) as the gRPC client's ``RepositoryIndexResponse.models``."""
    answer = _json(body, "repository index")
    if not isinstance(answer, list):
        raise InvalidTensor("the repository index is not a JSON list")
    response = protos.RepositoryIndexResponse()
    try:
        json_format.ParseDict({"models": answer}, response, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise InvalidTensor(f"the repository index does not parse: {exc}") from None
    return response.models


def load_body(config_json: str | None, files: Mapping[str, bytes] | None) -> bytes:
    """A load request: the config override and model files (base64) as its parameters."""
    parameters: dict[str, str] = {}
    if config_json:
        parameters["config"] = config_json
    for path, data in (files or {}).items():
        parameters[f"file:{path}"] = base64.b64encode(data).decode("ascii")
    return json.dumps({"parameters": parameters} if parameters else {}).encode()


def timeout_us(timeout_s: float | None) -> int | None:
    """Triton's ``timeout`` request parameter (microseconds) for a deadline, which HTTP cannot carry."""
    return None if timeout_s is None or not math.isfinite(timeout_s) else max(int(timeout_s * 1e6), 1)
