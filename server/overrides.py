"""What a caller's model config may cost.

A config sent with RepositoryModelLoad (an override of config.pbtxt, or the config of an upload) comes
from the network: its size is capped before it is parsed, it is parsed in a loader thread (never on the
event loop), and what it asks of the server (warm-up requests, instances, threads) is bounded before
anything loads. Configs read from config.pbtxt are the operator's and are taken as they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rapidserve.common.datatypes import config_type_to_datatype, numpy_dtype
from rapidserve.common.errors import shown
from rapidserve.server.config import parse_config_json
from rapidserve.server.errors import ModelLoadError

__all__ = [
    "MAX_CONFIG_BYTES",
    "OverrideLimits",
    "check_config_size",
    "check_instances",
    "check_request_bytes",
    "parse_override",
    "request_bytes",
]

MAX_CONFIG_BYTES = 2**20
THREAD_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")
_BEYOND = 2**64  # element counts stop growing here: far over any limit, and no big-integer arithmetic


def _cpus() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class OverrideLimits:
    """The bounds a caller's config is held to."""

    max_request_bytes: int = 64 * 2**20  # one warm-up request: the server's --grpc-max-message-bytes
    max_warmup_requests: int = 100  # every warm-up entry's count together
    cpus: int = field(default_factory=_cpus)

    @property
    def max_instances(self) -> int:
        return 4 * self.cpus

    @property
    def max_threads(self) -> int:
        return self.cpus


def check_config_size(text: str, source: str) -> None:
    """Refuse a config text over MAX_CONFIG_BYTES (UTF-8). Cheap: it runs before any parsing."""
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ModelLoadError(
            f"{source} is over {MAX_CONFIG_BYTES} bytes (1 MiB), the most a load request's config may be"
        )


def parse_override(text: str, model: str, limits: OverrideLimits) -> Any:
    """A caller's JSON config, parsed and held to ``limits`` (blocking: run it in a loader thread)."""
    config = parse_config_json(text, f"config for '{model}'")
    _check_warmup(config, model, limits)
    _check_threads(config, model, limits)
    return config


def request_bytes(tensors: Iterable[tuple[str, Sequence[int]]]) -> int:
    """The bytes a request's tensors take, given (datatype, full shape) each; at least ``2**64`` once
    that large, whatever the shape."""
    total = 0
    for datatype, dims in tensors:
        elements = 0 if 0 in dims else 1
        for dim in dims if elements else ():
            elements = min(elements * dim, _BEYOND)
        total += elements * numpy_dtype(datatype).itemsize
    return total


def check_request_bytes(size: int, what: str, max_bytes: int) -> None:
    """Refuse a warm-up request of ``size`` bytes over ``max_bytes`` (``OverrideLimits.max_request_bytes``);
    ``what`` names the request and how it is sized."""
    if size > max_bytes:
        needs = f"{size} bytes" if size < _BEYOND else f"more than {_BEYOND} bytes"
        raise ModelLoadError(
            f"{what} needs {needs}; a load request's config may ask for at most {max_bytes} bytes per "
            "warm-up request (the server's --grpc-max-message-bytes)"
        )


def check_instances(count: int, max_instances: int) -> None:
    """Refuse a caller's ``instance_group`` of more than ``max_instances`` (``OverrideLimits.max_instances``)
    instances in all."""
    if count > max_instances:
        raise ModelLoadError(
            f"instance_group asks for {count} instances in all; a load request's config may ask for at most "
            f"{max_instances} (4 x the server's CPUs)"
        )


def _check_warmup(config: Any, model: str, limits: OverrideLimits) -> None:
    """At most ``max_warmup_requests`` warm-up requests, each within the message limit (sized as
    batch_size x dims x the datatype's size, whether or not the model batches)."""
    requests = sum(max(entry.count, 1) for entry in config.model_warmup)
    if requests > limits.max_warmup_requests:
        raise ModelLoadError(
            f"model '{model}': model_warmup asks for {requests} warm-up requests (each entry's count "
            f"together); a load request's config may ask for at most {limits.max_warmup_requests}"
        )
    for entry in config.model_warmup:
        what = f"model '{model}': model_warmup '{shown(entry.name)}'"
        tensors = []
        for name, tensor in entry.inputs.items():
            if any(dim < 0 for dim in tensor.dims):
                raise ModelLoadError(f"{what} input '{shown(name)}': dims must not be negative")
            try:
                datatype = config_type_to_datatype(tensor.data_type)
            except ValueError:
                raise ModelLoadError(f"{what} input '{shown(name)}': invalid data_type {tensor.data_type}") from None
            tensors.append((datatype, (max(entry.batch_size, 1), *tensor.dims)))
        size = request_bytes(tensors)
        check_request_bytes(size, f"{what} (batch_size x dims x the datatype's size)", limits.max_request_bytes)


def _check_threads(config: Any, model: str, limits: OverrideLimits) -> None:
    for key in THREAD_PARAMETERS:
        if key not in config.parameters:
            continue
        value = config.parameters[key].string_value
        if not (value.isascii() and value.isdigit() and len(value) <= 9) or int(value) > limits.max_threads:
            raise ModelLoadError(
                f"model '{model}': parameter '{key}' is '{shown(value, 24)}'; a load request's config may set it "
                f"to a whole number from 0 (ONNX Runtime's default) to {limits.max_threads}, the server's CPUs"
            )
