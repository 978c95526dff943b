"""Architecture history: what a model looked like epoch by epoch, what changed it, and its curvature.

A plain, serialisable record (no Lightning) built by :class:`lightning_depthgrow.callbacks.ArchitectureLogger`
and read by :mod:`lightning_depthgrow.report`. Three kinds of rows:

* :class:`ArchitectureSnapshot`: depth per block stack, widths per block, parameter count and FLOPs, taken
  by :func:`describe_architecture`. A snapshot's ``epoch`` counts *completed* training epochs (0 = before
  training), so its values are the architecture the next epoch trains.
* :class:`CurvatureRecord`: one curvature estimate per block (Hessian trace per parameter, trace, its
  standard error, top eigenvalue), copied from a curvature monitor's ``history``. Its ``epoch`` is the index
  of the epoch at whose end it was estimated.
* :class:`EventRow`: one :class:`~lightning_depthgrow.events.ArchitectureEvent`, with ``epoch`` the index of
  the epoch during which it happened and ``location`` where in the model it acted. A growth event of epoch
  ``e`` is therefore visible in the snapshot with ``epoch == e + 1``.

Block names are positions at the time of the row (``model.blocks.2``): after an insertion the same name may
denote a different block.
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
        widths: per block (dotted name) its widths: ``"<sub>.num_heads"`` for attention modules,
            ``"<sub>.out_features"`` for MLP ``fc1`` layers, ``"<sub>.out_channels"`` for convolutions.
        params: total number of parameters.
        flops: FLOPs of one forward pass on one sample, or ``None`` when not measured.
        phase: when it was taken (``"train_start"``, ``"epoch_end"``, ``"train_end"`` or ``""``).
    """

    epoch: int
    step: int
    depth: dict[str, int]
    widths: dict[str, dict[str, int]]
    params: int
    flops: int | None = None
    phase: str = ""

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
        flops = data.get("flops")
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            depth={k: int(v) for k, v in data["depth"].items()},
            widths={b: {k: int(v) for k, v in w.items()} for b, w in data.get("widths", {}).items()},
            params=int(data["params"]),
            flops=None if flops is None else int(flops),
            phase=str(data.get("phase", "")),
        )


@dataclass
class CurvatureRecord:
    """One per-block curvature estimate (numbers per block name; missing statistics are empty dicts)."""

    epoch: int
    step: int
    trace_per_param: dict[str, float]
    trace: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    top_eigenvalue: dict[str, float] = field(default_factory=dict)
    valid: bool = True

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
        )


@dataclass
class EventRow:
    """One architecture event as a table row."""

    epoch: int
    step: int
    kind: str
    location: str
    reason: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_event(cls, event: ArchitectureEvent) -> EventRow:
        """The row of ``event``, with its location (block or layer) taken from its spec."""
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
        )


# Spec keys that name where an event acted, most specific first; ``index`` refines a stack path.
_LOCATION_KEYS = ("location", "block", "module", "layer", "linear", "stack", "path")
# Kinds whose spec ``index`` is not the block acted on: ``insert_block`` inserts *after* ``index``.
_INDEX_OFFSET = {"insert_block": 1}


def event_location(kind: str, spec: dict[str, Any]) -> str:
    """Where an event acted, from its spec: the new block's name for an insertion, else the named module.

    Example:
        >>> event_location("insert_block", {"stack": "model.blocks", "index": 2, "template": 1, "seed": 0})
        'model.blocks.3'
        >>> event_location("dms_attach", {"seed": 0})
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
    return ""


class ArchitectureHistory:
    """Snapshots, curvature estimates and events of one training run, serialisable to JSON.

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
    ) -> None:
        self.snapshots: list[ArchitectureSnapshot] = list(snapshots)
        self.curvature: list[CurvatureRecord] = list(curvature)
        self.events: list[EventRow] = list(events)
        self.metadata: dict[str, Any] = dict(metadata or {})

    def add_snapshot(self, snapshot: ArchitectureSnapshot) -> None:
        """Append a snapshot (see :func:`describe_architecture`)."""
        self.snapshots.append(snapshot)

    def add_curvature(self, record: CurvatureRecord | dict[str, Any]) -> CurvatureRecord:
        """Append a record, or a curvature monitor's history entry (converted); returns the record."""
        if isinstance(record, dict):
            record = CurvatureRecord.from_monitor_entry(record)
        self.curvature.append(record)
        return record

    def add_event(self, event: ArchitectureEvent | EventRow) -> EventRow:
        """Append an event (converted to a row); returns the row."""
        row = event if isinstance(event, EventRow) else EventRow.from_event(event)
        self.events.append(row)
        return row

    @property
    def final(self) -> ArchitectureSnapshot | None:
        """The latest snapshot (``None`` before the first one)."""
        return self.snapshots[-1] if self.snapshots else None

    def stacks(self) -> list[str]:
        """Every stack path seen in any snapshot, in first-seen order."""
        return list(dict.fromkeys(path for s in self.snapshots for path in s.depth))

    def curvature_blocks(self, valid_only: bool = False) -> list[str]:
        """Every block name with a curvature estimate, in model order.

        Estimates list blocks in model order; a block first seen in a later estimate (inserted during
        training) is placed right after the block that precedes it there.
        """
        order: list[str] = []
        for record in self.curvature:
            if valid_only and not record.valid:
                continue
            previous = None
            for name in record.trace_per_param:
                if name not in order:
                    order.insert(order.index(previous) + 1 if previous is not None else 0, name)
                previous = name
        return order

    def curvature_matrix(self, valid_only: bool = True) -> tuple[list[str], list[CurvatureRecord], list[list[float]]]:
        """``(blocks, records, rows)``: ``rows[i][j]`` is the trace per parameter of ``blocks[i]`` in
        ``records[j]`` (NaN where that block did not exist then)."""
        records = [r for r in self.curvature if r.valid or not valid_only]
        blocks = self.curvature_blocks(valid_only)
        rows = [[r.trace_per_param.get(b, math.nan) for r in records] for b in blocks]
        return blocks, records, rows

    def to_dict(self) -> dict[str, Any]:
        """The whole history as a JSON-safe dict, with a format ``version`` and the ``final`` snapshot."""
        return {
            "version": FORMAT_VERSION,
            "metadata": self.metadata,
            "snapshots": [s.to_dict() for s in self.snapshots],
            "curvature": [c.to_dict() for c in self.curvature],
            "events": [e.to_dict() for e in self.events],
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
        return cls(
            snapshots=[ArchitectureSnapshot.from_dict(s) for s in data.get("snapshots", [])],
            curvature=[CurvatureRecord.from_dict(c) for c in data.get("curvature", [])],
            events=[EventRow.from_dict(e) for e in data.get("events", [])],
            metadata=data.get("metadata") or {},
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
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".architecture_history.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArchitectureHistory:
        """Read a history JSON file, or the ``architecture_history.json`` inside a directory."""
        path = find_history_file(path)
        with open(path) as f:
            return cls.from_json(f.read())


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
