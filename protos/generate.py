"""Regenerate ``_descriptor_set.py`` from the ``.proto`` files beside it.

Run ``python protos/generate.py`` after editing a ``.proto``; ``--check`` exits 1 when the
committed file is out of date. We ship a serialized descriptor set instead of ``*_pb2.py`` modules
because generated ``_pb2`` code registers into protobuf's default pool, where it would clash with
tritonclient's own ``inference`` package, and because generated code demands a protobuf runtime at
least as new as its generator: a descriptor set loads into any runtime the other packages pick.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_FILES = (
    "model_config.proto",
    "grpc_service.proto",
    "health.proto",
    "reflection_v1alpha.proto",
    "reflection_v1.proto",
)
OUTPUT = HERE / "_descriptor_set.py"

_HEADER = '''"""Serialized FileDescriptorSet of rapidserve's protos. Generated, do not edit.

Regenerate with ``python protos/generate.py``.
"""

import base64

DESCRIPTOR_SET = base64.b64decode(
'''


def compile_descriptor_set() -> bytes:
    """Compile the .proto files with grpcio-tools' protoc into a serialized FileDescriptorSet."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise RuntimeError("grpcio-tools is needed: pip install -e '.[dev]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.binpb"
        args = ["protoc", f"-I{HERE}", f"--descriptor_set_out={out}", *PROTO_FILES]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        return out.read_bytes()


def render(descriptor_set: bytes) -> str:
    encoded = base64.b64encode(descriptor_set).decode("ascii")
    lines = textwrap.wrap(encoded, 96)
    body = "".join(f'    "{line}"\n' for line in lines)
    return _HEADER + body + ")\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render(compile_descriptor_set())
    if "--check" in argv:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run python protos/generate.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
