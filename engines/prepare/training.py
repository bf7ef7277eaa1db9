"""A short training loop for the steps that fine-tune (pruning) or train a student (distillation).

Classifiers with labels learn from cross-entropy on the labels, mixed with the original model's soft
targets when distilling; everything else learns to reproduce the original's outputs (MSE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rapidserve.engines.prepare.context import Context
from rapidserve.engines.prepare.data import Dataset
from rapidserve.engines.prepare.runners import eval_mode

__all__ = ["fine_tune", "train"]


def fine_tune(ctx: Context, model: Any, variant: str, data: Dataset) -> Any:
    """Recover what a transformed model lost: from the labels when the original is a classifier
    with labels, else by matching the original's outputs."""
    teacher = None if (ctx.classifier and data.labels is not None) else ctx.source.module
    return train(model, data, epochs=ctx.recipe.finetune_epochs, teacher=teacher, classifier=ctx.classifier,
                 seed=ctx.recipe.seed, desc=f"{variant}: fine-tune")  # fmt: skip


def train(
    module: Any,
    data: Dataset,
    *,
    epochs: int,
    teacher: Any = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    classifier: bool = True,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    threads: int = 1,
    desc: str = "training",
    after_step: Callable[[], None] | None = None,
) -> Any:
    """Train ``module`` in place (AdamW, one-cycle schedule) and return it in eval mode. One thread by
    default: with a seed, the result is then the same on every run."""
    import torch
    import torch.nn.functional as F

    if epochs <= 0:
        return module.eval()
    torch.set_num_threads(threads)
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in data.inputs.values()]
    labels = None if data.labels is None else torch.from_numpy(data.labels.astype(np.int64).reshape(-1))
    steps_per_epoch = max(1, -(-len(data) // batch_size))
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    if teacher is not None:
        eval_mode(teacher)
    module.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False, unit="epoch", disable=None):
        order = torch.from_numpy(generator.permutation(len(data)))
        for start in range(0, len(data), batch_size):
            index = order[start : start + batch_size]
            inputs = [t[index] for t in tensors]
            output = _first(module(*inputs))
            target = None
            if teacher is not None:
                with torch.no_grad():
                    target = _first(teacher(*inputs))
            if classifier and labels is not None:
                loss = F.cross_entropy(output, labels[index])
                if target is not None:
                    soft = F.kl_div(
                        F.log_softmax(output / temperature, dim=1),
                        F.softmax(target / temperature, dim=1),
                        reduction="batchmean",
                    )
                    loss = alpha * temperature**2 * soft + (1 - alpha) * loss
            elif classifier and target is not None:  # no labels: the soft targets alone
                loss = temperature**2 * F.kl_div(
                    F.log_softmax(output / temperature, dim=1),
                    F.softmax(target / temperature, dim=1),
                    reduction="batchmean",
                )
            elif target is not None:
                loss = F.mse_loss(output, target)
            else:
                raise ValueError("without labels, training needs the original model's outputs as targets")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
    return module.eval()


def _first(result: Any) -> Any:
    return result[0] if isinstance(result, (tuple, list)) else result
