"""Load a grown (or pruned) model from a checkpoint: rebuild its architecture, then load its weights.

A checkpoint written during growth holds weights for the *grown* architecture and the event log that
produced it. :func:`load_grown` replays that log on the freshly built starting model and only then loads
the state dict, so no architecture has to be described by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .adapters.registry import find_block_stacks
from .events import (
    CHECKPOINT_KEY,
    ArchitectureEvent,
    EventLogMismatchError,
    checkpoint_events,
    event_log,
    read_checkpoint,
    replay_checked,
)


def load_grown(
    model: nn.Module,
    checkpoint_path: str | os.PathLike[str],
    strict: bool = True,
    prefix: str | None = None,
    map_location: Any = "cpu",
) -> nn.Module:
    """Replay a checkpoint's architecture events on ``model`` (the starting model), then load its weights.

    Args:
        model: a freshly built model with the run's *starting* architecture: either the LightningModule that
            was trained, or the bare network inside it (e.g. the timm model held as ``self.model``).
        checkpoint_path: a Lightning checkpoint written while a growth/DMS callback was active (or any
            ``torch.save``'d dict with a ``"state_dict"`` entry).
        strict: passed to ``load_state_dict``; with ``True`` every key and shape must match.
        prefix: the dotted prefix of ``model``'s keys inside the checkpoint (``"model."`` when the bare
            network is given and the LightningModule stored it as ``self.model``). ``None`` detects it.
        map_location: where to load the checkpoint's tensors.

    Returns:
        ``model`` itself, grown in place and holding the checkpoint's weights.

    Raises:
        EventLogMismatchError: the event log does not fit ``model`` (another starting depth or width), or
            after replay the weights' keys or shapes still differ; the message shows the architecture the
            checkpoint holds next to the one given. ``model`` is left untouched in that case.

    Example:
        >>> from examples.common import Classifier, make_vit  # doctest: +SKIP
        >>> vit = load_grown(make_vit(depth=2), "epoch=5.ckpt")  # doctest: +SKIP
        >>> len(vit.blocks)  # doctest: +SKIP
        4
    """
    checkpoint = read_checkpoint(checkpoint_path, map_location=map_location)
    state = checkpoint.get("state_dict", checkpoint)
    events = checkpoint_events(checkpoint)
    if prefix is None:
        prefix = detect_prefix(model, state)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    root = _mount(model, prefix)
    own = {k: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)
    hint = checkpoint.get(CHECKPOINT_KEY, {}).get("load_hint")
    # Events and weights are tried on a copy first: a log or state that does not fit leaves the model as it was.
    try:
        replay_checked(
            root, events, own, strict=strict, record=False, check=lambda probe: _inside(probe, prefix, events, hint)
        )
    except EventLogMismatchError as err:
        raise EventLogMismatchError(f"{err}\n{_architectures(state, model, prefix, checkpoint_path)}") from err
    root.load_state_dict(own, strict=strict)
    if not prefix:
        # The model now carries its history, so training it further continues the same log.
        event_log(model)[:] = events
    return model


def detect_prefix(model: nn.Module, state_dict: Mapping[str, Any]) -> str:
    """The prefix under which ``model``'s own keys appear in ``state_dict`` (``""`` if they appear as they are).

    The candidate that covers the most of the model's keys wins; ties go to the shortest prefix.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> detect_prefix(net, {"model.weight": 0, "model.bias": 0})
        'model.'
    """
    own = list(model.state_dict())
    if not own:
        return ""
    counts: dict[str, int] = {}
    for probe in own[:8]:
        for key in state_dict:
            if key == probe or key.endswith("." + probe):
                counts.setdefault(key[: len(key) - len(probe)], 0)
    for candidate in counts:
        counts[candidate] = sum(candidate + k in state_dict for k in own)
    if not counts:
        raise EventLogMismatchError(
            f"None of {type(model).__name__}'s keys (e.g. {own[:3]}) appear in the checkpoint (e.g. "
            f"{list(state_dict)[:3]}); pass prefix=... or the model that was trained."
        )
    return min(counts, key=lambda c: (-counts[c], len(c)))


def _inside(root: nn.Module, prefix: str, events: list[ArchitectureEvent], hint: str | None) -> None:
    """Raise if the replayed ``events`` put state outside the network mounted at ``prefix``."""
    outside = [k for k in root.state_dict() if prefix and not k.startswith(prefix)]
    if outside:
        # The log put modules on the module it was recorded on, next to the network (e.g. a DMS search's gates):
        # a bare network cannot hold them. ``hint`` is what the callback that wrote the checkpoint says to do.
        raise EventLogMismatchError(
            f"The checkpoint's architecture log ({', '.join(sorted({e.kind for e in events}))}) adds modules outside "
            f"the network at {prefix!r} (e.g. {outside[:2]}), which a bare {type(root).__name__} cannot hold. "
            + (
                hint
                or "Load it into the module that was trained (a freshly built LightningModule), or use a checkpoint "
                "saved after those modules were removed."
            )
        )


def _mount(model: nn.Module, prefix: str) -> nn.Module:
    """A root module holding ``model`` at ``prefix``, so events and keys recorded on the outer module apply."""
    if not prefix:
        return model
    parts = prefix.rstrip(".").split(".")
    root = holder = nn.Module()
    for part in parts[:-1]:
        child = nn.Module()
        holder.add_module(part, child)
        holder = child
    holder.add_module(parts[-1], model)
    return root


def _architectures(state: Mapping[str, Any], model: nn.Module, prefix: str, path: Any) -> str:
    """Side-by-side depth of every block stack: checkpoint's weights vs the model given."""
    held, given = {}, {}
    for stack in find_block_stacks(model):
        # Child keys are the index after the container's own prefix ("encoder_layer_3" in torchvision's ViT).
        head = f"{prefix}{stack.path}." if stack.path else prefix
        keys = {k[len(head) :].split(".", 1)[0] for k in state if k.startswith(head)}
        child = stack.key_prefix or ""
        held[stack.path] = len({k for k in keys if k.startswith(child) and k[len(child) :].isdigit()})
        given[stack.path] = len(stack)
    own = model.state_dict()
    differing = [
        k
        for k, v in state.items()
        if k.startswith(prefix)
        and isinstance(v, torch.Tensor)
        and k[len(prefix) :] in own
        and tuple(own[k[len(prefix) :]].shape) != tuple(v.shape)
    ]
    shapes = ""
    if differing:
        k = differing[0]
        shapes = f"; e.g. {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k[len(prefix) :]].shape)}"
    return f"Checkpoint {path} holds block-stack depths {held}; the model given has {given}{shapes}."
