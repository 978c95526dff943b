"""Architecture events: the one serialisable record of every change made to a model.

A change is decided once (by a callback), recorded as an :class:`ArchitectureEvent`, and applied by
:func:`apply_event`. Checkpoints store the event log; resume and :func:`load_grown` replay it through
the same function, so a new change and a replayed one take the same code path.

Each event kind registers an *applier* ``fn(model, spec) -> AppliedChange``. An applier must validate
everything it needs before it mutates anything, so that a failing event leaves the model untouched.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Key of the event log in a checkpoint dict: ``checkpoint[CHECKPOINT_KEY] = {"version": 1, "events": [...]}``.
CHECKPOINT_KEY = "lightning_depthgrow"
#: Where a module carries its event log: one attribute holding a plain list of :class:`ArchitectureEvent`.
LOG_ATTRIBUTE = "_depthgrow_event_log"


class EventLogMismatchError(RuntimeError):
    """An event log or a checkpoint does not fit the model it was given (a different architecture or weights).

    The one error for "this log/checkpoint does not fit", raised by resume, by
    :func:`~lightning_depthgrow.load_grown` and by :func:`replay_events`; the model is left untouched when it is
    raised by :func:`replay_checked`.
    """


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
        buffers_changed: whether buffers were added or removed (e.g. a residual ramp folded): DDP keeps a list
            of the module's buffers, so it is re-wrapped even when the parameter set did not change.
        rescaled: ``(new, factor)`` pairs for parameters in ``replaced`` whose kept values were also multiplied by
            ``factor`` (broadcast against ``new``): the gradient w.r.t. ``new`` is the kept gradient divided by
            ``factor``, so first-moment state (Adam's ``exp_avg``, SGD's ``momentum_buffer``) is divided by it and
            second-moment state (``exp_avg_sq``, ``max_exp_avg_sq``) by its square.
        copy_state: whether each parameter in ``added`` starts with a copy of its twin's optimizer state (Adam
            moments, ``step``) instead of fresh state (copies of trained blocks, ``optimizer_state="copy"``).
    """

    added: list[tuple[nn.Parameter, nn.Parameter | None]] = field(default_factory=list)
    replaced: list[tuple[nn.Parameter, nn.Parameter, tuple[Tensor | None, ...]]] = field(default_factory=list)
    removed: list[nn.Parameter] = field(default_factory=list)
    new_group: tuple[list[nn.Parameter], dict[str, Any]] | None = None
    buffers_changed: bool = False
    rescaled: list[tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    copy_state: bool = False

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


# ---------------------------------------------------------------- the log a module carries


def event_log(module: nn.Module) -> list[ArchitectureEvent]:
    """The architecture event log carried by ``module`` (created empty on first use).

    The log is the one thing this library stores on a module: a plain list of :class:`ArchitectureEvent`
    (JSON-type fields only), under ``module.__dict__["_depthgrow_event_log"]``. It is the module's architecture
    history, so it travels with ``pickle``, ``copy.deepcopy`` and ``torch.save(module)``: a saved grown module
    can be trained further and checkpointed with its full history.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> event_log(net)
        []
        >>> event_log(net) is event_log(net)
        True
    """
    log = module.__dict__.get(LOG_ATTRIBUTE)
    if log is None:
        log = []
        module.__dict__[LOG_ATTRIBUTE] = log
    return log


# ---------------------------------------------------------------- checkpoints


def checkpoint_entry(events: Iterable[ArchitectureEvent]) -> dict[str, Any]:
    """What a checkpoint stores under :data:`CHECKPOINT_KEY` for ``events``."""
    return {"version": 1, "events": [e.to_dict() for e in events]}


def save_event_log(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Store ``module``'s event log in a checkpoint dict (idempotent; call from ``on_save_checkpoint``)."""
    # Other keys a callback put in the record (a DMS search's ``load_hint``) are kept.
    checkpoint[CHECKPOINT_KEY] = {**checkpoint.get(CHECKPOINT_KEY, {}), **checkpoint_entry(event_log(module))}


def checkpoint_events(checkpoint: Mapping[str, Any]) -> list[ArchitectureEvent]:
    """The event log stored in a checkpoint dict (empty if it has none).

    Example:
        >>> e = ArchitectureEvent("insert_block", {"stack": "blocks", "index": 0, "template": 0, "seed": 0})
        >>> checkpoint_events({CHECKPOINT_KEY: checkpoint_entry([e])}) == [e]
        True
    """
    return [ArchitectureEvent.from_dict(e) for e in checkpoint.get(CHECKPOINT_KEY, {}).get("events", [])]


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Mapping[str, Any]:
    """A checkpoint file's dict (``torch.load`` with ``weights_only=False``: our own and Lightning's entries)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise EventLogMismatchError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    return checkpoint


def load_checkpoint_events(path: str | os.PathLike[str]) -> list[ArchitectureEvent]:
    """The architecture event log stored in a checkpoint file (empty if it has none)."""
    return checkpoint_events(read_checkpoint(path))


def pending_events(
    module: nn.Module, events: list[ArchitectureEvent], source: Any = "the checkpoint"
) -> list[ArchitectureEvent]:
    """The part of ``events`` that ``module`` has not applied yet: its own log must be a prefix of ``events``.

    Raises:
        EventLogMismatchError: the module already carries events that ``events`` does not start with, e.g. a
            checkpoint saved before the module's latest growth.
    """
    log = event_log(module)
    if [e.to_dict() for e in log] != [e.to_dict() for e in events[: len(log)]]:
        raise EventLogMismatchError(
            f"The module already carries {len(log)} architecture event(s) that {source} ({len(events)} event(s)) "
            "does not start with, e.g. it was saved before the module's latest growth. Pass a freshly constructed "
            "starting model: trainer.fit/validate/test/predict(fresh_model, ckpt_path=...) or "
            "lightning_depthgrow.load_grown(fresh_model, ckpt_path)."
        )
    return events[len(log) :]


def replay_checked(
    model: nn.Module,
    events: list[ArchitectureEvent],
    state_dict: Mapping[str, Any] | None = None,
    strict: bool = True,
    record: bool = True,
    check: Callable[[nn.Module], None] | None = None,
) -> list[AppliedChange]:
    """Replay ``events`` on ``model`` only once they, and ``state_dict``'s weights, fit a copy of it.

    The copy gets the events and then ``load_state_dict(state_dict, strict)``; only if both succeed are the
    events replayed on ``model`` (and, with ``record``, appended to its :func:`event_log`). Loading the weights
    into ``model`` itself is left to the caller (Lightning does it right after a resume's replay). ``check``, if
    given, is called on the rebuilt copy before the weights are tried and may raise ``EventLogMismatchError``.

    Raises:
        EventLogMismatchError: the events or the weights do not fit; ``model`` is untouched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> replay_checked(net, [], state_dict={"0.weight": torch.zeros(3, 3)})  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        lightning_depthgrow.events.EventLogMismatchError: the weights do not fit
    """
    if not events and state_dict is None:
        return []
    try:
        probe = copy.deepcopy(model)
    except Exception as err:  # something uncopyable on the module: events are still checked one by one
        warnings.warn(
            f"Could not copy {type(model).__name__} to try its checkpoint on a copy first ({err}); replaying on the "
            "module itself, which a log that does not fit may leave partly changed.",
            stacklevel=2,
        )
        probe = None
    if probe is not None:
        replay_events(probe, events)
        if check is not None:  # the caller's own test of the rebuilt copy; it raises EventLogMismatchError
            check(probe)
        if state_dict is not None:
            try:
                probe.load_state_dict(state_dict, strict=strict)
            except Exception as err:
                raise EventLogMismatchError(
                    f"The checkpoint's weights do not fit the {type(model).__name__} rebuilt from its event log "
                    f"({len(events)} event(s) replayed): {err}\nBuild the same starting model the run started from "
                    "(same constructor arguments); the module was left untouched."
                ) from err
        del probe
    changes = replay_events(model, events)
    if record:
        event_log(model).extend(events)
    return changes
