"""Everything GPU-related in one run of under four minutes, for a lent GPU machine: the GPU tests,
then a ResNet-50-shaped model (random weights, defined here) in process and served.

1. ``pytest -m gpu``: every GPU engine against its CPU reference (FP16 within tolerance).
2. In process, one CUDA stream: eager FP32, FP16, and FP16 with CUDA graphs at batch 1..128:
   throughput and latency.
3. Served by ``rapidserve serve`` (PyTorch engine, KIND_GPU, FP16, CUDA graphs, dynamic batching up
   to 128) and driven by ``rapidserve bench`` at concurrency 1, 16, 64 and 256: throughput and p99,
   and the ratio to the in-process FP16 + graphs throughput at the batch size the server formed.
ONNX Runtime on CUDA and TensorRT are reported as not checked where onnxruntime-gpu or tensorrt are
absent. Runs from the source tree where rapidserve is not installed (it links the folders into a
temporary ``rapidserve`` package), with whatever torch the machine has.

    python benchmarks/gpu_check.py [--seconds 2] [--skip-tests] [--frontends N]

``--frontends N`` serves with N front-end processes in front of the engine process (``serve --frontends``);
run it at 1 and at 4 to compare what each serves against the in-process rate.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 8, 32, 128)
CONCURRENCY = (1, 16, 64, 256)


def importable_source_tree(tmp: Path) -> str:
    """A folder from which ``import rapidserve`` loads this source tree (for machines where it is not
    installed): a ``rapidserve`` package of links to the top-level folders, as pyproject maps them."""
    package = tmp / "rapidserve"
    package.mkdir()
    for entry in (ROOT / "rapidserve").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in ("server", "engines", "clients", "protos"):
        (package / folder).symlink_to(ROOT / folder)
    return str(tmp)


def resnet50() -> Any:
    """ResNet-50's shape (bottleneck blocks 3-4-6-3, 224x224 input, 1000 classes), random weights."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
            )  # fmt: skip
            self.skip = (
                nn.Identity()
                if stride == 1 and c_in == c_out
                else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    layers: list[Any] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(c_in, width, stride if i == 0 else 1))
            c_in = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def in_process(seconds: float) -> dict[str, dict[int, tuple[float, float]]]:
    """mode -> batch -> (images/s, ms per batch)."""
    import torch

    from rapidserve.engines.torch_cuda import CudaRunner

    results: dict[str, dict[int, tuple[float, float]]] = {}
    for mode, precision, graphs in (("eager fp32", "fp32", False), ("fp16", "fp16", False),
                                    ("fp16 + graphs", "fp16", True)):  # fmt: skip
        runner = CudaRunner(torch, resnet50(), torch.device("cuda:0"), precision=precision, graphs=graphs,
                            max_batch=max(BATCHES), buckets=",".join(map(str, BATCHES)))  # fmt: skip
        results[mode] = {}
        for batch in BATCHES:
            x = torch.randn(batch, 3, 224, 224)
            for _ in range(3):
                runner([x])
            times = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 3:
                start = time.perf_counter()
                runner([x])
                times.append(time.perf_counter() - start)
            median = sorted(times)[len(times) // 2]
            results[mode][batch] = (batch / median, median * 1000)
        del runner
        torch.cuda.empty_cache()
    return results


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """rapidserve's own bucket rule, imported here: rapidserve may become importable only once
    ``main`` has linked the source tree."""
    from rapidserve.engines.buckets import bucket_for as choose

    return choose(batch, buckets)


def served(seconds: float, tmp: Path, frontends: int = 1) -> list[dict[str, Any]]:
    import torch

    repo = tmp / "repo"
    (repo / "resnet50" / "1").mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=max(BATCHES))
    program = torch.export.export(resnet50(), (torch.zeros(2, 3, 224, 224),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(repo / "resnet50" / "1" / "model.pt2"))
    (repo / "resnet50" / "config.pbtxt").write_text(
        f"max_batch_size: {max(BATCHES)}\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "instance_group [ { kind: KIND_GPU, count: 1, gpus: [ 0 ] } ]\n"
        "optimization { cuda { graphs: true } }\n"
        'parameters { key: "precision" value: { string_value: "fp16" } }\n'
        f'parameters {{ key: "cuda_graph_batch_sizes" value: {{ string_value: "{",".join(map(str, BATCHES))}" }} }}\n'
    )
    env = dict(os.environ)
    log_path = tmp / "server.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "rapidserve", "serve", "--model-repository", str(repo), "--grpc-port", "18601",
             "--metrics-port", "0", "--host", "127.0.0.1", "--frontends", str(frontends)],
            stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
    rows = []
    try:
        deadline = time.monotonic() + 90
        while "server ready" not in log_path.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        out = tmp / "bench.json"
        levels = ",".join(map(str, CONCURRENCY))
        subprocess.run(
            [sys.executable, "-m", "rapidserve", "bench", "resnet50", "--url", "127.0.0.1:18601", "--concurrency",
             levels, "--measurement-interval", str(int(seconds * 1000)), "--max-trials", "4", "--quiet", "--out",
             str(out), "--workers", "4"],
            check=True, env=env, timeout=150,
        )  # fmt: skip
        rows = json.loads(out.read_text())
    finally:
        server.terminate()
        server.wait(30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--frontends", type=int, default=1, help="the server's front-end processes")
    args = parser.parse_args()
    if importlib.util.find_spec("rapidserve.server") is None:  # not installed: use this source tree
        shim = importable_source_tree(Path(tempfile.mkdtemp(prefix="rapidserve-src-")))
        sys.path.insert(0, shim)
        os.environ["PYTHONPATH"] = f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here")
        return 1
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for name, what in (("tensorrt", "TensorRT engine"), ("onnxruntime", "ONNX Runtime CUDA")):
        spec = importlib.util.find_spec(name)
        ok = spec is not None and (name != "onnxruntime" or "CUDAExecutionProvider" in
                                   __import__("onnxruntime").get_available_providers())  # fmt: skip
        print(f"{what}: {'installed: see the gpu tests' if ok else 'not checked (not installed with GPU support)'}")
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")], cwd=ROOT)
        print(f"gpu tests: exit code {tests.returncode}")
    local = in_process(args.seconds)
    print("\nResNet-50 shape, in process (images/s, ms per batch)")
    print("mode            " + "".join(f"{'b' + str(b):>18}" for b in BATCHES))
    for mode, by_batch in local.items():
        print(f"{mode:16}" + "".join(f"{rate:>10,.0f} {ms:6.2f}ms" for rate, ms in by_batch.values()))
    with tempfile.TemporaryDirectory() as tmp:
        rows = served(args.seconds, Path(tmp), args.frontends)
    graphs = local["fp16 + graphs"]
    print(f"\nserved (PyTorch engine, FP16, CUDA graphs, batching, {args.frontends} front ends), rapidserve bench")
    print(f"{'conc':>5} {'infer/s':>9} {'p99 ms':>8} {'avg batch':>10} {'x in-process':>13}")
    for row in rows:
        avg = row.get("server_avg_batch") or 1
        bucket = bucket_for(round(avg), BATCHES) or max(BATCHES)  # the graph the server's batches replayed
        print(f"{row['concurrency']:>5} {row['infer_per_s']:>9,.0f} {row['p99_ms']:>8.1f} {avg:>10.1f} "
              f"{row['infer_per_s'] / graphs[bucket][0]:>13.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
