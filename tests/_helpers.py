"""Small helpers shared by the tests: a quiet CPU Trainer and a hash of a module's tensors."""

from __future__ import annotations

import hashlib
from typing import Any

import lightning.pytorch as pl
from torch import nn


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary, unless ``kwargs`` say otherwise."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def tensor_hash(module: nn.Module, parameters_only: bool = False) -> str:
    """SHA-256 over names and bytes of every parameter (and buffer, unless ``parameters_only``), in order."""
    tensors = module.named_parameters() if parameters_only else module.state_dict().items()
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
