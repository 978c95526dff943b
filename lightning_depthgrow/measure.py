"""What a model costs: parameter counts, forward FLOPs per module and per block, depth per stack.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one forward pass (a
multiply-add counts as 2 FLOPs; element-wise ops, norms and activations are not counted). The pass
runs in eval mode under ``no_grad`` with the math attention kernel and without ``nn.MultiheadAttention``'s
fast path, because the fused CPU attention kernels (and ``torch._native_multi_head_attention``, which
eval-mode ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` call) have no FLOP formula and would
silently count as 0.

Sub-modules are told apart by hooks on the counted model's own modules, firing only in the calling thread:
``FlopCounterMode``'s own module tracker hooks every module of every thread, so a model running in another
thread (a second ``Trainer.fit``, a data-loading thread's model) would have its module names mixed into
this count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .adapters.registry import find_block_stacks, require_block_stacks

ExampleInput = torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any]


@dataclass
class FlopReport:
    """Forward FLOPs of one pass.

    Attributes:
        total: FLOPs of the whole forward pass.
        per_module: FLOPs per sub-module, keyed by dotted name (``""`` is the model itself); a
            module's count includes its children's.
    """

    total: int
    per_module: dict[str, int] = field(default_factory=dict)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (shared parameters counted once).

    Example:
        >>> count_parameters(nn.Linear(3, 4))
        16
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, example_input: ExampleInput) -> FlopReport:
    """Forward FLOPs of ``model`` on ``example_input``, in total and per sub-module.

    ``example_input`` is passed as ``model(x)`` for a tensor, ``model(*x)`` for a tuple or list and
    ``model(**x)`` for a dict. The model runs in eval mode without autograd; every module's train/eval
    mode is restored afterwards.

    Example:
        >>> count_flops(nn.Linear(3, 4), torch.randn(5, 3)).total  # 2 * in * out * batch
        120
    """
    counter = FlopCounterMode(display=False)
    # FlopCounterMode reads the modules an op runs in from ``mod_tracker.parents`` only; its own tracker's
    # global hooks see every thread's modules, this one only ``model``'s in this thread.
    counter.mod_tracker = _ThreadModuleTracker(model)
    with _eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), _mha_fastpath_off(), counter:
        _call(model, example_input)
    per_module = {
        name: int(sum(counts.values())) for name, counts in counter.get_flop_counts().items() if name != _GLOBAL
    }
    return FlopReport(total=int(counter.get_total_flops()), per_module=per_module)


def first_sample(example_input: ExampleInput) -> ExampleInput:
    """``example_input`` cut to its first sample (every tensor's first row), for counts per sample.

    Example:
        >>> first_sample({"x": torch.zeros(4, 3), "mask": torch.ones(4, 3)})["x"].shape
        torch.Size([1, 3])
    """
    if isinstance(example_input, torch.Tensor):
        return example_input[:1]
    if isinstance(example_input, dict):
        return {key: first_sample(value) for key, value in example_input.items()}
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(first_sample(value) for value in example_input)
    return example_input


def block_costs(model: nn.Module, example_input: ExampleInput) -> dict[str, dict[str, int]]:
    """Parameters and forward FLOPs of every block of every stack (one forward pass).

    Returns ``{block_name: {"params": int, "flops": int}}`` with block names such as ``"blocks.3"`` or
    ``"layer2.0"``, in model order. Raises :class:`~lightning_depthgrow.UnsupportedModelError` if the
    model has no registered block stack.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> costs = block_costs(vit, torch.randn(1, 3, 32, 32))
        >>> list(costs), costs["blocks.0"]["params"] == costs["blocks.1"]["params"]
        (['blocks.0', 'blocks.1'], True)
    """
    stacks = require_block_stacks(model)
    flops = count_flops(model, example_input).per_module
    return {
        stack.block_name(i): {"params": count_parameters(block), "flops": flops.get(stack.block_name(i), 0)}
        for stack in stacks
        for i, block in enumerate(stack.blocks)
    }


def architecture_summary(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready snapshot of the architecture: depth of each block stack and parameter counts.

    Returns ``{"depth": {stack_path: n_blocks}, "total_depth": int, "params": int,
    "trainable_params": int}``; a model without registered stacks has an empty ``"depth"``.

    Example:
        >>> import timm
        >>> summary = architecture_summary(timm.create_model("resnet10t", num_classes=10))
        >>> summary["depth"]
        {'layer1': 1, 'layer2': 1, 'layer3': 1, 'layer4': 1}
    """
    depth = {stack.path: len(stack) for stack in find_block_stacks(model)}
    return {
        "depth": depth,
        "total_depth": sum(depth.values()),
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
    }


def _call(model: nn.Module, example_input: ExampleInput) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


_GLOBAL = "Global"  # FlopCounterMode's key for the whole pass


class _ThreadModuleTracker:
    """The modules of ``model`` being run in the thread that entered it, as ``FlopCounterMode`` reads them.

    ``parents`` holds ``"Global"`` and the model-relative path (``""`` for ``model``) of every module whose
    forward is running. The hooks sit on ``model``'s own modules only, ignore other threads, and are removed on
    exit (nothing is left on the model).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.parents: set[str] = {_GLOBAL}
        self._handles: list[Any] = []

    def __enter__(self) -> _ThreadModuleTracker:
        thread = threading.get_ident()

        def enter(name: str) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if threading.get_ident() == thread:
                    self.parents.add(name)

            return hook

        def leave(name: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if threading.get_ident() == thread:
                    self.parents.discard(name)

            return hook

        self.parents = {_GLOBAL}
        try:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(enter(name)))
                self._handles.append(module.register_forward_hook(leave(name), always_call=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *args: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.parents = {_GLOBAL}


@contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """``nn.MultiheadAttention`` on its Python path (projections and SDPA, which the counter sees)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
