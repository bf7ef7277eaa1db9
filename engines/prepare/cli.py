"""``rapidserve prepare``'s command line: arguments -> recipe, model, data -> ``pipeline.prepare``.

No traceback reaches the user: a failure is one line naming the file, the step and the reason, with
exit status 2; an unexpected one says to rerun with ``--log-level debug`` for the traceback."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from rapidserve._options import positive, positive_list
from rapidserve.engines.prepare.progress import DEBUG_HINT, PrepareError, Progress, one_line

__all__ = ["add_arguments", "run"]

_ERROR = "rapidserve prepare: error: "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", action="store_true", help="train a small CNN on scikit-learn's digits and prepare it")
    what.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="a function that builds the PyTorch model")
    what.add_argument("--model-file", type=Path, metavar="MODEL.pt2|MODEL.onnx", help="a torch.export program or ONNX")
    parser.add_argument("--weights", type=Path, help="a state_dict checkpoint for --model (loaded with weights_only)")
    parser.add_argument("--name", help="model name; variants become <NAME>-<variant> (default: digits for --demo)")
    parser.add_argument("--out", type=Path, required=True, help="the model repository to write (empty or new)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous prepare output in --out")
    parser.add_argument("--recipe", type=Path, help="a YAML recipe; flags given here win over it")
    parser.add_argument("--calib", type=Path, help="calibration inputs (.npz; default: training, else validation data)")
    parser.add_argument("--val", type=Path, help="validation inputs (.npz, with 'labels' when there are labels)")
    parser.add_argument("--train", type=Path, help="training data for the steps that fine-tune (.npz)")
    parser.add_argument("--variants", help="comma-separated variants to build (default: all)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-top1", type=float, metavar="POINTS", help="top-1 points a variant may lose (1.0)")
    budget.add_argument("--budget-cosine", type=float, metavar="MIN", help="mean cosine similarity to keep (0.99)")
    parser.add_argument(
        "--batch-sizes",
        type=positive_list(int),
        metavar="B1,B2",
        help="batch sizes to benchmark, e.g. 1,32; the largest picks the winner",
    )
    parser.add_argument(
        "--task",
        choices=("auto", "classify", "regress"),
        default="auto",
        help="how fidelity is judged: top-1 (classify) or cosine (regress); auto: classify when --val has labels",
    )
    parser.add_argument("--student", metavar="PKG.MODULE:FACTORY", help="the distillation student's architecture")
    parser.add_argument("--input-names", help="comma-separated input order of forward() (default: the .npz order)")
    parser.add_argument("--output-names", help="comma-separated output names (default: output, output_1, ...)")
    parser.add_argument("--bench-seconds", type=positive(float), help="seconds per timing (default 1)")
    parser.add_argument(
        "--threads", type=positive(int), help="intra-op threads for every variant while timing (default 1)"
    )
    parser.add_argument("--keep-rejected", action="store_true", default=None, help="write over-budget variants too")
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        default=None,
        help="an ONNX file with a fixed batch dimension: rewrite it to a dynamic one, checked against the original "
        "(default: prepare it at the batch size it fixes, written with max_batch_size 0)",
    )
    parser.add_argument("--log-level", default="WARNING")


def _split(text: str | None) -> tuple[Any, ...] | None:
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args, Progress())
    except KeyboardInterrupt:
        print("rapidserve prepare: interrupted", file=sys.stderr)
        return 130
    except PrepareError as exc:
        print(f"{_ERROR}{exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        logging.getLogger(__name__).debug("prepare failed", exc_info=True)
        print(f"{_ERROR}unexpected {one_line(exc)} ({DEBUG_HINT})", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, progress: Progress) -> int:
    try:
        from rapidserve.engines.prepare.data import load_npz
        from rapidserve.engines.prepare.demo import DEMO_FACTORY, DEMO_RECIPE, digits_data, train_teacher
        from rapidserve.engines.prepare.pipeline import prepare
        from rapidserve.engines.prepare.recipe import Recipe, load_recipe
        from rapidserve.engines.prepare.source import load_source
    except ImportError as exc:
        print(f"{_ERROR}prepare needs {exc.name}: pip install 'rapidserve[cpu,torch]'", file=sys.stderr)
        return 2
    overrides = {
        "variants": _split(args.variants),
        "budget_top1": args.budget_top1,
        "budget_cosine": args.budget_cosine,
        "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None,
        "student": args.student,
        "bench_seconds": args.bench_seconds,
        "threads": args.threads,
        "keep_rejected": args.keep_rejected,
        "dynamic_batch": args.dynamic_batch,
    }
    with tempfile.TemporaryDirectory(prefix="rapidserve-demo-") as tmp:
        try:
            name = args.name or ("digits" if args.demo else None)
            if not name:
                raise ValueError("--name is required (variants are written as <NAME>-<variant>)")
            if args.demo:
                with progress.step("training the demo model on scikit-learn's digits"):
                    train, val = digits_data()
                    factory, weights = DEMO_FACTORY, train_teacher(train, Path(tmp) / "digits-cnn.pt")
                for key, value in DEMO_RECIPE.items():
                    overrides[key] = overrides.get(key) or value
                calib = train
            else:
                if args.val is None:
                    raise ValueError("--val is required: every variant is checked against the original on it")
                order = _split(args.input_names) or ()
                with progress.step("reading the validation data", args.val):
                    val = load_npz(args.val, order)
                train = calib = None
                if args.train:
                    with progress.step("reading the training data", args.train):
                        train = load_npz(args.train, order)
                if args.calib:
                    with progress.step("reading the calibration data", args.calib):
                        calib = load_npz(args.calib, order)
                calib = calib or train or val
                factory, weights = args.model or "", args.weights
            overrides["name"] = name
            if args.recipe:
                with progress.step("reading the recipe", args.recipe):
                    recipe = load_recipe(args.recipe, **overrides)
            else:
                recipe = Recipe(**{k: v for k, v in overrides.items() if v is not None})
            source = load_source(
                name, val, factory=factory, weights=weights, model_file=args.model_file,
                output_names=_split(args.output_names) or (("logits",) if args.demo else ()), task=args.task,
                progress=progress, data_file=args.val or "the validation data",
            )  # fmt: skip
            names = [t.name for t in source.inputs]  # every dataset in the model's positional order
            calib_is_val, calib_is_train = calib is val, calib is train
            val = val.ordered(names)
            train = train.ordered(names) if train is not None else None
            calib = val if calib_is_val else train if calib_is_train else calib.ordered(names)
            report = prepare(
                source, recipe, calib=calib, val=val, train=train, out=args.out, overwrite=args.overwrite,
                progress=progress,
            )  # fmt: skip
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            print(f"{_ERROR}{exc}", file=sys.stderr)
            return 2
        if args.demo:
            val.save(args.out / "validation.npz")
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out}: serve it with  rapidserve serve --model-repository {args.out}")
    return 0 if report["recommended"] else 1
