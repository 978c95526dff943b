"""Export a gated model: slice every layer to its hard mask, drop pruned blocks, remove the gates.

Blocks are dropped with :func:`~lightning_depthgrow.surgery.remove_block`, so each family's bookkeeping follows
(container keys renumbered in place, Hugging Face config depth and ``layer_idx``, timm ``feature_info``).

The whole new state (sliced parameters and buffers, rebuilt block containers) is computed and checked
first; only then is the model mutated, so a failing export leaves the model as it was. The returned
:class:`~lightning_depthgrow.events.AppliedChange` lists each sliced parameter with its kept indices
(``update_optimizer`` slices Adam moments and momentum with them) and every parameter that left
(pruned blocks and the architecture ratios).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import Tensor, nn

from ..adapters.registry import UnsupportedModelError
from ..events import AppliedChange
from ..surgery.growth import remove_block
from .gates import DMSGates, find_gates, remove_gates
from .sites import DMSFamily, family_for_site


class _Slices:
    """Kept indices per (module, tensor name, dim), merged across gates (a conv can be sliced on both dims)."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, str], tuple[nn.Module, dict[int, Tensor]]] = {}
        self.attrs: list[tuple[Any, str, Any]] = []
        self.notes: list[str] = []
        self.row_scales: dict[tuple[int, str], Tensor] = {}

    def add(self, module: nn.Module, names: list[str], dim: int, keep: Tensor) -> None:
        for name in names:
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            _, dims = self.index.setdefault((id(module), name), (module, {}))
            dims[dim] = keep

    def scale_rows(self, module: nn.Module, name: str, factors: Tensor) -> None:
        """Multiply row ``i`` (dim 0) of ``module.name``'s new value by ``factors[i]`` after slicing: a rescaling that
        keeps the function where a sliced layer computes a constant from its width (attention's
        ``1 / sqrt(head_dim)``). The optimizer state follows (:attr:`AppliedChange.rescaled`)."""
        self.row_scales[(id(module), name)] = factors
        self.index.setdefault((id(module), name), (module, {}))

    def attr(self, module: Any, name: str, value: Any) -> None:
        """Set ``module.name = value`` once everything is checked (a module's width, a config's count)."""
        self.attrs.append((module, name, value))

    def note(self, text: str) -> None:
        """A warning to give once the export is done (e.g. a config that cannot describe the exported model)."""
        self.notes.append(text)


def _validate_keep(gates: DMSGates, keep: dict[str, list[int]]) -> None:
    names = [s["name"] for s in gates.specs]
    if sorted(keep) != sorted(names):
        raise UnsupportedModelError(f"export keeps {sorted(keep)} but the model's gates are {sorted(names)}")
    for s in gates.specs:
        kept = keep[s["name"]]
        if kept != sorted(set(kept)) or (kept and not 0 <= kept[0] <= kept[-1] < s["n"]):
            raise UnsupportedModelError(
                f"kept indices {kept} of gate {s['name']} are not sorted unique in [0, {s['n']})"
            )
        if s["kind"] != "depth" and not kept:
            raise UnsupportedModelError(f"gate {s['name']} would keep no {s['kind']} element; at least one must stay")


def export_model(model: nn.Module, keep: dict[str, list[int]] | None = None) -> AppliedChange:
    """Slice ``model`` to ``keep`` (default: the gates' current hard masks) and remove the gates.

    ``keep`` maps each gate name to the sorted element indices to keep (recorded in ``dms_export``
    events, so a replay slices exactly as the original run did, whatever the importances are).

    Example:
        >>> import timm
        >>> from lightning_depthgrow.dms import attach_gates
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
        >>> gates = attach_gates(vit)
        >>> keep = {name: list(range(g.n // 2 or 1)) for name, g in gates.gates.items()}
        >>> change = export_model(vit, keep)
        >>> len(vit.blocks), vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features
        (1, 1, 384)
    """
    gates = find_gates(model)
    if gates is None:
        raise RuntimeError("export_model needs a model with DMS gates attached (attach_gates or a dms_attach event).")
    keep = gates.keep() if keep is None else {k: [int(i) for i in v] for k, v in keep.items()}
    _validate_keep(gates, keep)

    removed_blocks: set[int] = set()
    drops: list[tuple[str, list[int]]] = []  # (stack path, indices of the blocks it loses)
    for s in gates.specs:
        if s["site"] != "depth":
            continue
        stack = model.get_submodule(s["stack"])
        kept = set(keep[s["name"]])
        dropped = sorted(s["blocks"][j] for j in range(s["n"]) if j not in kept)
        if dropped:
            removed_blocks.update(id(stack[i]) for i in dropped)
            drops.append((s["stack"], dropped))

    slices = _Slices()
    alive = [s for s in gates.specs if s["site"] != "depth" and not _inside(model, s["block"], removed_blocks)]
    families: dict[int, DMSFamily] = {}  # each family once, for what concerns the whole model (a config's widths)
    for s in alive:
        family = family_for_site(s["site"])
        family.plan_export(model, s, keep[s["name"]], slices)
        families.setdefault(id(family), family)
    for family in families.values():
        family.plan_config(
            model,
            [s for s in alive if s["site"] in family.sites],
            keep,
            slices,
            lambda path: not _inside(model, path, removed_blocks),
        )

    # Build and check every new tensor before touching the model, so a bad index leaves it intact.
    new_tensors: list[tuple[nn.Module, str, Tensor, tuple[Tensor | None, ...], Tensor | None]] = []
    for (_, name), (module, dims) in slices.index.items():
        old = getattr(module, name)
        index = tuple(dims.get(d) for d in range(max(dims) + 1)) if dims else ()
        value = old.detach()
        for d, kept in dims.items():
            if kept.numel() and int(kept.max()) >= value.shape[d]:
                raise UnsupportedModelError(
                    f"kept index {int(kept.max())} out of range for {name} of shape {tuple(value.shape)}"
                )
            value = value.index_select(d, kept.to(value.device))
        value = value.clone()
        factor = slices.row_scales.get((id(module), name))
        if factor is not None:
            if factor.shape != value.shape[:1]:
                raise UnsupportedModelError(
                    f"{len(factor)} row scales for {name} with {value.shape[0]} rows after slicing"
                )
            factor = factor.to(value).reshape(-1, *[1] * (value.dim() - 1))
            value = value * factor
        new_tensors.append((module, name, value, index, factor))

    _check_removals(model, drops)

    # Everything is checked: only assignments (and block removals checked above) from here on.
    change = AppliedChange()
    for module, name, value, index, factor in new_tensors:
        old = getattr(module, name)
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            setattr(module, name, new)
            change.replaced.append((old, new, index))
            if factor is not None:
                change.rescaled.append((new, factor))
        else:
            module._buffers[name] = value
    for module, name, value in slices.attrs:
        setattr(module, name, value)
    for path, dropped in drops:
        stack = model.get_submodule(path)
        change.removed.extend(p for i in dropped for p in stack[i].parameters())
        for i in reversed(dropped):
            remove_block(model, path, i)
    change.removed.extend(gates.arch_parameters())
    remove_gates(model)
    for text in slices.notes:
        warnings.warn(text, UserWarning, stacklevel=2)
    return change


def _check_removals(model: nn.Module, drops: list[tuple[str, list[int]]]) -> None:
    """Remove the blocks from a copy of ``model`` that shares its tensors, so a refusal (a config depth out of step
    with its layer list, a stack whose keys cannot be renumbered) comes before the model is touched."""
    if not drops:
        return
    shared: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    trainer = getattr(model, "_trainer", None)  # a LightningModule's hooks may reach its Trainer: share it too
    if trainer is not None:
        shared[id(trainer)] = trainer
    try:
        trial = copy.deepcopy(model, shared)
    except Exception:  # not copyable: each removal still checks before it changes anything
        return
    for path, dropped in drops:
        for i in reversed(dropped):
            remove_block(trial, path, i)


def _inside(model: nn.Module, path: str, removed_blocks: set[int]) -> bool:
    """Whether the module at ``path`` is, or is inside, a block that export removes."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if id(model.get_submodule(".".join(parts[:end]))) in removed_blocks:
            return True
    return False
