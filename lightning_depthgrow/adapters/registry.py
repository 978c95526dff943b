"""Registry of residual block types: what a growable/prunable block looks like.

One general mechanism serves every model family: a :class:`BlockAdapter` says which module type is a
residual block, which of its sub-modules or parameters must be zeroed so that a fresh copy computes
the identity, and how to initialise the rest. An adapter may also refuse blocks whose zeroed copy is not
an identity (post-LayerNorm blocks, a ResNet block ending in SiLU) and keep a family's bookkeeping in step
when a stack changes length (Hugging Face ``config.num_hidden_layers``, per-layer ``layer_idx``).
Model-family knowledge lives only in the small modules next to this one (``timm_models.py``,
``hf_transformers.py``, ``torchvision_models.py``, ``torch_nn.py``), which register their adapters here.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ZeroSpec = Sequence[str] | Callable[[nn.Module], Sequence[str]]


@dataclass(frozen=True)
class StackChange:
    """One change of a stack's length, passed to :attr:`BlockAdapter.on_depth_change`.

    ``kind="insert"``: a block now sits at ``index`` of the stack (the stack already has it), a copy of the
    block that was at ``template`` before the insertion. ``kind="remove"``: the block that was at ``index``
    is gone (the stack no longer has it).
    """

    kind: Literal["insert", "remove"]
    index: int
    template: int | None = None


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
        extras: free-form data for other parts of the library (unused by growth).
        match: an extra test on a module of ``block_type`` (for families recognised by structure).
        refuse: ``block -> reason or None``: why a zero-initialised copy of this block, or a copy inserted
            right after it, would not compute the identity (post-LayerNorm, an activation after the residual
            add that is not ReLU). Checked on the template and on the block the new one follows; a reason
            refuses the insertion before anything is modified. Not consulted for ramped copies
            (``ramp_steps >= 1``): a ramp is the identity at birth for any shape-preserving block.
        reinit: re-initialises a whole new block in place (replaces ``reset_parameters()`` + ``init_fn``),
            for families whose init needs more than one sub-module at a time (Hugging Face: the config's
            ``initializer_range``).
        on_depth_change: ``(model, stack, change) -> None``, called after a block was inserted into or
            removed from ``stack`` (see :class:`StackChange`) to keep the family's bookkeeping in step
            (config depth fields, per-layer indices). It must validate before it modifies anything and
            raise :class:`UnsupportedModelError` if the model cannot be kept consistent.

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
    match: Callable[[nn.Module], bool] | None = None
    refuse: Callable[[nn.Module], str | None] | None = None
    reinit: Callable[[nn.Module], None] | None = None
    on_depth_change: Callable[[nn.Module, BlockStack, StackChange], None] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            types = self.block_type if isinstance(self.block_type, tuple) else (self.block_type,)
            self.name = "/".join(t.__name__ for t in types)

    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block this adapter describes."""
        return isinstance(module, self.block_type) and (self.match is None or bool(self.match(module)))

    def growth_refusal(self, block: nn.Module) -> str | None:
        """Why an identity copy of ``block`` (or one inserted after it) cannot be made, or ``None``."""
        return None if self.refuse is None else self.refuse(block)

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
        zeroed. Uses the global torch RNG: callers wanting reproducibility fork and seed it. A parameter
        that neither ``reset_parameters()`` nor the family's init changed keeps the template's values; a
        warning names it (give ``register_block`` an ``init_fn`` that covers it).
        """
        if not self.shape_preserving(template):
            raise UnsupportedModelError(
                f"{self.name} block {type(template).__name__} changes the shape of its input, so an "
                "identity copy of it cannot be inserted; choose a shape-preserving template."
            )
        reason = self.growth_refusal(template)
        if reason is not None:
            raise UnsupportedModelError(f"{self.name}: {reason}")
        block = copy.deepcopy(template)
        with torch.no_grad():
            if self.reinit is not None:
                self.reinit(block)
            else:
                for module in block.modules():
                    reset_parameters(module)
                    if self.init_fn is not None:
                        self.init_fn(module)
            zeroed = self.zero_names(block)
            for name in zeroed:
                _zero_target(block, name)
        _warn_copied(self.name, template, block, zeroed)
        return block


def reset_parameters(module: nn.Module) -> None:
    """``module.reset_parameters()`` if it has one (``nn.MultiheadAttention``: its ``_reset_parameters()``).

    Only the module's own parameters are reset (PyTorch's convention); call it on every sub-module.
    """
    if isinstance(module, nn.MultiheadAttention):
        module._reset_parameters()
        return
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _warn_copied(adapter_name: str, template: nn.Module, block: nn.Module, zeroed: list[str]) -> None:
    # A parameter equal to the template's and not constant was copied, not re-initialised (HF Conv1D has no
    # reset_parameters). Constant ones (fresh norm weights of 1) are equal legitimately.
    originals = dict(template.named_parameters())
    copied = [
        name
        for name, param in block.named_parameters()
        if param.numel() > 1
        and not any(name == z or name.startswith(z + ".") for z in zeroed)
        and torch.equal(param, originals[name])
        and not bool((param == param.flatten()[0]).all())
    ]
    if copied:
        warnings.warn(
            f"{adapter_name}: the new block's parameters {copied[:8]} keep the template's values: neither "
            "reset_parameters() nor the adapter's init_fn re-initialised them. The block is still an identity, "
            "but it starts as a copy; pass an init_fn (or reinit) to register_block that initialises them.",
            UserWarning,
            stacklevel=3,
        )


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
    *,
    refuse: Callable[[nn.Module], str | None] | None = None,
    reinit: Callable[[nn.Module], None] | None = None,
    on_depth_change: Callable[[nn.Module, BlockStack, StackChange], None] | None = None,
) -> BlockAdapter:
    """Register a residual block type so growth, DMS and curvature discovery recognise it.

    Later registrations take precedence over earlier ones for the same type (built-ins included). Returns
    the adapter. See :class:`BlockAdapter` for the arguments and an example.
    """
    _load_builtin_adapters()
    adapter = BlockAdapter(
        block_type,
        zero_init,
        init_fn,
        is_shape_preserving,
        name,
        refuse=refuse,
        reinit=reinit,
        on_depth_change=on_depth_change,
    )
    _REGISTRY.insert(0, adapter)
    return adapter


_BUILTIN: list[BlockAdapter] = []


def _register_builtin(adapter: BlockAdapter) -> None:
    """Built-in adapters go last so that any user registration overrides them."""
    _REGISTRY.append(adapter)
    _BUILTIN.append(adapter)


def unregister_block(block_type: type | tuple[type, ...]) -> None:
    """Remove every adapter :func:`register_block` registered for exactly ``block_type``.

    Built-in adapters stay: unregistering a user override of a built-in block type brings the built-in back.
    """
    _load_builtin_adapters()
    _REGISTRY[:] = [a for a in _REGISTRY if a.block_type != block_type or any(a is b for b in _BUILTIN)]


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
    ``"stages.1.blocks"``); blocks are addressed by their key in the container: ``f"{path}.{i}"``, or
    ``f"{path}.{prefix}{i}"`` for containers whose children are named with a common prefix (torchvision's
    ``encoder.layers.encoder_layer_3``).
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

    @property
    def key_prefix(self) -> str | None:
        """The common prefix of the children's keys (``""`` for ``0..n-1``), or ``None`` if they are named
        otherwise (such a stack can be measured but not grown)."""
        return key_prefix(self.container)

    def block_name(self, index: int) -> str:
        """Dotted name of block ``index`` relative to the model (``"blocks.3"``)."""
        key = list(self.container._modules)[index]
        return f"{self.path}.{key}" if self.path else key

    def growth_refusal(self) -> str | None:
        """Why no block can be inserted into this stack (its adapter refuses every block, no shape-preserving
        template, blocks not named 0..n-1 with a common prefix), or ``None``."""
        if self.key_prefix is None:
            keys = list(self.container._modules)[:8]
            return (
                f"stack {self.path!r} names its blocks {keys}; only containers whose keys are 0..n-1, with "
                "an optional common prefix (encoder_layer_0, ...), can be grown."
            )
        if self.template_index() is None:
            return (
                f"stack {self.path!r} ({self.adapter.name}, {len(self)} blocks) has no shape-preserving block "
                "to copy: every block changes its input's shape (stride or channels)."
            )
        reasons = [self.adapter.growth_refusal(b) for b in self.blocks]
        if all(r is not None for r in reasons):
            return f"stack {self.path!r} ({self.adapter.name}): {reasons[0]}"
        return None

    def notify_depth_change(self, model: nn.Module, change: StackChange) -> None:
        """Run the family's bookkeeping after ``change`` (see :attr:`BlockAdapter.on_depth_change`).

        A user adapter that overrides a built-in one for the same block type but has no
        ``on_depth_change`` still gets the built-in's: config depth and ``layer_idx`` belong to the model,
        not to the choice of what to zero.
        """
        hook = self.adapter.on_depth_change
        if hook is None and self.blocks:
            hook = next(
                (a.on_depth_change for a in _BUILTIN if a.on_depth_change is not None and a.matches(self.blocks[0])),
                None,
            )
        if hook is not None:
            hook(model, self, change)

    def growable_positions(self) -> list[int]:
        """Indices ``i`` such that an identity block may be inserted right after block ``i``.

        After every block, provided the stack has a shape-preserving template, can be renumbered, and its
        adapter accepts both the block ``i`` and the template (see :meth:`BlockAdapter.growth_refusal`).
        Empty when :meth:`growth_refusal` gives a reason.
        """
        if self.growth_refusal() is not None:
            return []
        blocks = self.blocks
        positions = []
        for i, block in enumerate(blocks):
            template = self.template_index(near=i)
            if self.adapter.growth_refusal(block) is None and self.adapter.growth_refusal(blocks[template]) is None:
                positions.append(i)
        return positions

    def template_index(self, near: int | None = None) -> int | None:
        """The shape-preserving block closest to ``near`` (default: the last one), or ``None``."""
        candidates = [i for i, b in enumerate(self.blocks) if self.adapter.shape_preserving(b)]
        if not candidates:
            return None
        if near is None:
            return candidates[-1]
        return min(candidates, key=lambda i: (abs(i - near), -i))


def key_prefix(container: nn.Module) -> str | None:
    """The prefix ``p`` such that ``container``'s children are named ``p0, p1, ...``; ``None`` if there is none.

    Example:
        >>> key_prefix(nn.Sequential(nn.ReLU(), nn.ReLU()))
        ''
    """
    keys = list(container._modules)
    if not keys:
        return ""
    match = re.fullmatch(r"(.*?)0", keys[0])
    if match is None:
        return None
    prefix = match.group(1)
    return prefix if keys == [f"{prefix}{i}" for i in range(len(keys))] else None


def lazy_class(module_name: str, class_name: str) -> type | None:
    """The class ``module_name.class_name`` if that module is already imported, else ``None``.

    Built-in adapters of optional libraries use this so that recognising blocks never imports the
    library: a model holding one of its blocks has necessarily imported the module already.
    """
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls if isinstance(cls, type) else None


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
    raise UnsupportedModelError(no_block_structure_message(model))


def no_block_structure_message(model: nn.Module) -> str:
    """Why :func:`find_block_stacks` finds nothing in ``model`` and how to fix it (for errors and warnings).

    Lists the containers present and the known block types, and says how to register a block type.
    """
    containers = [
        f"{n or '<root>'} ({type(m).__name__} of {sorted({type(c).__name__ for c in m.children()})})"
        for n, m in model.named_modules()
        if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 0
    ][:10]
    known = sorted({a.name for a in registered_adapters()})
    return (
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
