"""Read back what an offline W&B run recorded, the way the W&B backend would receive it.

An offline run (``WANDB_MODE=offline``) writes ``<WANDB_DIR>/wandb/offline-run-*/run-<id>.wandb``: a
LevelDB-style log written by ``wandb-core``. Layout (checked against files written by wandb 0.31):

* a 7-byte file header: the identifier ``b":W&B"``, a little-endian u16 magic ``0xBEE1`` and a u8 version
  (0);
* then 32 KiB blocks. Each block holds records, each with a 7-byte header ``crc32 (u32 LE), length
  (u16 LE), type (u8)`` followed by ``length`` payload bytes. A record that does not fit in a block is
  split into chunks typed FIRST (2), MIDDLE (3), LAST (4); one that fits is FULL (1). The CRC is zlib's
  crc32 of the type byte followed by the payload. When fewer than 7 bytes remain in a block, they are
  zero padding. The file header counts towards the first block.
* each reassembled payload is one serialised ``wandb.proto.wandb_internal_pb2.Record``.

``wandb.sdk.internal.datastore`` used to read this in Python and no longer exists in wandb 0.31, so the
tests read it here. A table logged under ``key`` shows up in a history row as ``key/path`` (relative to
``files/``, e.g. ``media/table/...table.json``).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = struct.Struct("<4sHB")
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list[pb.Record]:
    """Every ``Record`` in a ``.wandb`` file, in order; checks magic, chunk types and CRCs."""
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path} is not a W&B record log version 0 (header {ident!r} {magic:#x} {version})")
    records: list[pb.Record] = []
    pending: bytearray | None = None
    pos = FILE_HEADER.size
    while pos < len(data):
        block_left = BLOCK_SIZE - pos % BLOCK_SIZE
        if block_left < RECORD_HEADER.size:
            pos += block_left  # zero padding at the end of a block
            continue
        if pos + RECORD_HEADER.size > len(data):
            break
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if length == 0 and kind == 0:
            break  # preallocated tail of a file still being written
        payload = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if len(payload) != length:
            raise ValueError(f"{path}: truncated record at offset {pos}")
        expected = zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF
        if expected != crc:
            raise ValueError(f"{path}: CRC mismatch at offset {pos}")
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            pending = None
            records.append(_parse(payload))
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise ValueError(f"{path}: chunk of type {kind} without a FIRST chunk at offset {pos}")
            pending += payload
            if kind == LAST:
                records.append(_parse(bytes(pending)))
                pending = None
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at offset {pos}")
    return records


def _parse(payload: bytes) -> pb.Record:
    record = pb.Record()
    record.ParseFromString(payload)
    return record


@dataclass
class OfflineRun:
    """The parts of an offline run a test asserts on."""

    directory: str
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[pb.MetricRecord] = field(default_factory=list)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def step_metric_of(self, name: str) -> str | None:
        """The step metric declared for ``name`` (exact name first, then a matching glob)."""
        for m in self.metrics:
            if m.name == name and m.step_metric:
                return m.step_metric
        for m in self.metrics:
            if m.glob_name and _glob_match(m.glob_name, name) and m.step_metric:
                return m.step_metric
        return None


def _glob_match(pattern: str, name: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern)


def _item_key(item: pb.HistoryItem | pb.SummaryItem) -> str:
    return item.key or "/".join(item.nested_key)


def load_offline_run(run_dir: str) -> OfflineRun:
    """Parse ``run_dir`` (an ``offline-run-*`` directory) into history rows, summary, metrics, artifacts."""
    paths = glob.glob(os.path.join(run_dir, "*.wandb"))
    if len(paths) != 1:
        raise FileNotFoundError(f"expected one .wandb file in {run_dir}, found {paths}")
    records = read_records(paths[0])
    if not any(r.WhichOneof("record_type") == "exit" for r in records):
        raise ValueError(
            f"{paths[0]} has no exit record yet ({len(records)} records): wandb-core writes the log asynchronously; "
            "call wandb.finish() and then wandb.teardown() (which waits for wandb-core) before reading it."
        )
    run = OfflineRun(run_dir)
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            run.metrics.append(record.metric)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
    return run


def offline_run_dirs(wandb_dir: str) -> list[str]:
    """The ``offline-run-*`` directories under ``WANDB_DIR``."""
    return sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*")))
