"""Registry of DMS families: where each model family's gates go, found through one lookup.

A :class:`DMSFamily` holds everything DMS knows about one model family: which of its blocks carry
which gates (as plain serialisable *gate specs*), how the masks act (hooks or weights folded into a
Linear), how export slices the layers, and which layers' counts scale with which gate (for the
resource model). Gates, export and the resource model only ask the registry; no other DMS module
names a model family. The built-in families live in :mod:`lightning_depthgrow.dms.families`
(timm ViT/Eva blocks, timm ResNet blocks), each registered only when its library imports.

A gate spec is a dict ``{"name", "kind", "site", "n", "min_keep", ...paths}`` (JSON types only,
recorded in the ``dms_attach`` event). ``site`` names the family's site that handles it; depth gates
(``site == "depth"``) are built here over every stack of registered blocks, with a ``style`` that a
family claims (``"vit"``, ``"resnet"``) or ``"generic"`` (``x + m (block(x) - x)`` on the whole block).

Example: a family for your own block type (hidden units of its two-layer MLP)::

    class MyFamily(DMSFamily):
        name, sites = "my_mlp", ("my_mlp",)

        def block_specs(self, path, block, width, heads):
            if not isinstance(block, MyBlock):
                return None
            return [{"name": gate_name(path, "mlp"), "kind": "width", "site": "my_mlp", "block": path,
                     "n": block.fc1.out_features, "min_keep": 1}] if width else []

        def mask_hooks(self, model, spec, gates, index, fold):
            fold(model.get_submodule(spec["block"] + ".fc2")).columns.append((index, 1))
            return []

        def plan_export(self, model, spec, keep, slices):
            block = model.get_submodule(spec["block"])
            slice_linear_hidden(slices, [block.fc1], block.fc2, keep)

        def resource_roles(self, model, spec):
            return [("out", spec["block"] + ".fc1"), ("in", spec["block"] + ".fc2")]

    register_dms_family(MyFamily())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapters.registry import BlockAdapter, UnsupportedModelError, find_block_stacks
from .topk import DEPTH

GateSpec = dict[str, Any]
Hook = tuple[nn.Module, str, Any]  # (module, "pre" | "post" | "forward", hook object); "forward" replaces it
ROLES = ("in", "out", "norm", "heads")


class DMSFamily:
    """One model family's DMS knowledge. Subclass, set ``name`` and ``sites``, register an instance.

    Attributes:
        name: a label for messages.
        sites: the ``spec["site"]`` values this family's gates carry.
        depth_styles: the depth-gate ``style`` values this family implements (:meth:`depth_hooks`).
    """

    name: str = ""
    sites: tuple[str, ...] = ()
    depth_styles: tuple[str, ...] = ()

    def block_specs(self, path: str, block: nn.Module, width: bool, heads: bool) -> list[GateSpec] | None:
        """Width/head gate specs for ``block`` at ``path``; ``None`` if ``block`` is not this family's.

        Raise :class:`~lightning_depthgrow.UnsupportedModelError` (see :func:`tied`) for a requested kind
        of gate the block has but that cannot be sliced.
        """
        return None

    def embed_specs(self, path: str, model: nn.Module) -> list[GateSpec] | None:
        """Gate specs of a model-level width (the residual stream's channels) for ``model`` at ``path``, asked only
        when embedding gates are requested (``embed=True``); ``None`` if ``model`` is not this family's.

        Raise :class:`~lightning_depthgrow.UnsupportedModelError` for a model of this family whose embedding
        width cannot be gated (a variant the family does not handle). Default: ``None``.
        """
        return None

    def depth_style(self, block: nn.Module) -> str | None:
        """The depth style of ``block`` if this family gates its depth itself, else ``None``."""
        return None

    def identity_skip(self, adapter: BlockAdapter, block: nn.Module) -> bool | None:
        """Whether dropping ``block`` leaves its skip connection (``None``: not this family's block)."""
        return None

    def mask_hooks(self, model: nn.Module, spec: GateSpec, gates: Any, index: int, fold: Callable) -> list[Hook]:
        """Hooks that apply gate ``index``'s mask for ``spec``; factors folded into a Linear go to ``fold(linear)``."""
        raise NotImplementedError

    def depth_hooks(
        self, block: nn.Module, style: str, gates: Any, index: int, element: int, fold: Callable
    ) -> list[Hook]:
        """Hooks that scale ``block``'s residual branches by element ``element`` of gate ``index``."""
        raise NotImplementedError

    def plan_export(self, model: nn.Module, spec: GateSpec, keep: list[int], slices: Any) -> None:
        """Record in ``slices`` (``slices.add(module, names, dim, index)``, ``slices.attr(module, name, value)``)
        how the layers of ``spec`` are cut to the kept elements ``keep``."""
        raise NotImplementedError

    def plan_config(
        self,
        model: nn.Module,
        specs: list[GateSpec],
        keep: dict[str, list[int]],
        slices: Any,
        stays: Callable[[str], bool],
    ) -> None:
        """After every gate's :meth:`plan_export`: record what concerns the whole model (``slices.attr`` on a
        config; ``slices.note`` for a warning given after the export). ``specs``: this family's gates on the
        blocks that stay; ``keep``: every gate's kept indices; ``stays(path)``: whether the module at ``path``
        is kept (not in a dropped block). Default: nothing."""

    def resource_roles(self, model: nn.Module, spec: GateSpec) -> list[tuple[str, str]]:
        """``(role, module path)`` pairs: which modules' FLOPs and parameters scale with the gate's kept fraction.

        ``"out"``: the module's outputs are the gated elements (its weight, bias and FLOPs scale);
        ``"in"``: its inputs are (its weight and FLOPs scale); ``"norm"``: a per-channel layer (all its
        parameters scale); ``"heads"``: the module's *own* FLOPs (attention scores and weighted sum,
        excluding its sub-modules) scale with kept heads.
        """
        raise NotImplementedError

    def flop_shares(self, model: nn.Module, spec: GateSpec) -> dict[str, list[tuple[float, tuple[str, ...]]]]:
        """``{module path: [(share, roles), ...]}`` for modules whose own FLOPs scale in parts: ``share`` of the
        module's own FLOPs scales with the gate factors of ``roles`` (of :meth:`resource_roles`, e.g. ``("in",
        "out")`` for the projections inside an ``nn.MultiheadAttention``, ``("heads",)`` for its attention
        products). Shares sum to 1. Default: none (a module's own FLOPs scale with all its roles)."""
        return {}


_FAMILIES: list[DMSFamily] = []
_BUILTINS_LOADED = False


def register_dms_family(family: DMSFamily) -> DMSFamily:
    """Register ``family`` (it takes precedence over earlier ones for the blocks it claims); returns it."""
    _load_builtin_families()
    for site in (*family.sites, *family.depth_styles):
        if site in ("depth", "generic"):
            raise ValueError(f"{site!r} is reserved for DMS's own depth gates")
    _FAMILIES.insert(0, family)
    return family


def unregister_dms_family(family: DMSFamily) -> None:
    """Remove a registered family."""
    _FAMILIES[:] = [f for f in _FAMILIES if f is not family]


def dms_families() -> list[DMSFamily]:
    """The registered families, in lookup order (most recently registered first)."""
    _load_builtin_families()
    return list(_FAMILIES)


def family_for_site(site: str) -> DMSFamily:
    """The family that handles gate specs with ``site`` (a clear error if none does)."""
    for family in dms_families():
        if site in family.sites:
            return family
    raise UnsupportedModelError(
        f"no DMS family handles gate site {site!r} (is the library that defines it installed and imported?); "
        f"known sites: {sorted(s for f in dms_families() for s in f.sites)}"
    )


def is_embed_site(site: str) -> bool:
    """Whether gates of ``site`` are model-level embedding-width gates (their family implements
    :meth:`DMSFamily.embed_specs`), as opposed to the block-level width, heads and depth gates."""
    if site == "depth":
        return False
    family = family_for_site(site)
    return type(family).embed_specs is not DMSFamily.embed_specs


def family_for_style(style: str) -> DMSFamily:
    """The family that implements depth style ``style``."""
    for family in dms_families():
        if style in family.depth_styles:
            return family
    raise UnsupportedModelError(f"no DMS family implements depth style {style!r}")


def _load_builtin_families() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from .families import register_builtin_families

    register_builtin_families(_FAMILIES)


# ------------------------------------------------------------------------------------------ helpers
def gate_name(path: str, suffix: str) -> str:
    """A ``ModuleDict`` key for a gate (no dots allowed there): ``model/blocks/0:mlp``."""
    return f"{path.replace('.', '/')}:{suffix}"


def tied(path: str, what: str) -> UnsupportedModelError:
    """The error for a gate whose elements are tied to something DMS cannot slice."""
    return UnsupportedModelError(
        f"DMS cannot gate {what} of {path}: those channels are tied to a layer we cannot slice. "
        "Disable that kind of gate (width=False or heads=False) for this model."
    )


def slice_linear_hidden(slices: Any, producers: list[nn.Module], consumer: nn.Module, keep: list[int]) -> None:
    """Export plan of hidden units between ``nn.Linear`` producers (rows) and one consumer (columns)."""
    idx = torch.tensor(keep, dtype=torch.long)
    for producer in producers:
        slices.add(producer, ["weight", "bias"], 0, idx)
        slices.attr(producer, "out_features", len(keep))
    slices.add(consumer, ["weight"], 1, idx)
    slices.attr(consumer, "in_features", len(keep))


def slice_conv_hidden(
    slices: Any, producer: nn.Module, norm: nn.Module | None, consumer: nn.Module, keep: list[int]
) -> None:
    """Export plan of inner channels between a convolution ``producer`` (output channels), the per-channel
    ``norm`` after it (BatchNorm: weight, bias, running statistics) and a convolution ``consumer`` (input channels)."""
    idx = torch.tensor(keep, dtype=torch.long)
    slices.add(producer, ["weight", "bias"], 0, idx)
    slices.attr(producer, "out_channels", len(keep))
    if norm is not None:
        slices.add(norm, ["weight", "bias", "running_mean", "running_var"], 0, idx)
        if hasattr(norm, "num_features"):
            slices.attr(norm, "num_features", len(keep))
    slices.add(consumer, ["weight"], 1, idx)
    slices.attr(consumer, "in_channels", len(keep))


def describe_model(model: nn.Module) -> str:
    """What a model holds, for the error raised when nothing can be gated."""
    kinds: dict[str, int] = {}
    for _, module in model.named_modules():
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:12]
    return ", ".join(f"{n} x{c}" for n, c in top)


# ------------------------------------------------------------------------------------------ discovery
def discover_gates(
    model: nn.Module,
    width: bool = True,
    heads: bool = True,
    depth: bool = True,
    skip: str = "",
    embed: bool = False,
) -> list[GateSpec]:
    """Every gate DMS can attach to ``model``, in module order.

    Width and head gates come from the registered families' blocks; depth gates from every stack of
    registered blocks (:func:`lightning_depthgrow.find_block_stacks`), only over blocks with an identity
    skip. ``skip`` is a sub-module path to ignore (the gate container itself). ``embed=True`` adds the
    families' model-level embedding-width gates (the residual stream's channels: timm ``VisionTransformer``, site
    ``vit_embed``; Hugging Face ``ViTForImageClassification``/``ViTModel``, ``hf_vit_embed``; torchvision
    ``VisionTransformer``, ``torchvision_vit_embed``), listed first, one
    per model (a model nested in a gated one is covered by its gate); unsupported variants are refused.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=3)
        >>> [s["name"] for s in discover_gates(vit)]
        ['blocks/0:heads', 'blocks/0:mlp', 'blocks/1:heads', 'blocks/1:mlp', 'blocks:depth']
    """
    families = dms_families()
    specs: list[GateSpec] = []
    if embed:
        covered: list[str] = []  # models with an embedding gate: it covers the models nested in them
        for path, module in model.named_modules():
            if skip and (path == skip or path.startswith(skip + ".")):
                continue
            if any(path.startswith(c + ".") or not c for c in covered):
                continue
            for family in families:
                found = family.embed_specs(path, module)
                if found is not None:
                    specs.extend(found)
                    covered.append(path)
                    break
        if not specs:
            raise UnsupportedModelError(
                f"embed=True but no registered DMS family gates the embedding width of {type(model).__name__} "
                "(supported: timm and torchvision VisionTransformer, Hugging Face ViTForImageClassification and "
                "ViTModel with its pooler). Use embed=False for this model."
            )
    if width or heads:
        for path, module in model.named_modules():
            if skip and (path == skip or path.startswith(skip + ".")):
                continue
            for family in families:
                found = family.block_specs(path, module, width, heads)
                if found is not None:
                    specs.extend(found)
                    break
    if depth:
        for stack in find_block_stacks(model):
            if skip and stack.path.startswith(skip):
                continue
            blocks = stack.blocks
            gated = [i for i, b in enumerate(blocks) if _identity_skip(families, stack.adapter, b)]
            if not gated:
                continue
            styles = {_depth_style(families, blocks[i]) for i in gated}
            specs.append(
                {
                    "name": gate_name(stack.path, "depth"),
                    "kind": DEPTH,
                    "site": "depth",
                    "stack": stack.path,
                    "blocks": gated,
                    "style": styles.pop() if len(styles) == 1 else "generic",
                    "n": len(gated),
                    # a stack may lose all gated blocks only if an ungated one carries it on
                    "min_keep": 0 if len(gated) < len(blocks) else 1,
                }
            )
    return specs


def _identity_skip(families: list[DMSFamily], adapter: BlockAdapter, block: nn.Module) -> bool:
    for family in families:
        verdict = family.identity_skip(adapter, block)
        if verdict is not None:
            return verdict
    return adapter.shape_preserving(block)


def _depth_style(families: list[DMSFamily], block: nn.Module) -> str:
    for family in families:
        style = family.depth_style(block)
        if style is not None:
            return style
    return "generic"
