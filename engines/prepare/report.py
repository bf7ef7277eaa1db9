"""The report of a prepare run: ``report.json`` (for programs), ``report.md`` (for people) and
``report.png`` (accuracy against latency and throughput, one point per variant)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _fidelity(v: dict[str, Any]) -> str:
    parts = []
    if "top1" in v:
        parts.append(f"top-1 {v['top1']:.2f}%")
    if "agreement" in v:
        parts.append(f"agrees {v['agreement']:.1f}%")
    if "cosine_mean" in v:
        parts.append(f"cos {v['cosine_mean']:.4f}")
    return ", ".join(parts)


def _markdown(report: dict[str, Any]) -> str:
    sizes = [str(b) for b in report["batch_sizes"]]
    original = report["original"]
    lines = [
        f"# rapidserve prepare: {report['model']}",
        "",
        f"{report['created']} on {report['machine']}. Every figure below comes from this one run: "
        f"in-process, {report['threads']} thread(s), the same validation data ({report['validation_samples']} "
        f"samples) for every variant.",
        "",
        f"Budget: {report['budget']}. Recommended: the fastest accepted variant at batch {report['target_batch']} "
        f"(throughput): **{report['recommended'] or 'none'}**.",
        "",
        f"Batching: {report.get('batching', 'dynamic batch dimension')}.",
        "",
        f"Original ({'PyTorch eager' if report['source'] == 'pytorch' else 'ONNX Runtime'}): "
        f"{_fidelity(original) or '-'}, p50 at batch 1 {original['p50_ms_batch1']:.3f} ms, "
        + ", ".join(f"{original['throughput_per_s'][b]:,.0f}/s at batch {b}" for b in sizes),
        "",
        "| variant | kind | accepted | fidelity | size KB | p50 ms b1 | "
        + " | ".join(f"infer/s b{b}" for b in sizes)
        + f" | x original b{report['target_batch']} | memory MB | notes |",
        "|---|---|---|---|---|---|" + "---|" * len(sizes) + "---|---|---|",
    ]
    for v in report["variants"]:
        if v["status"] != "built":
            continue
        mark = "**recommended**" if v["recommended"] else ("yes" if v["accepted"] else f"no: {v.get('reason', '')}")
        lines.append(
            f"| {v['name']} | {v['kind']} | {mark} | {_fidelity(v)} | {v['size_bytes'] / 1024:,.0f} | "
            f"{v['p50_ms_batch1']:.3f} | "
            + " | ".join(f"{v['throughput_per_s'][b]:,.0f}" for b in sizes)
            + f" | {v['speedup']:.2f} | {v['memory_added_mb']:.1f} | {'; '.join(v['notes'])} |"
        )
    others = [v for v in report["variants"] if v["status"] != "built"]
    if others:
        lines += ["", "Not built:", ""]
        lines += [f"- {v['name']} ({v['status']}): {v['reason']}" for v in others]
    lines += [
        "",
        "Fidelity is measured against the original on the validation data: top-1 accuracy with labels, "
        "top-1 agreement with the original's predictions, and the mean cosine similarity of the outputs. "
        "Memory is the resident memory the variant added while loaded and running in this process.",
        "",
        "![accuracy vs latency](report.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    built = [v for v in report["variants"] if v["status"] == "built"]
    key = "top1" if "top1" in report["original"] else ("agreement" if "agreement" in report["original"] else None)
    label = {"top1": "top-1 accuracy (%)", "agreement": "top-1 agreement with the original (%)"}.get(
        key or "", "mean cosine similarity to the original"
    )
    key = key or "cosine_mean"
    target = str(report["target_batch"])
    from matplotlib.ticker import NullFormatter

    palette = plt.get_cmap("tab20").colors
    colors = palette[0::2] + palette[1::2]  # the ten strong colors first, then their light twins
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, x_of, x_label in (
        (axes[0], lambda v: v["p50_ms_batch1"], "p50 latency at batch 1 (ms)"),
        (axes[1], lambda v: v["throughput_per_s"][target], f"throughput at batch {target} (inferences/s)"),
    ):
        original = report["original"]
        if key in original:
            axis.scatter([x_of(original)], [original[key]], marker="s", color="black", s=60, label="original")
        for index, v in enumerate(built):  # one color per variant, named in the legend: labels never overlap
            marker = "*" if v["recommended"] else ("o" if v["accepted"] else "X")
            state = "recommended" if v["recommended"] else ("accepted" if v["accepted"] else "over budget")
            axis.scatter([x_of(v)], [v[key]], color=colors[index % len(colors)], marker=marker,
                         s=180 if v["recommended"] else 60, edgecolors="black", linewidths=0.5,
                         label=f"{v['name']} ({state})")  # fmt: skip
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels of a log axis run into each other
        axis.set_xlabel(x_label)
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(f"{report['model']}: o accepted, X over budget, * recommended")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    _plot(report, out / "report.png")
