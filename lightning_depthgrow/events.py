"""Architecture events: the one serialisable record of every change made to a model.

A change is decided once (by a callback), recorded as an :class:`ArchitectureEvent`, and applied by
:func:`apply_event`. Checkpoints store the event log; resume and :func:`load_grown` replay it through
the same function, so a new change and a replayed one take the same code path.

Each event kind registers an *applier* ``fn(model, spec) -> AppliedChange``. An applier must validate
everything it needs before it mutates anything, so that a failing event leaves the model untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn


class EventLogMismatchError(RuntimeError):
    """An event log cannot be applied to the model it was given (a different architecture)."""


@dataclass
class ArchitectureEvent:
    """One change to the architecture.

    Args:
        kind: the applier's name, e.g. ``"insert_block"``, ``"dms_attach"``, ``"dms_export"``.
        spec: everything the applier needs to redo the change deterministically (JSON types only).
        epoch: training epoch at which it happened (``-1`` outside training).
        step: global step at which it happened.
        reason: the numbers that decided it (curvature, budget, ...), for humans and dashboards.
        cost: what it changed (parameters/FLOPs added or removed, seconds spent).

    Example:
        >>> e = ArchitectureEvent("insert_block", {"stack": "blocks", "index": 2, "template": 1, "seed": 0})
        >>> ArchitectureEvent.from_dict(e.to_dict()) == e
        True
    """

    kind: str
    spec: dict[str, Any]
    epoch: int = -1
    step: int = -1
    reason: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe copy (what checkpoints and the history file store)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureEvent:
        """Inverse of :meth:`to_dict`; ``epoch``, ``step``, ``reason`` and ``cost`` may be missing."""
        return cls(
            kind=data["kind"],
            spec=dict(data["spec"]),
            epoch=int(data.get("epoch", -1)),
            step=int(data.get("step", -1)),
            reason=dict(data.get("reason", {})),
            cost=dict(data.get("cost", {})),
        )


@dataclass
class AppliedChange:
    """What an applied event did to the parameter set, so optimizers and DDP can be brought in line.

    Attributes:
        added: ``(new_param, twin)`` pairs; the new parameter joins its twin's optimizer param group
            with fresh state (``twin`` may be ``None``: the new parameter then needs an explicit group).
        replaced: ``(old, new, index)`` triples; ``new`` takes ``old``'s place in the optimizer and its
            state is ``old``'s state indexed by ``index``, a tuple with one entry per dimension
            (``None`` = keep that dimension whole, else a LongTensor of kept positions).
        removed: parameters that left the model; their optimizer entries and state are dropped.
        new_group: parameters that need their own param group (e.g. DMS architecture parameters),
            with the group options to use.
    """

    added: list[tuple[nn.Parameter, nn.Parameter | None]] = field(default_factory=list)
    replaced: list[tuple[nn.Parameter, nn.Parameter, tuple[Tensor | None, ...]]] = field(default_factory=list)
    removed: list[nn.Parameter] = field(default_factory=list)
    new_group: tuple[list[nn.Parameter], dict[str, Any]] | None = None

    @property
    def changes_parameter_set(self) -> bool:
        """Whether optimizers and DDP must be brought in line (any parameter added, replaced or removed)."""
        return bool(self.added or self.replaced or self.removed or self.new_group)


Applier = Callable[[nn.Module, dict[str, Any]], AppliedChange]
_APPLIERS: dict[str, Applier] = {}


def register_event_kind(kind: str, applier: Applier) -> None:
    """Register how events of ``kind`` are applied to a model."""
    _APPLIERS[kind] = applier


def apply_event(model: nn.Module, event: ArchitectureEvent) -> AppliedChange:
    """Apply one event to ``model`` (new or replayed: the same path)."""
    _load_builtin_kinds()
    try:
        applier = _APPLIERS[event.kind]
    except KeyError as err:
        raise EventLogMismatchError(
            f"Unknown architecture event kind {event.kind!r}; known kinds: {sorted(_APPLIERS)}. "
            "Import the module that registers it before loading this checkpoint."
        ) from err
    return applier(model, event.spec)


def replay_events(model: nn.Module, events: Iterable[ArchitectureEvent | dict]) -> list[AppliedChange]:
    """Apply a whole event log in order (used by resume and :func:`lightning_depthgrow.load_grown`).

    On failure the error names the event that did not fit; events before it stay applied, so callers
    that must not leave a half-mutated model replay on a copy or before training state exists.
    """
    changes = []
    for i, raw in enumerate(events):
        event = raw if isinstance(raw, ArchitectureEvent) else ArchitectureEvent.from_dict(raw)
        try:
            changes.append(apply_event(model, event))
        except EventLogMismatchError:
            raise
        except Exception as err:
            raise EventLogMismatchError(
                f"Event {i} ({event.kind} {event.spec}) of the checkpoint's architecture log does not fit "
                f"this {type(model).__name__}: {err}. Build the same starting model the run started from "
                "(same constructor arguments) before resuming or loading."
            ) from err
    return changes


_KINDS_LOADED = False


def _load_builtin_kinds() -> None:
    global _KINDS_LOADED
    if _KINDS_LOADED:
        return
    _KINDS_LOADED = True
    from . import (
        dms,  # noqa: F401  (registers dms_attach / dms_export)
        surgery,  # noqa: F401  (registers insert_block and friends)
    )
