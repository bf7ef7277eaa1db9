"""``rapidserve prepare --demo``: a small CNN trained on scikit-learn's bundled 8x8 digits (no
download, seconds on two cores), prepared like any user model: from a factory and a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rapidserve.engines.prepare.data import Dataset

__all__ = [
    "DEMO_FACTORY",
    "DEMO_RECIPE",
    "DEMO_STUDENT",
    "digits_cnn",
    "digits_data",
    "digits_student",
    "train_teacher",
]

DEMO_FACTORY = "rapidserve.engines.prepare.demo:digits_cnn"
DEMO_STUDENT = "rapidserve.engines.prepare.demo:digits_student"
TEACHER_EPOCHS = 20
# the demo's recipe, beside the defaults: its own student, and the epochs that suit these small nets
DEMO_RECIPE = {"student": DEMO_STUDENT, "distill_epochs": 40, "finetune_epochs": 10}


def digits_cnn() -> Any:
    """Conv 32-64-(max pool)-128, global average pool, Linear 64, Linear 10: about 102k parameters.
    Input "image" FP32 [batch, 1, 8, 8] (pixels 0..1), output "logits" [batch, 10]."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )  # fmt: skip


def digits_student() -> Any:
    """The distillation student: conv 8-16-(max pool)-32 and two small Linear layers, about 7k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip


def digits_data(seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, validation): a stratified 75/25 split of the 1,797 digits, labels included."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the demo needs scikit-learn: pip install 'rapidserve[cpu]'") from exc
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    return Dataset({"image": x_train}, y_train), Dataset({"image": x_val}, y_val)


def train_teacher(train: Dataset, checkpoint: Path, seed: int = 0, epochs: int = TEACHER_EPOCHS) -> Path:
    """Train the demo CNN and save its ``state_dict`` (what users bring: a checkpoint)."""
    import torch

    from rapidserve.engines.prepare.training import train as fit

    torch.manual_seed(seed)  # the initial weights: the same teacher on every run
    model = fit(digits_cnn(), train, epochs=epochs, seed=seed, desc="demo: train the digits CNN")
    torch.save(model.state_dict(), checkpoint)
    return checkpoint
