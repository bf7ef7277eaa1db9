"""Request decoding speed: the small raw FP32 request of the demo model (with and without the checks
against the model), BYTES tensors of one and of mixed lengths, typed contents, and heavy().

    python benchmarks/codec.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from rapidserve import protos
from rapidserve.common.codec import deserialize_bytes, encode_request, serialize_bytes
from rapidserve.common.types import TensorSpec
from rapidserve.server import codec
from rapidserve.server.config import ModelSpec

DIGITS = ModelSpec(
    "digits",
    "onnxruntime_onnx",
    32,
    (TensorSpec("pixels", "FP32", (64,)),),
    (TensorSpec("probabilities", "FP32", (10,)), TensorSpec("label", "INT64", ())),
)


def best(call: Callable[[], Any], number: int, repeat: int) -> float:
    """Seconds per call, best of ``repeat`` rounds of ``number`` calls."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number


def wire(msg: Any) -> Any:
    return protos.ModelInferRequest.FromString(msg.SerializeToString())  # as the server receives it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    digits = wire(encode_request("digits", {"pixels": np.zeros((1, 64), np.float32)}, ["label"]))
    n = 100_000
    print(f"{'case':44s} {'per call':>12s}")
    for label, call in [
        ("digits request: decode_request(msg)", lambda: codec.decode_request(digits, 1.0)),
        ("digits request: decode_request(msg, spec)", lambda: codec.decode_request(digits, 1.0, DIGITS)),
        ("digits request: heavy(msg)", lambda: codec.heavy(digits)),
        ("digits request: heavy(msg, wire_bytes)", lambda: codec.heavy(digits, 300)),
    ]:
        print(f"{label:44s} {best(call, n, repeat) * 1e6:9.3f} us")
    rng = np.random.default_rng(0)
    count = 1_000_000
    print(f"\n{'BYTES / typed, 1M elements':44s} {'elements/s':>12s}")
    for label, items in [
        ("BYTES, 16 bytes each", [b"0123456789abcdef"] * count),
        ("BYTES, 0-32 bytes", [b"x" * int(k) for k in rng.integers(0, 33, count)]),
    ]:
        buffer = serialize_bytes(np.array(items, dtype=object))
        seconds = best(lambda buffer=buffer: deserialize_bytes("s", buffer, count), 1, repeat)
        print(f"{label:44s} {count / seconds / 1e6:9.2f} M")
    typed = protos.ModelInferRequest()
    typed.inputs.add(name="x", datatype="FP32", shape=[count]).contents.fp32_contents.extend([0.5] * count)
    typed = wire(typed)
    seconds = best(lambda: codec.decode_request(typed), 1, repeat)
    print(f"{'typed fp32_contents':44s} {count / seconds / 1e6:9.2f} M")


if __name__ == "__main__":
    main()
