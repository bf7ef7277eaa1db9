"""rapidserve's ``triton_python_backend_utils``: the part of Triton's Python-backend API that model.py
files use, so they run unchanged. The Python backend registers this module under that name in
``sys.modules`` when it loads its first model (``install``); nothing of that name is installed."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "TRITON_STRING_TO_NUMPY",
    "InferenceRequest",
    "InferenceResponse",
    "Logger",
    "Tensor",
    "TritonError",
    "TritonModelException",
    "get_input_config_by_name",
    "get_input_tensor_by_name",
    "get_output_config_by_name",
    "get_output_tensor_by_name",
    "install",
    "triton_string_to_numpy",
    "using_decoupled_model_transaction_policy",
]

MODULE_NAME = "triton_python_backend_utils"

# config data_type -> numpy type, as Triton's module has it (TYPE_STRING: object arrays of bytes)
TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


def install() -> None:
    """Make ``import triton_python_backend_utils`` give this module (idempotent)."""
    sys.modules.setdefault(MODULE_NAME, sys.modules[__name__])


class TritonError:
    """An error a model puts in a response (not an exception, as in Triton); ``code`` is one of the
    class's codes, and INVALID_ARG makes it the caller's error (INVALID_ARGUMENT), any other INTERNAL."""

    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = str(message)
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


class Logger:
    """Triton's ``pb_utils.Logger``: a model's lines go to the server's log (logger ``rapidserve.models``)."""

    INFO, WARNING, ERROR, VERBOSE = logging.INFO, logging.WARNING, logging.ERROR, logging.DEBUG
    _log = logging.getLogger("rapidserve.models")

    @staticmethod
    def log(message: str, level: int = logging.INFO) -> None:
        Logger._log.log(level, "%s", message)

    @staticmethod
    def log_info(message: str) -> None:
        Logger._log.info("%s", message)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger._log.warning("%s", message)

    @staticmethod
    def log_error(message: str) -> None:
        Logger._log.error("%s", message)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger._log.debug("%s", message)


class TritonModelException(Exception):
    """Raised by Triton's API on a model's misuse of it; a model may raise it too."""


class Tensor:
    """A named numpy array: what requests carry in and responses out."""

    def __init__(self, name: str, array: Any) -> None:
        if not isinstance(name, str):
            raise TritonModelException(f"a Tensor's name must be a string, not {type(name).__name__}")
        self._name = name
        self._array = np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray[Any, Any]:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, {self._array.dtype}, {list(self._array.shape)})"


class InferenceRequest:
    """One client request of a batch handed to ``execute``. Models built their own to call other
    models in Triton (BLS); rapidserve does not run those, and ``exec`` says so."""

    def __init__(
        self,
        inputs: Sequence[Tensor] = (),
        requested_output_names: Sequence[str] = (),
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self._inputs = list(inputs)
        self._outputs = list(requested_output_names)
        self._id = request_id
        self._parameters = dict(parameters or {})

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def request_id(self) -> str:
        return self._id

    def parameters(self) -> str:
        """The request's parameters as a JSON string (Triton's form)."""
        return json.dumps(self._parameters)

    def correlation_id(self) -> int:
        return 0

    def flags(self) -> int:
        return 0

    def timeout(self) -> int:
        return 0

    def is_cancelled(self) -> bool:
        return False

    def exec(self, decoupled: bool = False) -> InferenceResponse:
        raise TritonModelException("calling other models from a model (BLS) is not supported by rapidserve")

    async_exec = exec


class InferenceResponse:
    """A model's answer to one request: its output tensors, or an error."""

    def __init__(
        self,
        output_tensors: Iterable[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self._outputs = list(output_tensors or ())
        self._error = error
        self._parameters = dict(parameters or {})

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return json.dumps(self._parameters)


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    """The request's input named ``name``, or None."""
    return next((tensor for tensor in inference_request.inputs() if tensor.name() == name), None)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return next((tensor for tensor in inference_response.output_tensors() if tensor.name() == name), None)


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The config entry of input ``name`` (``model_config`` is the parsed ``args["model_config"]``)."""
    return next((entry for entry in model_config.get("input", ()) if entry.get("name") == name), None)


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    return next((entry for entry in model_config.get("output", ()) if entry.get("name") == name), None)


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


def triton_string_to_numpy(triton_type_string: str) -> Any:
    """The numpy type of a config data_type such as ``"TYPE_FP32"``."""
    return TRITON_STRING_TO_NUMPY[triton_type_string]
