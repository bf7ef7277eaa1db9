"""The requests ``rapidserve bench`` sends: serialized once, repeated, or numbered to be distinct. Over gRPC
a request is a ModelInferRequest message; over HTTP it is the whole HTTP/1.1 request (head, JSON header,
binary tensor data), so that sending it is one write."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from rapidserve import protos
from rapidserve.clients._http1 import request_head
from rapidserve.clients._rest import encode_infer, model_path
from rapidserve.common import codec

__all__ = ["HOT_SET", "HttpTarget", "Payloads"]

HOT_SET = 256  # a duplicate repeats one of the last this-many distinct requests


@dataclass(frozen=True, slots=True)
class HttpTarget:
    """Where HTTP requests go: the ``Host`` header's value, the URL's path prefix, extra headers, and the
    request ``timeout`` parameter (microseconds) that stands for a deadline, which HTTP cannot carry."""

    authority: str
    prefix: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    timeout_us: int | None = None

    def request(self, model: str, version: str, batch: dict[str, np.ndarray[Any, Any]]) -> tuple[bytes, int]:
        """A whole inference request, and where in it the first input's binary data begins."""
        parameters = {"timeout": self.timeout_us} if self.timeout_us is not None else None
        encoded = encode_infer(batch, parameters=parameters)
        headers = [*encoded.headers().items(), *self.headers]
        path = self.prefix + model_path(model, version, "infer")
        head = request_head("POST", path, self.authority, headers, len(encoded.body))
        return head + encoded.body, len(head) + encoded.header_length


class Payloads:
    """Serialized ModelInferRequests, built once. ``get(i)`` is request i: the data rows in turn, or
    with a duplicate ratio, a new distinct request (its first element set to a running number) or,
    with probability ``duplicate_ratio``, a repeat of a recent one. ``http`` makes them HTTP requests."""

    def __init__(
        self,
        model: str,
        version: str,
        batches: list[dict[str, np.ndarray[Any, Any]]],
        duplicate_ratio: float | None = None,
        seed: int = 0,
        http: HttpTarget | None = None,
    ) -> None:
        self._http = http
        if http is None:
            self._messages = [
                codec.encode_request(model, b, model_version=version).SerializeToString() for b in batches
            ]
        else:
            requests = [http.request(model, version, b) for b in batches]
            self._messages = [message for message, _ in requests]
            self._http_offset = requests[0][1]
        self._ratio = duplicate_ratio
        self._rng = random.Random(seed)
        self._recent: list[bytes] = []
        if duplicate_ratio is not None:
            self._number_first_input(batches[0])

    def _number_first_input(self, batch: dict[str, np.ndarray[Any, Any]]) -> None:
        """Distinct requests carry a running number in the first one or two elements of the first input,
        as digits of a base every value of which the dtype holds exactly (2048 for FP16, 256 for UINT8)."""
        name, first = next(iter(batch.items()))
        if first.dtype.kind not in "iuf" or first.size == 0:
            raise ValueError(f"--duplicate-ratio numbers distinct requests in input '{name}', which needs numbers, "
                             f"not {first.dtype}")  # fmt: skip
        dtype = first.dtype
        if dtype.kind == "f":
            self._base = 2 ** (np.finfo(dtype).nmant + 1)
        else:
            info = np.iinfo(dtype)
            self._base = min(int(info.max), 2**31 - 1) + 1
        self._digits = min(first.size, 2)
        self._capacity = self._base**self._digits
        self._dtype = dtype
        message = self._messages[0]
        if self._http is None:
            # the first input's raw bytes come last but for the other inputs' (field 7, in input order)
            tail = sum(1 + len(protos.varint(a.nbytes)) + a.nbytes for a in batch.values())
            offset = len(message) - tail + 1 + len(protos.varint(first.nbytes))
        else:
            offset = self._http_offset  # binary data follows the JSON header, in input order
        width = self._digits * dtype.itemsize
        self._prefix, self._suffix = message[:offset], message[offset + width :]
        # a new place in the numbering on every run and worker, so an earlier run's requests miss the cache
        self._distinct = random.SystemRandom().randrange(self._capacity // 2)
        if self._first_input_data(self.distinct())[:width] != self._digits_of(self._distinct).tobytes():
            raise AssertionError("the numbered request does not hold its number where expected")

    def _first_input_data(self, message: bytes) -> bytes:
        """The first input's data as a server would read it from ``message`` (a check of the offset)."""
        if self._http is None:
            return bytes(protos.ModelInferRequest.FromString(message).raw_input_contents[0])
        head_end = message.index(b"\r\n\r\n") + 4
        length = next(int(line.split(b":")[1]) for line in message[:head_end].split(b"\r\n")
                      if line.lower().startswith(b"inference-header-content-length:"))  # fmt: skip
        header = json.loads(message[head_end : head_end + length])
        start = head_end + length
        return message[start : start + header["inputs"][0]["parameters"]["binary_data_size"]]

    def _digits_of(self, number: int) -> np.ndarray[Any, Any]:
        return np.array([(number // self._base**i) % self._base for i in range(self._digits)], self._dtype)

    def distinct(self) -> bytes:
        self._distinct += 1
        if self._distinct == self._capacity:
            warning = (f"warning: {self._digits} {self._dtype} element(s) number only {self._capacity} distinct "
                       "requests; numbering starts over, so later 'distinct' ones repeat earlier ones")  # fmt: skip
            print(warning, file=sys.stderr)
        return self._prefix + self._digits_of(self._distinct % self._capacity).tobytes() + self._suffix

    def get(self, index: int) -> bytes:
        if self._ratio is None:
            return self._messages[index % len(self._messages)]
        if self._recent and self._rng.random() < self._ratio:
            return self._recent[self._rng.randrange(len(self._recent))]
        payload = self.distinct()
        self._recent.append(payload)
        if len(self._recent) > HOT_SET:
            self._recent.pop(0)
        return payload
