"""Shared pieces of the examples and benchmarks: MNIST-1D data, a tiny timm ViT for it, a classifier.

MNIST-1D (Greydanus 2020) is generated offline by the ``mnist1d`` package: 4,000 training and 1,000 test
signals of length 40, 10 classes. Published baselines: logistic regression 32%, MLP 68%, CNN 94%.
Signals are shaped ``[B, 1, 1, 40]`` so that a timm ViT with ``(1, 4)`` patches sees 10 tokens.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


# 8: the DMS benchmarks' data-rich protocol uses five draws per fit (42, 43 and the --train-draws 44-46)
@functools.lru_cache(maxsize=8)
def mnist1d_tensors(seed: int = 42) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` with x shaped ``[N, 1, 1, 40]`` (generated, no download)."""
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    state = np.random.get_state()  # make_dataset reseeds numpy globally; leave the caller's RNG alone
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)

    def x(a):
        return torch.as_tensor(a, dtype=torch.float32).reshape(-1, 1, 1, a.shape[-1])

    def y(a):
        return torch.as_tensor(a, dtype=torch.long)

    return x(data["x"]), y(data["y"]), x(data["x_test"]), y(data["y_test"])


# MNIST-1D's own draw (its test signals validate every run) and the draw the DMS benchmarks validate on as well.
VALIDATION_DRAWS = (42, 43)


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D train/val loaders. Shuffling uses a seeded generator so runs are reproducible.

    ``train_draws``: generator seeds of further MNIST-1D draws (the same templates, fresh noise and transforms)
    whose every signal (train and test parts, 5,000 a draw) is appended to the training set, in the order given:
    the data-rich protocol, e.g. ``(44, 45, 46)``: 19,000 training signals. The validation draws 42 and 43 are
    refused. Validation is always MNIST-1D's 1,000 test signals (draw 42).
    """

    def __init__(
        self,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        limit_train: int | None = None,
        train_draws: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        train_draws = tuple(train_draws)
        if set(VALIDATION_DRAWS) & set(train_draws):
            raise ValueError(
                f"train_draws {train_draws} must not include the validation draws 42 and 43: their signals are "
                "validation data; pick other generator seeds (e.g. 44 45 46)"
            )
        if len(set(train_draws)) != len(train_draws):
            raise ValueError(f"train_draws {train_draws} repeats a draw; list each generator seed once")
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.shuffle, self.limit_train, self.train_draws = shuffle, limit_train, train_draws

    def setup(self, stage: str | None = None) -> None:
        xtr, ytr, xte, yte = mnist1d_tensors()
        if self.limit_train is not None:
            xtr, ytr = xtr[: self.limit_train], ytr[: self.limit_train]
        if self.train_draws:
            xs, ys = [xtr], [ytr]
            for draw in self.train_draws:
                xa, ya, xb, yb = mnist1d_tensors(draw)
                xs += [xa, xb]
                ys += [ya, yb]
            xtr, ytr = torch.cat(xs), torch.cat(ys)
        self.train_set, self.val_set = TensorDataset(xtr, ytr), TensorDataset(xte, yte)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=500, num_workers=self.num_workers)


def quiet_trainer(max_epochs: int, callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    """A one-process CPU ``Trainer`` without logger, checkpoints, progress bar or model summary; ``options`` are
    further ``Trainer`` arguments (e.g. ``num_sanity_val_steps=0``)."""
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **options,
    )


def make_vit(
    depth: int = 2,
    embed_dim: int = 64,
    num_heads: int = 4,
    mlp_ratio: float = 2.0,
    init_values: float | None = None,
    drop_path_rate: float = 0.0,
    num_classes: int = 10,
) -> nn.Module:
    """A small timm VisionTransformer for MNIST-1D: ``(1, 4)`` patches of a ``1 x 40`` signal, class token."""
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(1, 40),
        patch_size=(1, 4),
        in_chans=1,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        init_values=init_values,
        drop_path_rate=drop_path_rate,
    )


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around any ``model``: AdamW with a decay/no-decay split, per-step cosine LR."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        max_epochs: int = 10,
        warmup_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.max_epochs = lr, weight_decay, max_epochs
        self.warmup_fraction = warmup_fraction
        self.example_input_array = torch.zeros(2, 1, 1, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token")) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_fraction * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
