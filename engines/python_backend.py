"""Python backend: runs Triton's ``model.py`` files (``class TritonPythonModel``) unchanged.

Each instance (``instance_group`` count) is one ``TritonPythonModel`` object of its own copy of the
module, imported from the version folder under a name unique to it, so two models' ``model.py`` files
(or two instances' module globals) never clash. ``initialize(args)`` runs at load, in the loader thread;
``execute(requests)`` gets a batch as a list of requests, one per client request, in the instance's
worker thread (never on the event loop: ``engines.base.may_run_inline``); ``finalize()`` runs at close.
The model imports ``triton_python_backend_utils``, which is rapidserve's ``engines/python_utils.py``.

A Python model describes no I/O, so its config.pbtxt must list its inputs and outputs
(``auto_complete_config`` is not called). Files beside model.py import relatively (``from .helper
import f``): each copy of the module lives in a package of its own over the version folder, which is
never put on ``sys.path``. Not supported: calling other models (BLS), decoupled models.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import json
import logging
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from rapidserve.common.datatypes import config_type_to_datatype
from rapidserve.common.types import TensorSpec
from rapidserve.engines import python_utils as pb
from rapidserve.engines.base import EngineInputError, EngineOptions

__all__ = ["ErrorResponse", "PythonEngine", "load"]

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray[Any, Any]]
_MODULE_NUMBERS = itertools.count()
_NO_BYTECODE = threading.Lock()  # imports of model files (sys.dont_write_bytecode is process-wide)


class ErrorResponse(RuntimeError):
    """The error a model returned for one request (``InferenceResponse(error=TritonError(...))``)."""


def load(path: Path, options: EngineOptions) -> PythonEngine:
    return PythonEngine(path, options)


class PythonEngine:
    """One instance of a Python model. ``infer_requests`` is how batches run (a list of requests in,
    one answer per request out); ``infer`` runs one request (warm-up)."""

    def __init__(self, path: Path, options: EngineOptions) -> None:
        config = options.model_config
        self._file = f"{path.parent.parent.name}/{path.parent.name}/{path.name}"  # what messages show
        if config is None or not config.input or not config.output:
            raise ValueError(
                f"{self._file} is a Python model, which describes no inputs or outputs itself: its config.pbtxt "
                'needs backend: "python" and an input and output entry for each tensor'
            )
        pb.install()
        self.name = str(config.name)
        batch = (-1,) if config.max_batch_size > 0 else ()
        self._inputs = [_spec(entry, batch) for entry in config.input]
        self._outputs = [_spec(entry, batch) for entry in config.output]
        self._module_name = f"rapidserve_python_model_{next(_MODULE_NUMBERS)}_{_identifier(self.name)}"
        self._module = self._import(path)
        model_class = getattr(self._module, "TritonPythonModel", None)
        if not isinstance(model_class, type):
            self._forget()
            raise ValueError(f"{self._file} defines no class TritonPythonModel")
        try:
            self._model = model_class()
            if not callable(getattr(self._model, "execute", None)):
                raise ValueError("TritonPythonModel has no execute(requests) method")
            initialize = getattr(self._model, "initialize", None)
            if callable(initialize):
                initialize(_args(config, path, options))
        except BaseException as exc:  # a model's sys.exit() is its failure, never the loader thread's end
            self._forget()
            raise ValueError(f"{self._file}: {_where(exc, path)}") from exc

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def infer(self, inputs: Mapping[str, np.ndarray[Any, Any]], outputs: Sequence[str]) -> Arrays:
        answer = self.infer_requests([dict(inputs)], outputs)[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def infer_requests(self, requests: list[Arrays], outputs: Sequence[str]) -> list[Arrays | Exception]:
        """Run ``execute`` on the requests (each asks for ``outputs``, the batch's union); returns each
        request's outputs, or the exception it gets for an error response or a malformed one."""
        names = list(outputs)
        batch = [  # writable inputs, as Triton gives them (ours may be views of a request's read-only bytes)
            pb.InferenceRequest([pb.Tensor(n, a if a.flags.writeable else a.copy()) for n, a in inputs.items()], names)
            for inputs in requests
        ]
        try:
            responses = self._model.execute(batch)
            if inspect.iscoroutine(responses):  # Triton runs an ``async def execute`` to completion too
                responses = asyncio.run(responses)
        except Exception:
            raise
        except BaseException as exc:  # sys.exit() and the like: a failure of this call, not of the worker thread
            raise RuntimeError(f"execute raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(responses, list | tuple) or len(responses) != len(batch):
            got = f"{len(responses)} responses" if isinstance(responses, list | tuple) else type(responses).__name__
            raise ValueError(
                f"execute returned {got} for {len(batch)} requests; "
                "expected a list of one InferenceResponse per request, in order"
            )
        return [self._answer(response) for response in responses]

    def _answer(self, response: Any) -> Arrays | Exception:
        if not isinstance(response, pb.InferenceResponse):
            return ValueError(f"execute returned a {type(response).__name__} where an InferenceResponse was expected")
        error = response.error()
        if error is not None:
            message = error.message() if isinstance(error, pb.TritonError) else str(error)
            code = error.code() if isinstance(error, pb.TritonError) else pb.TritonError.INTERNAL
            return EngineInputError(message) if code == pb.TritonError.INVALID_ARG else ErrorResponse(message)
        arrays: Arrays = {}
        for tensor in response.output_tensors():
            if not isinstance(tensor, pb.Tensor):
                return ValueError(f"a response holds a {type(tensor).__name__} where a Tensor was expected")
            arrays[tensor.name()] = tensor.as_numpy()
        return arrays

    def close(self) -> None:
        """Call the model's ``finalize``; a failure in it is logged, never raised (the unload goes on)."""
        finalize = getattr(self._model, "finalize", None)
        try:
            if callable(finalize):
                finalize()
        except BaseException:
            log.exception("model '%s': finalize() of %s raised", self.name, self._file)
        finally:
            self._forget()

    def _import(self, path: Path) -> ModuleType:
        """A fresh copy of the model's module, ``<package>.model`` in a package of its own over the
        version folder (so ``from . import helper`` finds the folder's files, as in Triton, where the
        folder is a package too), registered while it is loaded: dataclasses and pickling look there."""
        package = ModuleType(self._module_name)
        package.__path__ = [str(path.parent)]
        sys.modules[self._module_name] = package
        spec = importlib.util.spec_from_file_location(f"{self._module_name}.{path.stem}", path)
        if spec is None or spec.loader is None:
            self._forget()
            raise ValueError(f"{self._file} cannot be imported")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            with _NO_BYTECODE:  # the repository is the operator's: no __pycache__ written into it
                written, sys.dont_write_bytecode = sys.dont_write_bytecode, True
                try:
                    spec.loader.exec_module(module)
                finally:
                    sys.dont_write_bytecode = written
        except BaseException as exc:
            self._forget()
            raise ValueError(f"{self._file} failed to import: {_where(exc, path)}") from exc
        return module

    def _forget(self) -> None:
        """Drop the model's package and every module imported into it."""
        prefix = self._module_name + "."
        for name in [name for name in sys.modules if name == self._module_name or name.startswith(prefix)]:
            sys.modules.pop(name, None)


def _spec(entry: Any, batch: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(entry.name, config_type_to_datatype(entry.data_type), (*batch, *entry.dims))


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:64]


def _where(exc: BaseException, path: Path) -> str:
    """``Type: message``, and the line of the model file where it was raised when it was."""
    line = exc.lineno if isinstance(exc, SyntaxError) and exc.filename == str(path) else None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            line = frame.lineno
    text = f"{type(exc).__name__}: {exc}"
    return f"{text} (line {line})" if line is not None else text


def _args(config: Any, path: Path, options: EngineOptions) -> dict[str, str]:
    """What Triton passes ``initialize``: every key and value a string."""
    gpu = options.device.startswith("cuda")
    return {
        "model_config": json.dumps(triton_json(config)),
        "model_instance_kind": "GPU" if gpu else "CPU",
        "model_instance_name": options.instance_name or f"{config.name}_0",
        "model_instance_device_id": (options.device.partition(":")[2] or "0") if gpu else "0",
        "model_repository": str(path.parent.parent),
        "model_version": path.parent.name,
        "model_name": str(config.name),
    }


def triton_json(config: Any) -> dict[str, Any]:
    """The config as Triton hands it to a Python model: protobuf JSON with Triton's field names, every
    field present (``max_batch_size`` 0 included), and ``dims`` (int64, which protobuf writes as
    strings) as numbers."""
    from google.protobuf import json_format

    try:
        data = json_format.MessageToDict(
            config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except TypeError:  # protobuf before 5.26 names the option differently
        data = json_format.MessageToDict(config, preserving_proto_field_name=True, including_default_value_fields=True)
    return _int_dims(data)


def _int_dims(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: [int(d) for d in v] if k in ("dims", "shape") and isinstance(v, list) else _int_dims(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_int_dims(item) for item in value]
    return value
