"""Which parameters make up which block: the grouping curvature is reported in."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from ..adapters import find_block_stacks
from .estimators import MODEL_KEY as MODEL  # reserved: the key of whole-model results

STEM = "stem"
HEAD = "head"
OTHER = "other"


def discover_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Group the trainable parameters of ``model`` into named blocks, in ``named_parameters()`` order.

    * Every block of every stack found by :func:`lightning_depthgrow.adapters.find_block_stacks` is a
      block named by its path (``"blocks.0"``, ``"layer2.1"``, ``"stages.1.blocks.0"``).
    * Parameters before the first block parameter form ``"stem"``, those after the last form ``"head"``.
    * Parameters in between that belong to no block (ConvNeXt/Swin downsampling layers between stages)
      form one ``"other"`` group, so a block's numbers describe only the block's own parameters.
    * Without any registered stack (a ``UserWarning`` says so: there is no block structure to report),
      wrappers that hold all parameters in one child (a ``LightningModule``'s ``self.model``) are looked
      through, and every child of the first module with several trainable children is a block named by its
      path (an ``nn.Sequential`` MLP gives ``"0"``, ``"2"``; the same MLP as ``self.model`` of a
      ``LightningModule`` gives ``"model.0"``, ``"model.2"``). Parameters held directly by that module go to
      ``"other"``. A bare leaf module gives a single block ``"root"``. No block is ever named ``"model"``,
      the key of whole-model results (such a child is reported as ``"model_block"``).

    Frozen parameters (``requires_grad=False``) are left out. Empty groups are omitted.

    Example:
        >>> import torch.nn as nn
        >>> discover_blocks(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    block_names = [s.block_name(i) for s in find_block_stacks(model) for i in range(len(s))]
    if not block_names:
        return _top_level_blocks(model, names)

    owner = {}
    for name in names:
        owner[name] = next((b for b in block_names if name.startswith(b + ".")), None)
    in_block = [i for i, n in enumerate(names) if owner[n] is not None]
    first, last = in_block[0], in_block[-1]
    groups: dict[str, list[str]] = {STEM: []}
    groups.update({b: [] for b in block_names})
    groups[OTHER] = []
    groups[HEAD] = []
    for i, name in enumerate(names):
        if owner[name] is not None:
            groups[owner[name]].append(name)
        elif i < first:
            groups[STEM].append(name)
        elif i > last:
            groups[HEAD].append(name)
        else:
            groups[OTHER].append(name)
    return {k: v for k, v in groups.items() if v}


def _top_level_blocks(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    warnings.warn(
        f"No registered block structure (residual stack) found in {type(model).__name__}: curvature is reported "
        "per child module instead (see discover_blocks), and growth callbacks have no blocks to act on. Register "
        "the stack (lightning_depthgrow.adapters) or pass blocks=... explicitly.",
        UserWarning,
        stacklevel=3,
    )
    # Look through wrappers whose trainable parameters all sit in one child (LightningModule.model, ...).
    prefix, module = "", model
    while True:
        owners = {n[len(prefix) :].split(".", 1)[0] for n in names if n.startswith(prefix)}
        child = next(iter(owners)) if len(owners) == 1 else None
        if child is None or child not in dict(module.named_children()):
            break
        prefix, module = f"{prefix}{child}.", getattr(module, child)
    children = [f"{prefix}{c}" for c, _ in module.named_children()]
    groups: dict[str, list[str]] = {}
    for name in names:
        owner = next((c for c in children if name.startswith(c + ".")), None)
        groups.setdefault(owner if owner is not None else OTHER, []).append(name)
    if list(groups) == [OTHER] and not children:
        return {"root": groups[OTHER]}
    # Never the whole-model key: "curvature/trace/model" must mean one thing.
    return {(f"{MODEL}_block" if block == MODEL else block): members for block, members in groups.items()}


def resolve_blocks(
    model: nn.Module, blocks: Mapping[str, Sequence[str]] | Sequence[str] | None
) -> dict[str, list[str]]:
    """Validate user-given blocks and expand module names into parameter names.

    ``blocks`` maps a block name to parameter names and/or module names (a module stands for all of
    its trainable parameters); a plain list of module names makes one block per module. ``None``
    means :func:`discover_blocks`. Raises ``ValueError`` naming what is unknown, frozen or empty.
    """
    if blocks is None:
        groups = discover_blocks(model)
        if not groups:
            raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True; nothing to measure.")
        return groups
    if isinstance(blocks, str) or not isinstance(blocks, (Mapping, Sequence)):
        raise TypeError(
            "blocks must be a dict {block name: [parameter or module names]} or a list of module names, "
            f"got {type(blocks).__name__}"
        )
    if not isinstance(blocks, Mapping):
        blocks = {name: [name] for name in blocks}
    if MODEL in blocks:
        raise ValueError(f"{MODEL!r} is reserved for whole-model results; rename that block.")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    resolved: dict[str, list[str]] = {}
    for block, members in blocks.items():
        if isinstance(members, str):
            members = [members]
        names: list[str] = []
        for member in members:
            if member in params:
                if not params[member].requires_grad:
                    raise ValueError(
                        f"Block {block!r}: parameter {member!r} has requires_grad=False; curvature is only "
                        "measured for trainable parameters. Remove it from the block or unfreeze it."
                    )
                names.append(member)
            elif member in modules:
                prefix = f"{member}." if member else ""
                names.extend(n for n, p in params.items() if n.startswith(prefix) and p.requires_grad)
            else:
                close = difflib.get_close_matches(member, [*params, *modules], n=3)
                raise ValueError(
                    f"Block {block!r}: {member!r} is neither a parameter nor a module of {type(model).__name__}."
                    f" Did you mean one of {close}? Names are as in model.named_parameters()/named_modules()."
                )
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError(f"Block {block!r} has no trainable parameters; give it at least one.")
        resolved[block] = names
    return resolved
