"""ArchitectureLogger with a real WandbLogger in offline mode, read back from the run's own record log.

Nothing is mocked: the real wandb client writes ``run-<id>.wandb`` and its table files, and
``wandb_records`` parses them as the W&B backend would receive them.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from test_history import DepthProbe, TinyClassifier, quiet_trainer
from wandb_records import load_offline_run, offline_run_dirs

from lightning_depthgrow.adapters import find_block_stacks
from lightning_depthgrow.callbacks import _common
from lightning_depthgrow.callbacks.architecture_logger import EVENT_COLUMNS, ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.history import HISTORY_FILENAME, ArchitectureHistory
from lightning_depthgrow.measure import count_flops

STACK = "model.blocks"


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    directory = tmp_path / "wandb_root"
    directory.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(directory))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield str(directory)
    wandb.finish()
    wandb.teardown()


def _table_rows(run, key: str) -> list[dict]:
    """Rows of every version of the table logged under ``key``, in logging order, as dicts."""
    rows = []
    for entry in run.rows_with(f"{key}/path"):
        with open(os.path.join(run.directory, "files", entry[f"{key}/path"])) as f:
            table = json.load(f)
        rows += [dict(zip(table["columns"], r)) for r in table["data"]]
    return rows


def test_wandb_offline_run_records_architecture_evolution(tmp_path, wandb_dir):
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)
    growth = DepthGrowth(final_budget=3.0, warmup_epochs=1, grow_every=1, placement="curvature", monitor=monitor)
    probe = DepthProbe()
    arch_logger = ArchitectureLogger()
    module = TinyClassifier()
    trainer = quiet_trainer(
        max_epochs=3,
        logger=WandbLogger(project="depthgrow-test", save_dir=wandb_dir),
        callbacks=[monitor, growth, arch_logger, probe],
    )
    trainer.fit(module)
    run_id = trainer.logger.experiment.id
    wandb.finish()
    wandb.teardown()  # wandb-core closes the offline record log asynchronously; this waits for it

    (run_dir,) = offline_run_dirs(wandb_dir)
    assert run_dir.endswith(run_id)
    run = load_offline_run(run_dir)
    events = _common.event_log(module)
    assert events and all(e.kind == "insert_block" for e in events)

    # Depth per logged epoch is the model's real depth: 2 at the start, then what the probe saw after each epoch.
    depth_rows = run.rows_with(f"arch/depth/{STACK}")
    logged = [(r["arch/epoch"], r[f"arch/depth/{STACK}"]) for r in depth_rows]
    expected = [(0, 2)] + [(e + 1, d) for e, d in sorted(probe.depth_after_epoch.items())]
    assert logged == expected
    assert logged[-1][1] == len(find_block_stacks(module)[0]) > 2
    assert [r["arch/depth/total"] for r in depth_rows] == [d for _, d in expected]

    last = depth_rows[-1]
    assert last["arch/params"] == sum(p.numel() for p in module.parameters())
    assert last["arch/flops"] == count_flops(module, torch.zeros(1, 1, 1, 16)).total

    # Curvature per block: each epoch's row holds the monitor's latest estimate of that epoch (DepthGrowth
    # also asks it for estimates while growing, so there can be several per epoch).
    latest = {entry["epoch"]: entry for entry in monitor.history}
    curv_rows = run.rows_with(f"arch/curvature/{STACK}.0")
    assert [r["arch/epoch"] for r in curv_rows] == [e + 1 for e in sorted(latest)] == [1, 2, 3]
    for row, epoch in zip(curv_rows, sorted(latest)):
        for block, value in latest[epoch]["trace_per_param"].items():
            assert row[f"arch/curvature/{block}"] == pytest.approx(value, rel=1e-12)

    # Every arch/* metric has arch/epoch as its step metric, declared by name (outranking WandbLogger's "*").
    defined = {m.name: m.step_metric for m in run.metrics if m.name}
    assert "arch/epoch" in defined
    media = {k[: -len("/_type")] for r in run.history for k in r if k.startswith("arch/") and k.endswith("/_type")}
    numeric = {
        k
        for r in run.history
        for k, v in r.items()
        if k.startswith("arch/") and isinstance(v, (int, float)) and not any(k.startswith(f"{m}/") for m in media)
    }
    assert {f"arch/depth/{STACK}", "arch/params", "arch/flops", f"arch/curvature/{STACK}.0"} <= numeric
    charts = {f"arch/charts/{c}_table" for c in ("depth", "params", "flops")}
    assert media == {"arch/events", "arch/curvature_heatmap"} | charts
    for key in [*sorted(numeric - {"arch/epoch"}), "arch/events", "arch/curvature_heatmap"]:
        assert defined.get(key) == run.step_metric_of(key) == "arch/epoch", key

    # Events: an incremental table, each increment holding only the new rows; together exactly the event log.
    assert run.rows_with("arch/events/path")[0]["arch/events/log_mode"] == "INCREMENTAL"
    rows = _table_rows(run, "arch/events")
    assert all(list(r) == EVENT_COLUMNS for r in rows)
    assert [(r["kind"], r["epoch"], r["step"], r["location"]) for r in rows] == [
        (e.kind, e.epoch, e.step, f"{e.spec['stack']}.{e.spec['index'] + 1}") for e in events
    ]
    assert [json.loads(r["reason"])["block"] for r in rows] == [e.reason["block"] for e in events]

    # Heatmap images, line charts, summary and the architecture artifact.
    images = glob.glob(os.path.join(run_dir, "files", "media", "images", "arch", "curvature_heatmap_*.png"))
    assert len(images) == len(curv_rows)
    depth_chart = _table_rows(run, "arch/charts/depth_table")
    assert [(r["step"], r["lineVal"]) for r in depth_chart] == expected
    assert _table_rows(run, "arch/charts/params_table")[-1]["lineVal"] == last["arch/params"]
    final = run.summary["arch/final"]
    assert final["depth"] == {STACK: expected[-1][1]} and final["params"] == last["arch/params"]
    assert run.summary["arch/num_events"] == len(events)
    (artifact,) = [a for a in run.artifacts if a.type == "architecture"]
    assert sorted(e.path for e in artifact.manifest.contents) == ["architecture.json", HISTORY_FILENAME]

    # The history JSON in the logger's save_dir (trainer.log_dir) holds the same story.
    history = ArchitectureHistory.load(os.path.join(wandb_dir, HISTORY_FILENAME))
    assert [(s.epoch, s.depth[STACK]) for s in history.snapshots] == expected
    assert history.final.to_dict() == final
    assert len(history.curvature) == len(monitor.history)


def test_ddp_only_rank_zero_writes(tmp_path, wandb_dir):
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(project="depthgrow-ddp", save_dir=wandb_dir)
    trainer = quiet_trainer(
        max_epochs=2,
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=2,
        logger=[csv_logger, wandb_logger],
        callbacks=[DepthGrowth(final_budget=3.0, warmup_epochs=1, placement="last"), ArchitectureLogger()],
    )
    trainer.fit(TinyClassifier())

    assert len(offline_run_dirs(wandb_dir)) == 1
    files = glob.glob(str(tmp_path / "**" / HISTORY_FILENAME), recursive=True)
    # the spawned rank 0 resolved the CSV logger's version; this process's copy of the logger never did
    log_dir = str(tmp_path / "csv" / "version_0")
    assert files == [os.path.join(log_dir, HISTORY_FILENAME)]
    assert not glob.glob(str(tmp_path / "**" / ".architecture_history.*"), recursive=True)
    history = ArchitectureHistory.load(files[0])
    assert history.metadata["global_rank"] == 0 and history.metadata["world_size"] == 2
    assert history.events and all(e.kind == "insert_block" for e in history.events)
    # depth seen after k epochs = starting depth + insertions made during the first k epochs
    assert [(s.epoch, s.depth[STACK]) for s in history.snapshots] == [
        (k, 2 + sum(e.epoch < k for e in history.events)) for k in range(3)
    ]
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        header = f.readline().strip().split(",")
    assert f"arch/depth/{STACK}" in header
