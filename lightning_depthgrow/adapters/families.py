"""Registers the built-in adapters: one small module per library (timm, Hugging Face transformers,
torchvision, ``torch.nn``). A family whose library is not installed is skipped; the transformers and
torchvision adapters recognise their blocks without importing the library (see
:func:`~lightning_depthgrow.adapters.registry.lazy_class`).
"""

from __future__ import annotations

from . import hf_transformers, timm_models, torch_nn, torchvision_models


def register_builtin_adapters() -> None:
    """Register every built-in adapter. Called by the registry on first use; user registrations still win."""
    timm_models.register()
    hf_transformers.register()
    torchvision_models.register()
    torch_nn.register()
