"""`rapidserve prepare` on small models built here: every CPU step, the budget, the repository it
writes, and the inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from testmodels import classification_data

from rapidserve.cli import main

pytestmark = pytest.mark.timeout(300)
torch = pytest.importorskip("torch", reason="prepare needs the torch extra")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny classifier's checkpoint, and train/val .npz files with labels."""
    from testmodels import tiny_classifier

    from rapidserve.engines.prepare.data import Dataset
    from rapidserve.engines.prepare.training import train

    folder = tmp_path_factory.mktemp("classifier")
    x, y = classification_data(1200)
    train_set, val_set = Dataset({"x": x[:900]}, y[:900]), Dataset({"x": x[900:]}, y[900:])
    torch.manual_seed(0)
    model = train(tiny_classifier(), train_set, epochs=15, desc="test")
    torch.save(model.state_dict(), folder / "weights.pt")
    train_set.save(folder / "train.npz")
    val_set.save(folder / "val.npz")
    return {"weights": folder / "weights.pt", "train": folder / "train.npz", "val": folder / "val.npz"}


def prepare(*args: str) -> int:
    return main(["prepare", "--bench-seconds", "0.02", "--batch-sizes", "1,8", *args])


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_gate_follows_the_metrics(result: dict, *, cosine: float | None = None, top1_points: float | None = None):
    """What prepare promises, whatever the CPU's numeric kernels give: each built variant is accepted
    exactly when the metric it reports is within the budget, and the recommended variant is accepted.
    (A fixed verdict on an INT8 variant would depend on the CPU: VNNI or not.)"""
    original = result["original"]
    for v in result["variants"]:
        if v["status"] != "built":
            continue
        if cosine is not None:
            within = v["cosine_mean"] >= cosine
        else:
            lost = original["top1"] - v["top1"] if "top1" in original else 100 - v["agreement"]
            within = lost <= top1_points + 1e-9
        assert v["accepted"] == within, (v["name"], v.get("reason"), v.get("cosine_mean"), v.get("top1"))
    recommended = [v for v in result["variants"] if v["recommended"]]
    assert len(recommended) == (1 if any(v["accepted"] for v in result["variants"]) else 0)
    assert all(v["accepted"] for v in recommended)


def test_every_cpu_step_builds_validates_and_writes_a_repository(classifier: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "repo"
    code = prepare(
        "--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]), "--name", "tiny",
        "--val", str(classifier["val"]), "--train", str(classifier["train"]), "--out", str(out),
        "--student", "testmodels:tiny_student", "--budget-top1", "3",
    )  # fmt: skip
    assert code == 0
    result = report(out)
    by_name = {v["name"]: v for v in result["variants"]}
    for name in ("torch-fp32", "onnx-fp32", "ort-int8", "ort-int8-dynamic", "onnx-fp16", "torch-int8-dynamic",
                 "pruned", "pruned-unstructured", "distilled", "lowrank"):  # fmt: skip
        entry = by_name[name]
        assert entry["status"] == "built", (name, entry.get("reason"))
        for key in ("kind", "accepted", "top1", "agreement", "cosine_mean", "max_abs_err", "size_bytes",
                    "p50_ms_batch1", "throughput_per_s", "recommended"):  # fmt: skip
            assert key in entry, (name, key)
        assert set(entry["throughput_per_s"]) == {"1", "8"}
        if entry["accepted"]:
            model = out / f"tiny-{name}"
            assert (model / "config.pbtxt").is_file() and any((model / "1").iterdir())
        else:
            assert entry["reason"] and not (out / f"tiny-{name}").exists()
    # exports are exact; every other verdict follows from its metric
    assert by_name["onnx-fp32"]["agreement"] == 100.0 and by_name["onnx-fp32"]["max_abs_err"] < 1e-4
    assert_gate_follows_the_metrics(result, top1_points=3)
    assert sum(v["recommended"] for v in result["variants"]) == 1
    best = max((v for v in result["variants"] if v["accepted"]), key=lambda v: v["throughput_per_s"]["8"])
    assert best["recommended"] and result["recommended"] == f"tiny-{best['name']}"
    for name in ("tensorrt-fp16", "tensorrt-int8"):
        assert by_name[name]["status"] == "skipped" and "TensorRT" in by_name[name]["reason"]
    assert (out / "report.md").read_text().count("| tiny") == 0  # rows are variant names
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tight_budget_rejects_and_the_repository_keeps_only_accepted_variants(
    classifier: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    code = prepare(
        "--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]), "--name", "tiny",
        "--val", str(classifier["val"]), "--train", str(classifier["train"]), "--out", str(out),
        "--variants", "onnx-fp32,pruned", "--budget-top1", "0",
    )  # fmt: skip
    assert code == 0
    by_name = {v["name"]: v for v in report(out)["variants"]}
    assert by_name["onnx-fp32"]["accepted"]  # an exact export loses nothing
    pruned = by_name["pruned"]
    if pruned["top1"] < by_name["onnx-fp32"]["top1"]:
        assert not pruned["accepted"] and "points under" in pruned["reason"]
        assert not (out / "tiny-pruned").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        f"tiny-{n}" for n, v in by_name.items() if v["accepted"]
    )


def test_an_onnx_model_gets_the_onnx_steps_and_the_others_say_why_not(tmp_path: Path) -> None:
    from testmodels import tiny_regressor

    from rapidserve.engines.prepare.data import Dataset

    rng = np.random.default_rng(0)
    val = Dataset({"features": rng.standard_normal((200, 8)).astype(np.float32)})
    val.save(tmp_path / "val.npz")
    torch.manual_seed(0)
    model = tiny_regressor().eval()
    with pytest.warns(DeprecationWarning):  # the legacy exporter, as a user might still use it
        torch.onnx.export(model, (torch.zeros(2, 8),), str(tmp_path / "model.onnx"), dynamo=False,
                          input_names=["features"], output_names=["y"], dynamic_axes={"features": {0: "b"}, "y": {0: "b"}})  # fmt: skip
    out = tmp_path / "repo"
    code = prepare("--model-file", str(tmp_path / "model.onnx"), "--name", "reg", "--val", str(tmp_path / "val.npz"),
                   "--out", str(out), "--variants", "onnx-fp32,ort-int8,onnx-fp16,pruned,torch-int8-dynamic")  # fmt: skip
    assert code == 0
    result = report(out)
    assert "cosine" in result["budget"] and result["task"] == "regress"  # no labels: judged by cosine
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["onnx-fp32"]["cosine_mean"] == pytest.approx(1.0)
    assert "top1" not in by_name["onnx-fp32"]  # no labels
    assert by_name["ort-int8"]["status"] == "built" and by_name["onnx-fp16"]["status"] == "built"
    for name in ("pruned", "torch-int8-dynamic"):
        assert by_name[name]["status"] == "skipped" and "PyTorch model" in by_name[name]["reason"]
    config = (out / "reg-onnx-fp32" / "config.pbtxt").read_text()
    assert 'name: "features"' in config and 'name: "y"' in config and "dims: [ 3 ]" in config


def test_a_torch_export_program_is_prepared_from_its_own_signature(tmp_path: Path) -> None:
    from testmodels import tiny_regressor

    from rapidserve.engines.prepare.data import Dataset

    rng = np.random.default_rng(1)
    Dataset({"x": rng.standard_normal((64, 8)).astype(np.float32)}).save(tmp_path / "val.npz")
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.manual_seed(0)
    program = torch.export.export(tiny_regressor().eval(), (torch.zeros(4, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    out = tmp_path / "repo"
    code = prepare("--model-file", str(tmp_path / "model.pt2"), "--name", "prog", "--val", str(tmp_path / "val.npz"),
                   "--out", str(out), "--variants", "onnx-fp32,torch-fp32,ort-int8,pruned")  # fmt: skip
    assert code == 0
    result = report(out)
    by_name = {v["name"]: v for v in result["variants"]}
    for name in ("onnx-fp32", "torch-fp32"):  # exact exports: within any budget on any CPU
        assert by_name[name]["accepted"], (name, by_name[name].get("reason"))
    assert by_name["ort-int8"]["status"] == "built"
    assert_gate_follows_the_metrics(result, cosine=0.99)
    assert by_name["onnx-fp32"]["max_abs_err"] < 1e-4
    assert by_name["pruned"]["status"] == "skipped" and "not a .pt2" in by_name["pruned"]["reason"]


def test_bad_inputs_are_refused_with_a_message(classifier: dict[str, Path], tmp_path: Path, capsys) -> None:
    common = ["--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]), "--name", "t"]
    assert prepare(*common, "--out", str(tmp_path / "a")) == 2
    assert "--val is required" in capsys.readouterr().err
    assert prepare(*common, "--val", str(classifier["val"]), "--out", str(tmp_path / "b"), "--variants", "nope") == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep me")
    args = [*common, "--val", str(classifier["val"]), "--variants", "onnx-fp32"]
    assert prepare(*args, "--out", str(tmp_path / "c")) == 2
    assert "not empty" in capsys.readouterr().err
    assert prepare(*args, "--out", str(tmp_path / "c"), "--overwrite") == 2
    assert (tmp_path / "c" / "precious.txt").exists()  # not a previous prepare output: left alone
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("variants: [onnx-fp32]\nbatch_sizes: [1, 4]\nbogus: 1\n")
    assert prepare(*args, "--out", str(tmp_path / "d"), "--recipe", str(recipe)) == 2
    assert "unknown recipe key(s) bogus" in capsys.readouterr().err


def test_a_recipe_file_sets_what_flags_do_not(classifier: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("variants: [onnx-fp32, ort-int8]\nbudget_top1: 2.5\ncalibration: percentile\n")
    out = tmp_path / "repo"
    code = main(["prepare", "--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]),
                 "--name", "r", "--val", str(classifier["val"]), "--out", str(out), "--recipe", str(recipe),
                 "--bench-seconds", "0.02", "--batch-sizes", "2"])  # fmt: skip
    assert code == 0
    result = report(out)
    assert [v["name"] for v in result["variants"]] == ["onnx-fp32", "ort-int8"]
    assert result["budget"] == "at most 2.5 point(s) of top-1 lost" and result["batch_sizes"] == [2]
    assert "percentile calibration" in result["variants"][1]["notes"][0]


def test_fidelity_rejects_broken_outputs() -> None:
    from rapidserve.engines.prepare.fidelity import budget_check, compare
    from rapidserve.engines.prepare.recipe import Recipe

    rng = np.random.default_rng(0)
    reference = [rng.standard_normal((50, 4)).astype(np.float32)]
    recipe = Recipe("m")
    original = compare(reference, reference, None, scores=False)
    for broken, why in ((np.zeros((50, 4), np.float32), "cosine"), (np.full((50, 4), np.nan, np.float32), "NaN")):
        metrics = compare(reference, [broken], None, scores=False)
        assert why in budget_check(metrics, original, recipe, classifier=False)
    same = compare(reference, [reference[0].copy()], None, scores=False)
    assert budget_check(same, original, recipe, classifier=False) == "" and same["cosine_min"] == pytest.approx(1.0)
    # one value per sample: compared as whole columns, so a flipped sign is not a perfect match
    column = rng.standard_normal((50, 1)).astype(np.float32)
    assert compare([column], [-column], None, scores=False)["cosine_mean"] == pytest.approx(-1.0)


def test_a_variant_over_budget_is_rejected_and_not_written(classifier: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("variants: [onnx-fp32, lowrank]\nlowrank_ratio: 0.01\nfinetune_epochs: 0\n")  # rank 1
    out = tmp_path / "repo"
    assert prepare("--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]), "--name", "t",
                   "--val", str(classifier["val"]), "--train", str(classifier["train"]), "--out", str(out),
                   "--recipe", str(recipe)) == 0  # fmt: skip
    by_name = {v["name"]: v for v in report(out)["variants"]}
    lowrank = by_name["lowrank"]
    assert lowrank["status"] == "built" and not lowrank["accepted"] and "points under" in lowrank["reason"]
    assert not (out / "t-lowrank").exists() and (out / "t-onnx-fp32").is_dir()
    assert by_name["onnx-fp32"]["recommended"]


def test_a_failing_variant_leaves_the_others_and_torch_settings_alone(
    classifier: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rapidserve.engines.prepare import pipeline
    from rapidserve.engines.prepare.context import Built

    def broken(ctx):  # builds a file that is not a model: validation fails after the build
        path = ctx.file("onnx-fp16", ".onnx")
        path.write_bytes(b"not an onnx model")
        return Built(path, "onnx")

    monkeypatch.setitem(pipeline.STEPS, "onnx-fp16", ("onnx-fp16", broken))
    threads = torch.get_num_threads()
    out = tmp_path / "repo"
    assert prepare("--model", "testmodels:tiny_classifier", "--weights", str(classifier["weights"]), "--name", "t",
                   "--val", str(classifier["val"]), "--out", str(out), "--variants", "onnx-fp16,onnx-fp32",
                   "--threads", "1") == 0  # fmt: skip
    by_name = {v["name"]: v for v in report(out)["variants"]}
    assert by_name["onnx-fp16"]["status"] == "failed" and by_name["onnx-fp32"]["accepted"]
    assert torch.get_num_threads() == threads


def test_inputs_bind_by_name_and_a_relative_model_path_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from testmodels import TwoInputs

    from rapidserve.engines.prepare.data import Dataset

    rng = np.random.default_rng(2)
    b, a = rng.standard_normal((64, 3)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)
    Dataset({"b": b, "a": a}).save(tmp_path / "val.npz")  # not the program's order
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.manual_seed(0)
    program = torch.export.export(TwoInputs().eval(), (torch.zeros(4, 8), torch.zeros(4, 3)),
                                  dynamic_shapes=({0: batch}, {0: batch}))  # fmt: skip
    torch.export.save(program, str(tmp_path / "two.pt2"))
    monkeypatch.chdir(tmp_path)
    assert prepare("--model-file", "two.pt2", "--name", "two", "--val", "val.npz", "--out", "repo",
                   "--variants", "onnx-fp32,ort-int8") == 0  # fmt: skip
    result = report(tmp_path / "repo")
    assert [i["name"] for i in result["inputs"]] == ["a", "b"]
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["onnx-fp32"]["max_abs_err"] < 1e-5 and by_name["ort-int8"]["status"] == "built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo", "two.pt2", "val.npz"]  # nothing left behind
