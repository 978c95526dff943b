"""Fixtures of the test suite: the tiny models, the data and the quiet Trainer from ``tests/_helpers.py``.

Multi-process and multi-epoch tests carry ``@pytest.mark.slow``; ``pytest -m "not slow"`` runs the quick rest.
"""

from __future__ import annotations

from collections.abc import Callable

import _helpers  # tests/ is on sys.path: pytest prepends the directory of a conftest without __init__.py
import pytest


@pytest.fixture
def quiet_trainer() -> Callable[..., object]:
    """``quiet_trainer(**trainer_kwargs)``: a CPU Trainer without logger, checkpoints, progress bar, summary."""
    return _helpers.quiet_trainer


@pytest.fixture
def make_module() -> Callable[..., _helpers.Classifier]:
    """``make_module(depth=2, embed_dim=16, seed=0, max_epochs=4)``: a seeded tiny-ViT classifier."""
    return _helpers.make_module


@pytest.fixture
def make_vit() -> Callable[..., object]:
    """``make_vit(depth=2, embed_dim=16, num_heads=2)``: a tiny timm ViT over ``[B, 1, 1, 40]`` signals."""
    return _helpers.make_vit


@pytest.fixture
def loader() -> Callable[..., object]:
    """``loader(n=64, batch_size=16, seed=0)``: random signals and labels in a fixed order."""
    return _helpers.random_loader


@pytest.fixture
def tensor_hash() -> Callable[..., str]:
    """``tensor_hash(module, parameters_only=False)``: SHA-256 over a module's tensors."""
    return _helpers.tensor_hash
