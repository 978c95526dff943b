"""Registry of residual block types: what a growable/prunable block looks like.

One general mechanism serves every model family: a :class:`BlockAdapter` says which module type is a
residual block, which of its sub-modules or parameters must be zeroed so that a fresh copy computes
the identity, and how to initialise the rest. Model-family knowledge lives only in the small modules
next to this one (``timm_vit.py``, ``timm_resnet.py``, ...), which register their adapters here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ZeroSpec = Sequence[str] | Callable[[nn.Module], Sequence[str]]


class UnsupportedModelError(ValueError):
    """Raised when a model has no structure this library knows how to grow, prune or measure."""


@dataclass
class BlockAdapter:
    """How to recognise and clone one residual block type.

    Args:
        block_type: the ``nn.Module`` subclass (or tuple of them) that is one residual block
            ``x + f(x)``.
        zero_init: dotted names, relative to the block, of sub-modules or parameters to set to zero so
            that a fresh block returns its input unchanged (the last projection of every residual
            branch, a LayerScale gamma, the last norm's affine weight and bias). A callable receiving the
            block may choose per instance (LayerScale present or not).
        init_fn: applied to every sub-module of a fresh block, after ``reset_parameters()`` and before
            zeroing (the family's own init, e.g. timm's truncated-normal for ViT linears).
        is_shape_preserving: whether a block maps inputs to outputs of the same shape (no stride, no
            channel change); only after such blocks, and only with such blocks as templates, is depth
            inserted. Default: always true.
        name: a label used in messages and events.

    Example:
        >>> import torch.nn as nn
        >>> class MyBlock(nn.Module):
        ...     def __init__(self, d=8):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        ...     def forward(self, x):
        ...         return x + self.fc2(self.fc1(x).relu())
        >>> adapter = register_block(MyBlock, zero_init=["fc2"])
        >>> adapter.name
        'MyBlock'
        >>> unregister_block(MyBlock)
    """

    block_type: type | tuple[type, ...]
    zero_init: ZeroSpec
    init_fn: Callable[[nn.Module], None] | None = None
    is_shape_preserving: Callable[[nn.Module], bool] | None = None
    name: str = ""
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            types = self.block_type if isinstance(self.block_type, tuple) else (self.block_type,)
            self.name = "/".join(t.__name__ for t in types)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block this adapter describes."""
        return isinstance(module, self.block_type)

    def shape_preserving(self, block: nn.Module) -> bool:
        """Whether ``block`` returns a tensor of its input's shape (and may serve as a template)."""
        return True if self.is_shape_preserving is None else bool(self.is_shape_preserving(block))

    def zero_names(self, block: nn.Module) -> list[str]:
        """Dotted names, relative to ``block``, of the sub-modules or parameters a new block zeroes."""
        names = self.zero_init(block) if callable(self.zero_init) else self.zero_init
        return list(names)

    def make_identity(self, template: nn.Module) -> nn.Module:
        """A new block with ``template``'s configuration whose output equals its input.

        Weights are freshly initialised (the family's init), then the ``zero_init`` targets are
        zeroed. Uses the global torch RNG: callers wanting reproducibility fork and seed it.
        """
        if not self.shape_preserving(template):
            raise UnsupportedModelError(
                f"{self.name} block {type(template).__name__} changes the shape of its input, so an "
                "identity copy of it cannot be inserted; choose a shape-preserving template."
            )
        block = copy.deepcopy(template)
        for module in block.modules():
            _reset_parameters(module)
            if self.init_fn is not None:
                self.init_fn(module)
        with torch.no_grad():
            for name in self.zero_names(block):
                _zero_target(block, name)
        return block


def _reset_parameters(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _zero_target(block: nn.Module, name: str) -> None:
    target = block.get_submodule(name) if _has_submodule(block, name) else None
    if target is not None:
        tensors = list(target.parameters(recurse=True))
        if not tensors:
            raise UnsupportedModelError(f"zero_init target {name!r} of {type(block).__name__} has no parameters")
        for t in tensors:
            t.zero_()
        return
    try:
        param = block.get_parameter(name)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"zero_init target {name!r} is neither a sub-module nor a parameter of {type(block).__name__}; "
            f"its sub-modules are {[n for n, _ in block.named_modules() if n][:20]}"
        ) from err
    param.zero_()


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


_REGISTRY: list[BlockAdapter] = []


def register_block(
    block_type: type | tuple[type, ...],
    zero_init: ZeroSpec,
    init_fn: Callable[[nn.Module], None] | None = None,
    is_shape_preserving: Callable[[nn.Module], bool] | None = None,
    name: str = "",
) -> BlockAdapter:
    """Register a residual block type so growth, DMS and curvature discovery recognise it.

    Later registrations take precedence over earlier ones for the same type. Returns the adapter.
    See :class:`BlockAdapter` for the arguments and an example.
    """
    _load_builtin_adapters()
    adapter = BlockAdapter(block_type, zero_init, init_fn, is_shape_preserving, name)
    _REGISTRY.insert(0, adapter)
    return adapter


def _register_builtin(adapter: BlockAdapter) -> None:
    """Built-in adapters go last so that any user registration overrides them."""
    _REGISTRY.append(adapter)


def unregister_block(block_type: type | tuple[type, ...]) -> None:
    """Remove every adapter registered for exactly ``block_type``."""
    _REGISTRY[:] = [a for a in _REGISTRY if a.block_type != block_type]


def registered_adapters() -> list[BlockAdapter]:
    """The adapters in lookup order (most recently registered first)."""
    _load_builtin_adapters()
    return list(_REGISTRY)


def adapter_for(module: nn.Module) -> BlockAdapter | None:
    """The adapter that recognises ``module`` as a residual block, or ``None``."""
    for adapter in registered_adapters():
        if adapter.matches(module):
            return adapter
    return None


@dataclass
class BlockStack:
    """A container (``nn.Sequential`` or ``nn.ModuleList``) whose children are registered blocks.

    ``path`` is the container's dotted name in the model (``"blocks"``, ``"layer2"``,
    ``"stages.1.blocks"``); blocks are addressed as ``f"{path}.{i}"``.
    """

    path: str
    container: nn.Module
    adapter: BlockAdapter

    @property
    def blocks(self) -> list[nn.Module]:
        """The blocks of the stack, in order."""
        return list(self.container.children())

    def __len__(self) -> int:
        return len(self.container)

    def block_name(self, index: int) -> str:
        """Dotted name of block ``index`` relative to the model (``"blocks.3"``)."""
        return f"{self.path}.{index}" if self.path else str(index)

    def growable_positions(self) -> list[int]:
        """Indices ``i`` such that an identity block may be inserted right after block ``i``.

        Any position after a block whose output shape equals the input of the block after it works;
        with a shape-preserving template available in the stack. Here: after every block, provided
        the stack has at least one shape-preserving block to copy.
        """
        if self.template_index() is None:
            return []
        return list(range(len(self)))

    def template_index(self, near: int | None = None) -> int | None:
        """The shape-preserving block closest to ``near`` (default: the last one), or ``None``."""
        candidates = [i for i, b in enumerate(self.blocks) if self.adapter.shape_preserving(b)]
        if not candidates:
            return None
        if near is None:
            return candidates[-1]
        return min(candidates, key=lambda i: (abs(i - near), -i))


def find_block_stacks(model: nn.Module) -> list[BlockStack]:
    """Every ``nn.Sequential``/``nn.ModuleList`` in ``model`` whose children are all registered blocks.

    Stacks are returned in module order. Registered blocks are not searched for nested stacks.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> [(s.path, len(s)) for s in find_block_stacks(m)]
        [('blocks', 2)]
    """
    stacks: list[BlockStack] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) > 0:
            adapters = [adapter_for(child) for child in module.children()]
            if all(a is not None for a in adapters) and len({id(a) for a in adapters}) == 1:
                stacks.append(BlockStack(prefix, module, adapters[0]))
                return
        for name, child in module.named_children():
            if adapter_for(child) is not None and not isinstance(child, (nn.Sequential, nn.ModuleList)):
                continue
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return stacks


def require_block_stacks(model: nn.Module) -> list[BlockStack]:
    """Like :func:`find_block_stacks` but raises a helpful error when there is none."""
    stacks = find_block_stacks(model)
    if stacks:
        return stacks
    containers = [
        f"{n or '<root>'} ({type(m).__name__} of {sorted({type(c).__name__ for c in m.children()})})"
        for n, m in model.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0
    ][:10]
    known = sorted({a.name for a in registered_adapters()})
    raise UnsupportedModelError(
        f"No stack of registered residual blocks found in {type(model).__name__}. "
        f"Containers found: {containers or 'none'}. Known block types: {known}. "
        "Register your block type with lightning_depthgrow.register_block(MyBlock, zero_init=[...names of "
        "the last projection of each residual branch...]) and keep the blocks in an nn.Sequential or "
        "nn.ModuleList."
    )


def get_stack(model: nn.Module, path: str) -> BlockStack:
    """The stack at ``path`` (as recorded in an event), with a clear error if it is not there."""
    for stack in find_block_stacks(model):
        if stack.path == path:
            return stack
    raise UnsupportedModelError(
        f"No block stack at {path!r} in {type(model).__name__}; stacks present: "
        f"{[(s.path, len(s)) for s in find_block_stacks(model)]}"
    )


_BUILTINS_LOADED = False


def _load_builtin_adapters() -> None:
    """Import the family modules once; each registers its adapters (skipped if the library is absent)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import families

    families.register_builtin_adapters()
