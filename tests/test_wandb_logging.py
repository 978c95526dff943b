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
from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.events import event_log
from lightning_depthgrow.history import EVENT_COLUMNS, HISTORY_FILENAME, ArchitectureHistory
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


def _fit_offline(wandb_dir: str, module, callbacks, **kwargs):
    """Train with a real offline WandbLogger; returns the run as read back from its record log."""
    trainer = quiet_trainer(
        logger=WandbLogger(project="depthgrow-test", save_dir=wandb_dir), callbacks=callbacks, **kwargs
    )
    trainer.fit(module)
    run_id = trainer.logger.experiment.id
    wandb.finish()
    wandb.teardown()  # wandb-core closes the offline record log asynchronously; this waits for it
    (run_dir,) = [d for d in offline_run_dirs(wandb_dir) if d.endswith(run_id)]
    return load_offline_run(run_dir)


@pytest.mark.slow
def test_wandb_offline_run_records_architecture_evolution(tmp_path, wandb_dir):
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False)
    growth = DepthGrowth.paper(
        final_budget=3.0, warmup_epochs=1, grow_every=1, placement="curvature", curvature_monitor=monitor
    )
    probe = DepthProbe()
    module = TinyClassifier()
    run = _fit_offline(wandb_dir, module, [monitor, growth, ArchitectureLogger(), probe], max_epochs=3)
    run_dir = run.directory
    events = event_log(module)
    assert events and all(e.kind == "insert_block" for e in events)
    history = ArchitectureHistory.load(os.path.join(wandb_dir, HISTORY_FILENAME))

    # Depth per logged point is the model's real depth: 2 at the start, then what the probe saw after each epoch.
    depth_rows = run.rows_with(f"arch/depth/{STACK}")
    logged = [(r["arch/epoch"], r[f"arch/depth/{STACK}"]) for r in depth_rows]
    expected = [(0, 2)] + [(e + 1, d) for e, d in sorted(probe.depth_after_epoch.items())]
    assert logged == expected
    assert logged[-1][1] == len(find_block_stacks(module)[0]) > 2
    assert [r["arch/depth/total"] for r in depth_rows] == [d for _, d in expected]
    # One time axis: every arch/* row carries the global step, the step metric Lightning's own metrics use.
    assert [r["trainer/global_step"] for r in depth_rows] == [s.step for s in history.snapshots]

    last = depth_rows[-1]
    assert last["arch/params"] == sum(p.numel() for p in module.parameters())
    assert last["arch/flops"] == count_flops(module, torch.zeros(1, 1, 1, 16)).total
    # Widths by block identity, including grown blocks (named by the event that inserted them).
    assert last[f"arch/width/{STACK}#0/attn.num_heads"] == 2
    assert last[f"arch/width/{STACK}#e0/mlp.fc1.out_features"] == 32

    # Curvature per block identity: each epoch's row holds the monitor's latest estimate of that epoch, keyed by
    # the identity of the block at each position then (DepthGrowth also asks for estimates while growing).
    latest = {entry["epoch"]: entry for entry in monitor.history}
    curv_rows = run.rows_with(f"arch/curvature/{STACK}#0")
    assert [r["arch/epoch"] for r in curv_rows] == [e + 1 for e in sorted(latest)] == [1, 2, 3]
    records = {(r.epoch, r.step): r for r in history.curvature}
    for row, epoch in zip(curv_rows, sorted(latest)):
        record = records[(epoch, latest[epoch]["step"])]
        for position, value in latest[epoch]["trace_per_param"].items():
            assert row[f"arch/curvature/{record.block_ids[position]}"] == pytest.approx(value, rel=1e-12)
    assert not any(k.startswith(f"arch/curvature/{STACK}.") for r in run.history for k in r)  # no positions

    # Every arch/* metric has trainer/global_step as its step metric, declared by name.
    defined = {m.name: m.step_metric for m in run.metrics if m.name}
    media = {k[: -len("/_type")] for r in run.history for k in r if k.startswith("arch/") and k.endswith("/_type")}
    numeric = {
        k
        for r in run.history
        for k, v in r.items()
        if k.startswith("arch/") and isinstance(v, (int, float)) and not any(k.startswith(f"{m}/") for m in media)
    }
    assert {f"arch/depth/{STACK}", "arch/params", "arch/flops", f"arch/curvature/{STACK}#0"} <= numeric
    figures = {f"arch/figures/{name}" for name in ("training", "widths", "curvature_heatmap", "params_flops")}
    assert media == {"arch/events", "arch/curvature_heatmap", "arch/widths"} | figures
    for key in [*sorted(numeric), *sorted(media)]:
        assert defined.get(key) == run.step_metric_of(key) == "trainer/global_step", key

    # Event markers: arch/events_total steps up by one at each event's own global step.
    markers = [(r["trainer/global_step"], r["arch/events_total"]) for r in run.rows_with("arch/events_total")]
    assert markers == [(e.step, k + 1) for k, e in enumerate(events)]

    # Events: typed columns (numbers, not JSON strings) for reason and cost; the latest table holds every event.
    tables = run.rows_with("arch/events/path")
    with open(os.path.join(run_dir, "files", tables[-1]["arch/events/path"])) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert table["columns"][:6] == EVENT_COLUMNS
    assert {"reason.score", "reason.block", "reason.budget_after", "cost.params", "cost.flops"} <= set(table["columns"])
    assert [(r["kind"], r["epoch"], r["step"], r["location"], r["block_id"]) for r in rows] == [
        (e.kind, e.epoch, e.step, f"{e.spec['stack']}.{e.spec['index'] + 1}", f"{STACK}#e{k}")
        for k, e in enumerate(events)
    ]
    for row, event in zip(rows, events):
        assert isinstance(row["reason.score"], float) and row["reason.score"] == pytest.approx(event.reason["score"])
        assert row["cost.params"] == event.cost["params"] and isinstance(row["cost.params"], int)
        assert row["summary"].startswith("inserted a new block after model.blocks#")
        assert json.loads(row["reason"])["runners_up"] == event.reason["runners_up"]

    # Heat map images, the widths table, summary and the architecture artifact.
    images = glob.glob(os.path.join(run_dir, "files", "media", "images", "arch", "curvature_heatmap_*.png"))
    assert len(images) == len(run.rows_with("arch/curvature_heatmap/_type")) >= len(curv_rows)
    (widths_entry,) = run.rows_with("arch/widths/path")
    with open(os.path.join(run_dir, "files", widths_entry["arch/widths/path"])) as f:
        table = json.load(f)
    widths = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert {(w["block_id"], w["kept_fraction"]) for w in widths if w["width"] == "attn.num_heads"} == {
        (f"{STACK}#{i}", 1.0) for i in ("0", "1", *(f"e{k}" for k in range(len(events))))
    }
    final = run.summary["arch/final"]
    assert final["depth"] == {STACK: expected[-1][1]} and final["params"] == last["arch/params"]
    assert run.summary["arch/num_events"] == len(events)
    (artifact,) = [a for a in run.artifacts if a.type == "architecture"]
    assert artifact.name == "architecture" and f"run-{run.directory[-8:]}" in artifact.aliases
    assert sorted(e.path for e in artifact.manifest.contents) == ["architecture.json", HISTORY_FILENAME, "events.csv"]

    # The history JSON in the logger's save_dir (trainer.log_dir) holds the same story.
    assert [(s.epoch, s.depth[STACK]) for s in history.snapshots] == expected
    assert history.final.to_dict() == final
    assert len(history.curvature) == len(monitor.history)

    # A second run of the project logs the same artifact name: W&B versions it (v0, v1) instead of a new
    # artifact per run; each version is aliased with its run.
    second = _fit_offline(
        wandb_dir, TinyClassifier(), [ArchitectureLogger(report=True)], max_epochs=1, limit_train_batches=1
    )
    (again,) = [a for a in second.artifacts if a.type == "architecture"]
    assert again.name == artifact.name and again.project == artifact.project == "depthgrow-test"
    assert f"run-{second.directory[-8:]}" in again.aliases and again.digest != artifact.digest
    # With report=True the page is in the artifact and logged as HTML media.
    assert "architecture_report.html" in {e.path for e in again.manifest.contents}
    (html_entry,) = second.rows_with("arch/report/path")
    with open(os.path.join(second.directory, "files", html_entry["arch/report/path"])) as f:
        assert "What happened to TinyClassifier" in f.read()


def test_ddp_only_rank_zero_writes(tmp_path, wandb_dir):
    csv_logger = CSVLogger(tmp_path, name="csv")
    wandb_logger = WandbLogger(project="depthgrow-ddp", save_dir=wandb_dir)
    trainer = quiet_trainer(
        max_epochs=2,
        devices=2,
        strategy="ddp_spawn",
        limit_train_batches=2,
        logger=[csv_logger, wandb_logger],
        callbacks=[DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, placement="last"), ArchitectureLogger()],
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
