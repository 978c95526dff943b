"""Architecture history: what a model looked like as it trained, what changed it, and its curvature.

A plain, serialisable record (no Lightning) built by :class:`lightning_depthgrow.callbacks.ArchitectureLogger`
and read by :mod:`lightning_depthgrow.report`. Four kinds of rows:

* :class:`ArchitectureSnapshot`: depth per block stack, widths per block, parameter count and FLOPs, taken
  by :func:`describe_architecture`.
* :class:`CurvatureRecord`: one curvature estimate per block (Hessian trace per parameter, trace, its
  standard error, top eigenvalue), copied from a curvature monitor's ``history``.
* :class:`EventRow`: one :class:`~lightning_depthgrow.events.ArchitectureEvent`, with ``location`` (the
  position where it acted), ``block_id`` (the identity of that block) and a one-line ``summary``.
* training metrics (``metrics``): the training loss and validation metrics, ``{name: [[step, value], ...]}``.

**Time axis.** Every row carries ``step``, the trainer's global step (optimizer steps so far) when it was
recorded; that is the one axis the report and the loggers plot against. ``epoch`` is kept alongside: for a
snapshot the number of *completed* epochs, for an estimate or an event the index of the epoch during which
it happened.

**Block identities.** A position (``model.blocks.2``) names different blocks before and after an insertion.
Every block therefore also gets an identity at birth, derived from the event log alone by
:class:`BlockIdentities`: ``"<stack>#<i>"`` for the block at position ``i`` of the starting model and
``"<stack>#e<k>"`` for the block that event ``k`` of the log inserted. Rows keep the position they were
observed at and map it to identities (``block_ids``); every logger and the report use the identities.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import find_block_stacks
from .events import ArchitectureEvent
from .measure import count_flops

HISTORY_FILENAME = "architecture_history.json"
FORMAT_VERSION = 1


@dataclass
class ArchitectureSnapshot:
    """The architecture at one point of training.

    Attributes:
        epoch: completed training epochs when observed (0 = before training).
        step: global optimizer step when observed.
        depth: number of blocks per block stack, keyed by the stack's dotted path.
        widths: per block (dotted position) its widths: ``"<sub>.num_heads"`` for attention modules,
            ``"<sub>.out_features"`` for MLP ``fc1`` layers, ``"<sub>.out_channels"`` for convolutions.
        params: total number of parameters.
        flops: FLOPs of one forward pass on one sample, or ``None`` when not measured.
        phase: when it was taken (``"train_start"``, ``"epoch_end"``, ``"train_end"`` or ``""``).
        num_events: how many events of the log had been applied to the model observed (``None``: unknown;
            :meth:`ArchitectureHistory.assign_block_ids` then infers it from the depths at that step).
        block_ids: the identity of the block at each position of ``widths`` (filled by the history).
    """

    epoch: int
    step: int
    depth: dict[str, int]
    widths: dict[str, dict[str, int]]
    params: int
    flops: int | None = None
    phase: str = ""
    num_events: int | None = None
    block_ids: dict[str, str] = field(default_factory=dict)

    @property
    def total_depth(self) -> int:
        """Blocks summed over all stacks."""
        return sum(self.depth.values())

    def same_architecture(self, other: ArchitectureSnapshot) -> bool:
        """Whether ``other`` describes the same structure (ignores when it was taken)."""
        return (self.depth, self.widths, self.params) == (other.depth, other.widths, other.params)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the form stored in ``architecture_history.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureSnapshot:
        """Inverse of :meth:`to_dict`."""
        flops, num_events = data.get("flops"), data.get("num_events")
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            depth={k: int(v) for k, v in data["depth"].items()},
            widths={b: {k: int(v) for k, v in w.items()} for b, w in data.get("widths", {}).items()},
            params=int(data["params"]),
            flops=None if flops is None else int(flops),
            phase=str(data.get("phase", "")),
            num_events=None if num_events is None else int(num_events),
            block_ids=dict(data.get("block_ids") or {}),
        )


@dataclass
class CurvatureRecord:
    """One per-block curvature estimate (numbers per block position; missing statistics are empty dicts).

    ``block_ids`` (position -> identity) is filled by :meth:`ArchitectureHistory.assign_block_ids`;
    :meth:`by_id` re-keys the trace per parameter.
    """

    epoch: int
    step: int
    trace_per_param: dict[str, float]
    trace: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    top_eigenvalue: dict[str, float] = field(default_factory=dict)
    valid: bool = True
    block_ids: dict[str, str] = field(default_factory=dict)

    def by_id(self) -> dict[str, float]:
        """Trace per parameter keyed by block identity (positions without an identity keep their name)."""
        return {self.block_ids.get(b, b): v for b, v in self.trace_per_param.items()}

    @classmethod
    def from_monitor_entry(cls, entry: dict[str, Any]) -> CurvatureRecord:
        """Convert one entry of a curvature monitor's ``history`` list.

        Expected keys: ``epoch``, ``step``, ``traces`` (``{block: {"mean", "stderr", "num_probes"}}``),
        ``trace_per_param`` (``{block: float}``), optional ``top_eigenvalues`` (``{block: float}``) and
        ``valid``.
        """
        traces = entry.get("traces") or {}
        eigen = entry.get("top_eigenvalues") or {}
        return cls(
            epoch=int(entry.get("epoch", -1)),
            step=int(entry.get("step", -1)),
            trace_per_param={b: float(v) for b, v in (entry.get("trace_per_param") or {}).items()},
            trace={b: float(t["mean"]) for b, t in traces.items()},
            stderr={b: float(t["stderr"]) for b, t in traces.items() if "stderr" in t},
            top_eigenvalue={b: float(v) for b, v in eigen.items() if isinstance(v, (int, float))},
            valid=bool(entry.get("valid", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; non-finite numbers become ``None``."""
        return _finite_or_none(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurvatureRecord:
        """Inverse of :meth:`to_dict`; ``None`` numbers are read back as NaN."""

        def floats(key: str) -> dict[str, float]:
            return {b: math.nan if v is None else float(v) for b, v in (data.get(key) or {}).items()}

        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            trace_per_param=floats("trace_per_param"),
            trace=floats("trace"),
            stderr=floats("stderr"),
            top_eigenvalue=floats("top_eigenvalue"),
            valid=bool(data.get("valid", True)),
            block_ids=dict(data.get("block_ids") or {}),
        )


@dataclass
class EventRow:
    """One architecture event as a table row.

    ``location`` is the position where it acted at the time (for an insertion: the new block's position);
    ``block_id`` the identity of that block (:class:`BlockIdentities`; for an insertion the new block's)
    and ``summary`` one line for humans; both are filled by :meth:`ArchitectureHistory.assign_block_ids`.
    """

    epoch: int
    step: int
    kind: str
    location: str
    reason: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    block_id: str = ""
    summary: str = ""

    @classmethod
    def from_event(cls, event: ArchitectureEvent | EventRow) -> EventRow:
        """The row of ``event``, with its location (block or layer) taken from its spec."""
        if isinstance(event, EventRow):
            return event
        data = event.to_dict()
        return cls(
            epoch=data["epoch"],
            step=data["step"],
            kind=data["kind"],
            location=event_location(data["kind"], data["spec"]),
            reason=data["reason"],
            cost=data["cost"],
            spec=data["spec"],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; values JSON cannot hold are stored as strings, non-finite numbers as ``None``."""
        return _finite_or_none(json.loads(json.dumps(asdict(self), default=str)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventRow:
        """Inverse of :meth:`to_dict`."""
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            kind=str(data["kind"]),
            location=str(data.get("location", "")),
            reason=dict(data.get("reason", {})),
            cost=dict(data.get("cost", {})),
            spec=dict(data.get("spec", {})),
            block_id=str(data.get("block_id", "")),
            summary=str(data.get("summary", "")),
        )


# Spec keys that name where an event acted, most specific first; ``index`` refines a stack path.
_LOCATION_KEYS = ("location", "block", "module", "layer", "linear", "stack", "path")
# Kinds whose spec ``index`` is not the block acted on: ``insert_block`` inserts *after* ``index``.
_INDEX_OFFSET = {"insert_block": 1}


def event_location(kind: str, spec: dict[str, Any]) -> str:
    """Where an event acted, from its spec: the new block's position for an insertion, else the named module.

    DMS events (spec ``keep`` or ``gates``: gate names such as ``model/blocks/0:mlp``) act on whole stacks:
    their location is the comma-separated stack paths of their gates.

    Example:
        >>> event_location("insert_block", {"stack": "model.blocks", "index": 2, "template": 1, "seed": 0})
        'model.blocks.3'
        >>> event_location("dms_export", {"keep": {"blocks/0:mlp": [1], "blocks/1:mlp": [0], "blocks:depth": [0, 1]}})
        'blocks'
        >>> event_location("custom", {"seed": 0})
        ''
    """
    for key in _LOCATION_KEYS:
        value = spec.get(key)
        if isinstance(value, str):
            index = spec.get("index")
            if key in ("stack", "path") and isinstance(index, int):
                return f"{value}.{index + _INDEX_OFFSET.get(kind, 0)}"
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)
    gates = spec.get("keep") if isinstance(spec.get("keep"), dict) else None
    if gates is None and isinstance(spec.get("gates"), list):
        gates = [g["name"] for g in spec["gates"] if isinstance(g, dict) and isinstance(g.get("name"), str)]
    if gates:
        return ",".join(dict.fromkeys(_gate_stack(name) for name in gates))
    return ""


def _gate_stack(gate: str) -> str:
    """``"model/blocks/0:mlp"`` -> ``"model.blocks"``: the stack a DMS gate sits in."""
    path = gate.split(":", 1)[0].replace("/", ".")
    head, _, tail = path.rpartition(".")
    return head if tail.isdigit() else path


# ------------------------------------------------------------------------------------------ block identities


def start_block_id(stack: str, index: int) -> str:
    """Identity of the block at position ``index`` of ``stack`` in the starting model: ``"blocks#3"``."""
    return f"{stack}#{index}"


def grown_block_id(stack: str, event_index: int) -> str:
    """Identity of the block that event ``event_index`` of the log inserted into ``stack``: ``"blocks#e4"``."""
    return f"{stack}#e{event_index}"


class BlockIdentities:
    """Which block sits at which position, before and after each event of a log (a pure function of it).

    ``order(k)`` is ``{stack: [identity of the block at position i]}`` once the first ``k`` events are
    applied. Blocks of the starting model get :func:`start_block_id` (by position), a block inserted by
    event ``k`` (``insert_block``) gets :func:`grown_block_id`; ``dms_export`` events remove the blocks their
    depth gates dropped (the gates' positions come from the preceding ``dms_attach`` event). Other kinds do
    not move blocks.

    Args:
        start_depth: blocks per stack of the model before the first event.
        events: the event log, as rows, events or their dicts.

    Example:
        >>> log = [ArchitectureEvent("insert_block", {"stack": "blocks", "index": 0, "template": 0, "seed": 0})]
        >>> ids = BlockIdentities({"blocks": 2}, log)
        >>> ids.order(0), ids.order(1)
        ({'blocks': ['blocks#0', 'blocks#1']}, {'blocks': ['blocks#0', 'blocks#e0', 'blocks#1']})
        >>> ids.id_of("blocks.2", 1), ids.id_of("blocks.1.mlp.fc1", 0), ids.id_of("head", 1)
        ('blocks#1', 'blocks#1.mlp.fc1', 'head')
    """

    def __init__(self, start_depth: dict[str, int], events: Iterable[EventRow | ArchitectureEvent | dict]) -> None:
        self.events = [_as_row(e) for e in events]
        state = {stack: [start_block_id(stack, i) for i in range(n)] for stack, n in start_depth.items()}
        self._states = [state]
        gates: dict[str, dict[str, Any]] = {}
        for k, event in enumerate(self.events):
            state = _apply_to_order(state, k, event, gates)
            self._states.append(state)

    @classmethod
    def from_observation(
        cls, depth: dict[str, int], num_events: int, events: Iterable[EventRow | ArchitectureEvent | dict]
    ) -> BlockIdentities:
        """The identities of a log whose first ``num_events`` events had been applied to a model with ``depth``."""
        events = [_as_row(e) for e in events]
        # Run the events on padded stacks (long enough for any index they name: one per insertion, and every
        # block a depth gate could remove) to learn how each stack's depth changed, then undo that.
        gated = [g for e in events[:num_events] for g in e.spec.get("gates") or () if isinstance(g, dict)]
        pad = 1 + num_events + sum(len(g.get("blocks") or ()) for g in gated)
        padded = cls({s: n + pad for s, n in depth.items()}, events[:num_events]).order(num_events)
        start = {s: max(0, depth[s] - (len(padded.get(s, ())) - (depth[s] + pad))) for s in depth}
        return cls(start, events)

    def __len__(self) -> int:
        return len(self.events)

    def order(self, num_events: int) -> dict[str, list[str]]:
        """``{stack: [identities in position order]}`` after the first ``num_events`` events."""
        return {s: list(ids) for s, ids in self._states[min(max(num_events, 0), len(self.events))].items()}

    def depth(self, num_events: int) -> dict[str, int]:
        """Blocks per stack after the first ``num_events`` events."""
        return {s: len(ids) for s, ids in self._states[min(max(num_events, 0), len(self.events))].items()}

    def id_of(self, position: str, num_events: int) -> str:
        """The identity behind a dotted position (a stack block, or a module inside one) after ``num_events``
        events; names outside every stack (``"head"``) are their own identity."""
        state = self._states[min(max(num_events, 0), len(self.events))]
        found = _split_position(position, state)
        if found is None:
            return position
        stack, index, rest = found
        ids = state[stack]
        if index >= len(ids):
            return position
        return ids[index] + (f".{rest}" if rest else "")

    def position_of(self, block_id: str, num_events: int) -> str | None:
        """Where block ``block_id`` sits after ``num_events`` events (``None``: not in the model then)."""
        for stack, ids in self._states[min(max(num_events, 0), len(self.events))].items():
            if block_id in ids:
                i = ids.index(block_id)
                return f"{stack}.{i}" if stack else str(i)
        return None

    def resolve(self, step: int, names: Iterable[str], depth: dict[str, int] | None = None) -> int:
        """How many events had been applied when a row with ``step`` naming positions ``names`` was observed.

        Candidates are the counts from the events strictly before ``step`` to those at or before it (events
        at the same step may come before or after the row). With ``depth`` (a snapshot) the first count with
        those depths wins, else the first whose positions are exactly the stack blocks ``names`` lists.
        """
        lo = sum(1 for e in self.events if e.step < step)
        hi = sum(1 for e in self.events if e.step <= step)
        names = list(names)
        for k in range(lo, hi + 1):
            depths = self.depth(k)
            if depth is not None:
                if all(depths.get(s) == n for s, n in depth.items()):
                    return k
                continue
            seen: dict[str, set[int]] = {}
            for name in names:
                found = _split_position(name, self._states[k])
                if found is not None and not found[2]:
                    seen.setdefault(found[0], set()).add(found[1])
            if all(idx == set(range(depths[s])) for s, idx in seen.items()):
                return k
        return hi if depth is not None else lo


def _as_row(event: EventRow | ArchitectureEvent | dict) -> EventRow:
    if isinstance(event, dict):
        return (
            EventRow.from_dict(event)
            if "location" in event
            else EventRow.from_event(ArchitectureEvent.from_dict(event))
        )
    return EventRow.from_event(event)


def _apply_to_order(
    state: dict[str, list[str]], k: int, event: EventRow, gates: dict[str, dict[str, Any]]
) -> dict[str, list[str]]:
    """The block order after ``event`` (number ``k``); ``gates`` tracks the latest ``dms_attach`` gate specs."""
    spec = event.spec
    new = {s: list(ids) for s, ids in state.items()}
    if event.kind == "insert_block" and isinstance(spec.get("stack"), str) and isinstance(spec.get("index"), int):
        stack = spec["stack"]
        ids = new.setdefault(stack, [])
        while len(ids) <= spec["index"]:  # a stack the first observation did not cover: name its blocks by position
            ids.append(start_block_id(stack, len(ids)))
        ids.insert(spec["index"] + 1, grown_block_id(stack, k))
    elif event.kind == "dms_attach" and isinstance(spec.get("gates"), list):
        gates.clear()
        gates.update({g["name"]: g for g in spec["gates"] if isinstance(g, dict) and "name" in g})
    elif event.kind == "dms_export" and isinstance(spec.get("keep"), dict):
        for name, kept in spec["keep"].items():
            gate = gates.get(name)
            if gate is None or gate.get("site") != "depth" or gate.get("stack") not in new:
                continue
            positions = gate.get("blocks", [])
            dropped = {positions[j] for j in range(len(positions)) if j not in set(kept)}
            new[gate["stack"]] = [b for i, b in enumerate(new[gate["stack"]]) if i not in dropped]
    return new


def _split_position(name: str, state: dict[str, list[str]]) -> tuple[str, int, str] | None:
    """``"model.blocks.2.mlp"`` -> ``("model.blocks", 2, "mlp")`` for a known stack (longest match)."""
    best = None
    for stack in state:
        prefix = f"{stack}." if stack else ""
        if not name.startswith(prefix):
            continue
        head, _, rest = name[len(prefix) :].partition(".")
        if head.isdigit() and (best is None or len(stack) > len(best[0])):
            best = (stack, int(head), rest)
    return best


# ------------------------------------------------------------------------------------------ summaries


def event_summary(event: EventRow, identities: BlockIdentities | None = None, index: int | None = None) -> str:
    """One line saying what an event did, why, and what it cost, with blocks named by identity.

    Example:
        >>> row = EventRow(0, 40, "insert_block", "blocks.2", spec={"stack": "blocks", "index": 1, "template": 1},
        ...     reason={"block": "blocks.1", "score": 0.039, "score_name": "trace_per_param",
        ...             "runners_up": [{"block": "blocks.0", "score": 0.034}]}, cost={"params": 8544})
        >>> print(event_summary(row).replace(": ", ":\\n"))
        inserted a new block after blocks.1 (copy of blocks.1):
        trace/param 0.039 vs 0.034 next best (blocks.0); +8.54k params
    """

    def named(position: str) -> str:
        if identities is None or index is None:
            return position
        return identities.id_of(position, index)

    r, c, s = event.reason, event.cost, event.spec
    costs = []
    for key, unit in (("params", "params"), ("flops", "FLOPs")):
        if isinstance(c.get(key), (int, float)):
            costs.append(f"{c[key]:+,.0f} {unit}" if abs(c[key]) < 1000 else f"{_signed(c[key])} {unit}")
    if event.kind == "insert_block":
        stack = s.get("stack", "")
        after = f"{stack}.{s['index']}" if isinstance(s.get("index"), int) else r.get("block", "?")
        template = f"{stack}.{s['template']}" if isinstance(s.get("template"), int) else None
        text = f"inserted a new block after {named(after)}"
        if template is not None:
            text += f" (copy of {named(template)})"
        if isinstance(r.get("score"), (int, float)):
            text += f": {_SCORE_LABELS.get(r.get('score_name'), r.get('score_name', 'score'))} {r['score']:.3g}"
            runners = [x for x in r.get("runners_up") or [] if isinstance(x.get("score"), (int, float))]
            if runners:
                text += f" vs {runners[0]['score']:.3g} next best ({named(runners[0]['block'])})"
            elif "runners_up" in r:
                text += " (no other candidate)"
    elif event.kind == "dms_export":
        removed: list[str] = []
        if identities is not None and index is not None:
            after = {b for ids in identities.order(index + 1).values() for b in ids}
            removed = [b for ids in identities.order(index).values() for b in ids if b not in after]
        gone = {identities.position_of(b, index) for b in removed} if removed else set()
        text = "DMS export: kept " + _kept_summary(r, s, gone)
        if removed:
            text += f"; removed {', '.join(removed)}"
        resources = [k[: -len("_before")] for k in c if k.endswith("_before") and f"{k[:-7]}_after" in c]
        for res in resources:
            before, after = c[f"{res}_before"], c[f"{res}_after"]
            if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
                target = r.get("target_ratio")
                target = f", target {target:.0%}" if isinstance(target, (int, float)) else ""
                costs.append(
                    f"{res} (DMS count) {format_count(before)} → {format_count(after)} ({after / before:.0%}{target})"
                )
    elif event.kind == "dms_attach":
        kinds: dict[str, int] = {}
        for gate in s.get("gates") or []:
            kinds[gate.get("kind", "?")] = kinds.get(gate.get("kind", "?"), 0) + 1
        text = "DMS attached " + ", ".join(f"{n} {kind} gate{'s' * (n > 1)}" for kind, n in kinds.items())
        text += f" to {event.location}" if event.location else ""
    elif event.kind == "neuron_branch":
        neurons = s.get("neurons") or []
        text = f"split {len(neurons)} neuron{'s' * (len(neurons) != 1)} of {named(s.get('linear', '?'))}"
        values = [v for v in r.get("eigenvalues") or [] if isinstance(v, (int, float))]
        if values:
            text += f": splitting eigenvalue down to {min(values):.3g}"
            if isinstance(r.get("threshold"), (int, float)):
                text += f" (threshold {r['threshold']:.3g})"
    else:
        text = event.kind + (f" at {named(event.location)}" if event.location else "")
    return text + ("; " + ", ".join(costs) if costs else "")


_SCORE_LABELS = {"trace_per_param": "trace/param", "segment_crowding": "crowding", "depth_ratio": "depth ratio"}


def _kept_summary(
    reason: dict[str, Any], spec: dict[str, Any], removed: frozenset[str | None] | set[str | None] = frozenset()
) -> str:
    """``"10/64 MLP units in 4 blocks, 4/8 heads in 4 blocks, 3/4 gated blocks"`` from a DMS export's reason
    (``kept`` and ``n`` per gate), or from its spec's kept indices when the reason lacks them; width gates of
    ``removed`` blocks (positions) are not counted."""
    keep = spec.get("keep") if isinstance(spec.get("keep"), dict) else {}
    kept = reason.get("kept") or {name: len(v) for name, v in keep.items()}
    total = reason.get("n") or {}
    groups: dict[str, list[int]] = {}
    for name, k in kept.items():
        if name.split(":", 1)[0].replace("/", ".") in removed:
            continue
        group = groups.setdefault(name.rsplit(":", 1)[-1], [0, 0, 0])
        group[0] += int(k)
        group[1] += int(total[name]) if name in total else -(10**9)  # unknown total: shown without "/n"
        group[2] += 1
    parts = []
    for kind, (k, n, count) in groups.items():
        fraction = f"{k}/{n}" if n >= 0 else str(k)
        if kind == "depth":
            parts.append(f"{fraction} gated blocks")
        else:
            unit = _GATE_UNITS.get(kind, f"{kind} channels")
            parts.append(f"{fraction} {unit} in {count} block{'s' * (count > 1)}")
    return ", ".join(parts) or "nothing recorded"


_GATE_UNITS = {"heads": "heads", "mlp": "MLP units"}


def format_count(value: float | None, digits: int = 3) -> str:
    """A count in readable units: ``1234 -> '1.23k'``, ``2.5e6 -> '2.5M'`` (``None`` -> ``'n/a'``).

    Example:
        >>> format_count(300000), format_count(8544), format_count(12), format_count(-2.5e9)
        ('300k', '8.54k', '12', '-2.5G')
    """
    if value is None or not math.isfinite(value):
        return "n/a"
    exponent = int(math.log10(abs(value)) // 3) if abs(value) >= 1 else 0
    exponent = max(0, min(exponent, 4))
    text = f"{value / 10 ** (3 * exponent):.{digits}g}"
    return text + ["", "k", "M", "G", "T"][exponent]


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "") + format_count(value)


# Columns of events.csv and the W&B events table that every row has; typed ``reason.*``/``cost.*`` columns follow.
EVENT_COLUMNS = ["step", "epoch", "kind", "block_id", "location", "summary"]
_JSON_COLUMNS = ["reason", "cost", "spec"]


def flatten_event(event: EventRow) -> dict[str, Any]:
    """An event as one flat row: :data:`EVENT_COLUMNS`, then one column per scalar (number, string, bool) of
    its reason and cost (``reason.score``, ``cost.params``), then the full reason, cost and spec as JSON.

    Example:
        >>> row = EventRow(0, 8, "insert_block", "blocks.1",
        ...     reason={"score": 0.5, "runners_up": []}, cost={"params": 9})
        >>> {k: v for k, v in flatten_event(row).items() if "." in k}
        {'reason.score': 0.5, 'cost.params': 9}
    """
    row: dict[str, Any] = {c: getattr(event, c) for c in EVENT_COLUMNS}
    for part in ("reason", "cost"):
        for key, value in getattr(event, part).items():
            if value is None or isinstance(value, (bool, int, float, str)):
                row[f"{part}.{key}"] = _finite_or_none(value)
    data = event.to_dict()
    row.update({c: json.dumps(data[c], allow_nan=False) for c in _JSON_COLUMNS})
    return row


def write_events_csv(events: Iterable[EventRow], path: str | os.PathLike | Any) -> None:
    """Write events as CSV (columns of :func:`flatten_event`, the union over events) to a path or a text file;
    a path is written atomically. :func:`read_events_csv` reads it back."""
    import csv

    event_list = list(events)
    rows = [flatten_event(e) for e in event_list]
    scalar = list(dict.fromkeys(c for r in rows for c in r if c not in EVENT_COLUMNS and c not in _JSON_COLUMNS))
    columns = EVENT_COLUMNS + scalar + _JSON_COLUMNS
    if not hasattr(path, "write"):
        _write_atomically(path, ".events.", lambda f: write_events_csv(event_list, f), newline="")
        return
    writer = csv.DictWriter(path, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def read_events_csv(path: str | os.PathLike) -> list[EventRow]:
    """The events of a CSV written by :func:`write_events_csv` (from its JSON columns)."""
    import csv

    with open(path, newline="") as f:
        return [
            EventRow(
                epoch=int(r["epoch"]),
                step=int(r["step"]),
                kind=r["kind"],
                location=r["location"],
                reason=json.loads(r["reason"]),
                cost=json.loads(r["cost"]),
                spec=json.loads(r["spec"]),
                block_id=r["block_id"],
                summary=r["summary"],
            )
            for r in csv.DictReader(f)
        ]


class ArchitectureHistory:
    """Snapshots, curvature estimates, events and training metrics of one run, serialisable to JSON.

    Example:
        >>> import torch.nn as nn
        >>> history = ArchitectureHistory()
        >>> history.add_snapshot(describe_architecture(nn.Linear(3, 2), epoch=0, step=0))
        >>> ArchitectureHistory.from_json(history.to_json()).snapshots[0].params
        8
    """

    def __init__(
        self,
        snapshots: Iterable[ArchitectureSnapshot] = (),
        curvature: Iterable[CurvatureRecord] = (),
        events: Iterable[EventRow] = (),
        metadata: dict[str, Any] | None = None,
        metrics: dict[str, list[list[float]]] | None = None,
    ) -> None:
        self.snapshots: list[ArchitectureSnapshot] = list(snapshots)
        self.curvature: list[CurvatureRecord] = list(curvature)
        self.events: list[EventRow] = list(events)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.metrics: dict[str, list[list[float]]] = {k: [list(p) for p in v] for k, v in (metrics or {}).items()}
        self._assigned_for = (-1, -1, -1)
        self.assign_block_ids()

    def add_snapshot(self, snapshot: ArchitectureSnapshot) -> None:
        """Append a snapshot (see :func:`describe_architecture`)."""
        self.snapshots.append(snapshot)
        self.assign_block_ids()

    def add_curvature(self, record: CurvatureRecord | dict[str, Any]) -> CurvatureRecord:
        """Append a record, or a curvature monitor's history entry (converted); returns the record."""
        if isinstance(record, dict):
            record = CurvatureRecord.from_monitor_entry(record)
        self.curvature.append(record)
        self.assign_block_ids()
        return record

    def add_event(self, event: ArchitectureEvent | EventRow) -> EventRow:
        """Append an event (converted to a row); returns the row."""
        row = EventRow.from_event(event)
        self.events.append(row)
        self.assign_block_ids()
        return row

    def add_metric(self, name: str, step: int, value: float) -> None:
        """Append one point of a training metric (``train_loss``, ``val_acc``, ...) at a global step."""
        self.metrics.setdefault(name, []).append([int(step), float(value)])

    # ------------------------------------------------------------------ identities

    def identities(self) -> BlockIdentities:
        """The block identities of this run's event log (:class:`BlockIdentities`), anchored on its first
        snapshot (which may have been taken with some events already applied, e.g. after a resume)."""
        anchor = next((s for s in self.snapshots if s.num_events is not None), None)
        if anchor is None and self.snapshots:
            first = self.snapshots[0]
            anchor_events = sum(1 for e in self.events if e.step < first.step)
            return BlockIdentities.from_observation(first.depth, anchor_events, self.events)
        if anchor is None:
            stacks = {}
            for record in self.curvature[:1]:
                for name in record.trace_per_param:
                    head, _, tail = name.rpartition(".")
                    if tail.isdigit():
                        stacks[head] = max(stacks.get(head, 0), int(tail) + 1)
            return BlockIdentities.from_observation(stacks, 0, self.events)
        return BlockIdentities.from_observation(anchor.depth, anchor.num_events, self.events)

    def assign_block_ids(self) -> None:
        """Fill ``block_ids`` of snapshots and estimates, ``block_id`` and ``summary`` of events.

        Snapshots with a known ``num_events`` are mapped after that many events; estimates and older snapshots
        through :meth:`BlockIdentities.resolve` (matching depths and block names among the events of their step),
        so an identity never depends on the order rows were added in.
        """
        self._assigned_for = (len(self.snapshots), len(self.curvature), len(self.events))
        if not (self.snapshots or self.curvature or self.events):
            return
        ids = self.identities()
        for snap in self.snapshots:
            k = snap.num_events if snap.num_events is not None else ids.resolve(snap.step, snap.widths, snap.depth)
            snap.block_ids = {name: ids.id_of(name, k) for name in snap.widths}
        for record in self.curvature:
            k = ids.resolve(record.step, record.trace_per_param)
            record.block_ids = {name: ids.id_of(name, k) for name in record.trace_per_param}
        for k, event in enumerate(self.events):
            # An insertion's location is the new block's position after it; everything else is before it.
            after = k + 1 if event.kind == "insert_block" else k
            event.block_id = ids.id_of(event.location, after) if event.location else ""
            event.summary = event_summary(event, ids, k)

    # ------------------------------------------------------------------ views

    @property
    def final(self) -> ArchitectureSnapshot | None:
        """The latest snapshot (``None`` before the first one)."""
        return self.snapshots[-1] if self.snapshots else None

    def stacks(self) -> list[str]:
        """Every stack path seen in any snapshot, in first-seen order."""
        return list(dict.fromkeys(path for s in self.snapshots for path in s.depth))

    def curvature_blocks(self, valid_only: bool = False) -> list[str]:
        """Every block identity with a curvature estimate, in model order.

        Estimates list blocks in model order; a block first seen in a later estimate (inserted during
        training) is placed right after the block that precedes it there.
        """
        order: list[str] = []
        for record in self.curvature:
            if valid_only and not record.valid:
                continue
            previous = None
            for name in record.by_id():
                if name not in order:
                    order.insert(order.index(previous) + 1 if previous is not None else 0, name)
                previous = name
        return order

    def curvature_matrix(self, valid_only: bool = True) -> tuple[list[str], list[CurvatureRecord], list[list[float]]]:
        """``(blocks, records, rows)``: ``rows[i][j]`` is the trace per parameter of block identity
        ``blocks[i]`` in ``records[j]`` (NaN where that block did not exist then)."""
        records = [r for r in self.curvature if r.valid or not valid_only]
        blocks = self.curvature_blocks(valid_only)
        by_id = [r.by_id() for r in records]
        rows = [[values.get(b, math.nan) for values in by_id] for b in blocks]
        return blocks, records, rows

    def width_matrix(self) -> tuple[list[tuple[str, str]], list[ArchitectureSnapshot], list[list[float]]]:
        """``(rows, snapshots, widths)``: one row per ``(block identity, width name)`` ever seen, in model
        order; ``widths[i][j]`` the width in snapshot ``j`` (NaN where the block did not exist)."""
        keys: list[tuple[str, str]] = []
        for snap in self.snapshots:
            for position, widths in snap.widths.items():
                for name in widths:
                    key = (snap.block_ids.get(position, position), name)
                    if key not in keys:
                        keys.append(key)
        order = {b: i for i, b in enumerate(dict.fromkeys(self._block_order() + [k[0] for k in keys]))}
        keys.sort(key=lambda k: order[k[0]])
        table = []
        for block, name in keys:
            row = []
            for snap in self.snapshots:
                by_id = {snap.block_ids.get(p, p): w for p, w in snap.widths.items()}
                row.append(float(by_id[block][name]) if name in by_id.get(block, {}) else math.nan)
            table.append(row)
        return keys, list(self.snapshots), table

    def _block_order(self) -> list[str]:
        """Block identities in model order: the final order of every stack, removed blocks where they were."""
        order: list[str] = []
        for snap in self.snapshots:
            previous = None
            for position in snap.widths:
                name = snap.block_ids.get(position, position)
                if name not in order:
                    order.insert(order.index(previous) + 1 if previous is not None else 0, name)
                previous = name
        return order

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """The whole history as a JSON-safe dict, with a format ``version`` and the ``final`` snapshot."""
        if self._assigned_for != (len(self.snapshots), len(self.curvature), len(self.events)):
            self.assign_block_ids()  # rows appended to the lists directly, not through add_*
        return {
            "version": FORMAT_VERSION,
            "metadata": self.metadata,
            "snapshots": [s.to_dict() for s in self.snapshots],
            "curvature": [c.to_dict() for c in self.curvature],
            "events": [e.to_dict() for e in self.events],
            "metrics": _finite_or_none(self.metrics),
            "final": None if self.final is None else self.final.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureHistory:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` for another format version."""
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Unsupported architecture history format version {version!r}; this lightning_depthgrow reads "
                f"version {FORMAT_VERSION}. Upgrade lightning_depthgrow to read newer files."
            )
        metrics = {
            name: [[int(p[0]), math.nan if p[1] is None else float(p[1])] for p in points]
            for name, points in (data.get("metrics") or {}).items()
        }
        return cls(
            snapshots=[ArchitectureSnapshot.from_dict(s) for s in data.get("snapshots", [])],
            curvature=[CurvatureRecord.from_dict(c) for c in data.get("curvature", [])],
            events=[EventRow.from_dict(e) for e in data.get("events", [])],
            metadata=data.get("metadata") or {},
            metrics=metrics,
        )

    def to_json(self, indent: int | None = 1) -> str:
        """The history as strict JSON: NaN and infinities (not JSON) are written as ``null``, read back as NaN."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ArchitectureHistory:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> str:
        """Write the JSON atomically (a reader never sees a half-written file); returns the path."""
        text = self.to_json()
        return _write_atomically(path, ".architecture_history.", lambda f: f.write(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArchitectureHistory:
        """Read a history JSON file, or the ``architecture_history.json`` inside a directory."""
        path = find_history_file(path)
        with open(path) as f:
            return cls.from_json(f.read())


def _write_atomically(path: str | os.PathLike, prefix: str, write: Any, newline: str | None = None) -> str:
    """Write through ``write(file)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", newline=newline) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def find_history_file(path: str | os.PathLike) -> str:
    """``path`` itself if it is a file, else the one ``architecture_history.json`` under the directory."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither an architecture history JSON file nor a directory")
    found = sorted(
        os.path.join(root, HISTORY_FILENAME) for root, _, files in os.walk(path) if HISTORY_FILENAME in files
    )
    if not found:
        raise FileNotFoundError(
            f"No {HISTORY_FILENAME} under {path!r}. ArchitectureLogger writes it into the trainer's log directory; "
            "pass that directory or the file itself."
        )
    if len(found) > 1:
        listing = "\n  ".join(found)
        raise FileNotFoundError(f"Several {HISTORY_FILENAME} files under {path!r}; pass one of them:\n  {listing}")
    return found[0]


def describe_architecture(
    model: nn.Module,
    example_input: Any = None,
    epoch: int = -1,
    step: int = -1,
    phase: str = "",
) -> ArchitectureSnapshot:
    """Depth per block stack, widths per block, parameter count and (given an input) FLOPs of ``model``.

    Stacks are those :func:`~lightning_depthgrow.adapters.find_block_stacks` finds. FLOPs are counted by
    :func:`count_model_flops` on the first sample of ``example_input``.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=3)
        >>> snap = describe_architecture(m)
        >>> snap.depth, snap.widths["blocks.0"]
        ({'blocks': 2}, {'attn.num_heads': 3, 'mlp.fc1.out_features': 768})
    """
    stacks = find_block_stacks(model)
    widths = {stack.block_name(i): block_widths(block) for stack in stacks for i, block in enumerate(stack.blocks)}
    return ArchitectureSnapshot(
        epoch=epoch,
        step=step,
        depth={stack.path: len(stack) for stack in stacks},
        widths=widths,
        params=sum(p.numel() for p in model.parameters()),
        flops=None if example_input is None else count_model_flops(model, example_input),
        phase=phase,
    )


def block_widths(block: nn.Module) -> dict[str, int]:
    """Widths inside one block: attention heads, MLP hidden units (``fc1``), convolution channels.

    Example:
        >>> block_widths(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)))
        {'0.out_channels': 8, '2.out_channels': 4}
    """
    widths: dict[str, int] = {}
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int):
            widths[f"{prefix}num_heads"] = heads
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "fc1":
            widths[f"{prefix}out_features"] = module.out_features
        if isinstance(module, nn.modules.conv._ConvNd):
            widths[f"{prefix}out_channels"] = module.out_channels
    return widths


def count_model_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward pass of ``model`` on the first sample of ``example_input``.

    Tensors (alone or in a tuple/list) are cut to their first row, so the number does not depend on the
    batch size the input happened to have. Counted by :func:`lightning_depthgrow.measure.count_flops`
    (eval mode, no gradients, modes restored).
    """
    return count_flops(model, _first_sample(example_input)).total


def _first_sample(example_input: Any) -> Any:
    if isinstance(example_input, torch.Tensor):
        return example_input[:1]
    if isinstance(example_input, (tuple, list)):
        return type(example_input)(_first_sample(x) for x in example_input)
    return example_input


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value
