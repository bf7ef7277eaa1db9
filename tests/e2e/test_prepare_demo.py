"""`rapidserve prepare --demo`, then `rapidserve serve` on what it wrote: tritonclient gets, from every
accepted variant, the accuracy the report gave it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from remote import RemoteServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
pytest.importorskip("torch", reason="prepare needs the torch extra")


def test_the_demo_repository_serves_every_accepted_variant_with_its_reported_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    done = subprocess.run(
        [sys.executable, "-m", "rapidserve", "prepare", "--demo", "--out", str(out), "--bench-seconds", "0.05"],
        capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # not a terminal: a line per step with its elapsed seconds, and nothing else (no warnings, no bars)
    lines = done.stderr.splitlines()
    assert [line for line in lines if not line.startswith("prepare [")] == []
    assert any(line.endswith("training the demo model on scikit-learn's digits: started") for line in lines)
    assert sum(": done in " in line for line in lines) >= 4
    report = json.loads((out / "report.json").read_text())
    assert "Recommended" in done.stdout and report["recommended"] in done.stdout
    by_name = {v["name"]: v for v in report["variants"]}
    for name in ("onnx-fp32", "ort-int8", "torch-int8-dynamic", "pruned", "distilled"):
        assert by_name[name]["status"] == "built", (name, by_name[name].get("reason"))
    assert report["original"]["top1"] > 95  # a real classifier, trained here on scikit-learn's digits
    assert sum(v["recommended"] for v in report["variants"]) == 1
    served = [v for v in report["variants"] if v["model"]]
    assert {v["model"] for v in served} == {p.name for p in out.iterdir() if p.is_dir()}
    assert all(v["accepted"] for v in served)

    validation = np.load(out / "validation.npz")
    images, labels = validation["image"], validation["labels"]
    server = RemoteServer("--model-repository", str(out))
    try:
        client = tc.InferenceServerClient(server.url)
        server.wait_ready(client, timeout_s=120)
        for variant in served:
            predicted = []
            for start in range(0, len(images), 32):
                batch = images[start : start + 32]
                tensor = tc.InferInput("image", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(batch)
                predicted.append(client.infer(variant["model"], [tensor]).as_numpy("logits").argmax(axis=1))
            accuracy = 100 * float((np.concatenate(predicted) == labels).mean())
            assert accuracy == pytest.approx(variant["top1"], abs=100 / len(labels) + 1e-9), variant["model"]
        client.close()
    finally:
        assert server.stop() == 0
