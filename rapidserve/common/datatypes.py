"""The KServe v2 datatypes and their numpy, model-config and wire forms, in one table."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "BYTES",
    "CONTENTS_FIELD",
    "DATATYPES",
    "config_type_to_datatype",
    "datatype_of",
    "datatype_to_config_type",
    "numpy_dtype",
]

BYTES = "BYTES"

# v2 datatype -> numpy dtype. All fixed-size types are little-endian on the wire; BYTES tensors are
# numpy object arrays whose elements are ``bytes``.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    BYTES: np.dtype(object),
}

# v2 datatype -> the InferTensorContents field that carries it typed. FP16/BF16 travel only raw.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}

# model_config.proto's DataType enum values, in v2 order (TYPE_STRING is "BYTES" on the wire).
_CONFIG_TYPES = {
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    BYTES: 13,
    "BF16": 14,
}
_DATATYPE_OF_CONFIG = {number: name for name, number in _CONFIG_TYPES.items()}
_DATATYPE_OF_DTYPE = {dtype: name for name, dtype in DATATYPES.items() if name != BYTES}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a v2 datatype string; ``ValueError`` names the valid ones."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}") from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a numpy dtype (object, str and bytes arrays are BYTES)."""
    if dtype.kind in "OSU":
        return BYTES
    name = _DATATYPE_OF_DTYPE.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if name is None:
        raise ValueError(f"numpy dtype {dtype} has no v2 datatype")
    return name


def config_type_to_datatype(config_type: int) -> str:
    """``TYPE_FP32`` (as its enum number) -> ``"FP32"``."""
    try:
        return _DATATYPE_OF_CONFIG[config_type]
    except KeyError:
        raise ValueError(f"invalid data_type {config_type} in model config") from None


def datatype_to_config_type(datatype: str) -> int:
    return _CONFIG_TYPES[datatype]
