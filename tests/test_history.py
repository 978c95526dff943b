"""ArchitectureHistory / describe_architecture, and ArchitectureLogger with TensorBoard and CSV loggers.

The tiny growing ViT and its trainer settings defined here are reused by test_wandb_logging.py and
test_report.py.
"""

from __future__ import annotations

import csv
import json
import math
import os

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.adapters import find_block_stacks
from lightning_depthgrow.callbacks import plumbing
from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.events import ArchitectureEvent, save_event_log
from lightning_depthgrow.history import (
    HISTORY_FILENAME,
    ArchitectureHistory,
    ArchitectureSnapshot,
    BlockIdentities,
    CurvatureRecord,
    EventRow,
    block_widths,
    describe_architecture,
    event_location,
    find_history_file,
    read_events_csv,
)
from lightning_depthgrow.measure import count_flops

torch.set_num_threads(1)

# ---------------------------------------------------------------------------- shared tiny setup


def tiny_vit(depth: int = 2) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(1, 16), patch_size=(1, 4), in_chans=1,
        num_classes=3, embed_dim=16, depth=depth, num_heads=2, mlp_ratio=2.0,
    )  # fmt: skip


class TinyClassifier(pl.LightningModule):
    """A 2-block ViT on 64 synthetic 1x16 signals (4 batches of 16)."""

    def __init__(self, example_input: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_vit()
        if example_input:
            self.example_input_array = torch.zeros(4, 1, 1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 1, 1, 16, generator=g)
        y = torch.randint(0, 3, (64,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16)


class InsertBlockEachEpoch(pl.Callback):
    """Real growth through the shared code path: insert an identity block after block 0 at every epoch end.

    Resumable like the library's callbacks: the event log goes into checkpoints and is replayed in ``setup``.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plumbing.restore_architecture(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        plumbing.release_module(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        save_event_log(checkpoint, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        event = ArchitectureEvent(
            "insert_block",
            {"stack": "model.blocks", "index": 0, "template": 0, "seed": trainer.current_epoch},
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            reason={"why": "test"},
            cost={"params": 1},
        )
        plumbing.apply_and_sync(trainer, pl_module, event)


class DepthProbe(pl.Callback):
    """Ground truth, independent of the logger: after each epoch's hooks (put it last), the model's depth and
    which Python object sits at each block position."""

    def __init__(self) -> None:
        self.depth_after_epoch: dict[int, int] = {}
        self.objects_after_epoch: dict[int, dict[str, int]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stack = find_block_stacks(pl_module)[0]
        self.depth_after_epoch[trainer.current_epoch] = len(stack)
        self.objects_after_epoch[trainer.current_epoch] = {
            stack.block_name(i): id(b) for i, b in enumerate(stack.blocks)
        }


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return pl.Trainer(**(defaults | kwargs))


# ---------------------------------------------------------------------------- functional core


def test_describe_architecture_vit_matches_model_and_flop_counter():
    model = tiny_vit(depth=3)
    x = torch.randn(5, 1, 1, 16)
    snap = describe_architecture(model, x, epoch=2, step=7, phase="epoch_end")
    assert snap.depth == {"blocks": 3}
    assert snap.widths == {f"blocks.{i}": {"attn.num_heads": 2, "mlp.fc1.out_features": 32} for i in range(3)}
    assert snap.params == sum(p.numel() for p in model.parameters())
    # FLOPs of one sample: the batch of 5 is cut to its first row, and a ViT's FLOPs scale with the batch.
    assert snap.flops == count_flops(model, x[:1]).total == count_flops(model, x[:2]).total // 2
    assert (snap.epoch, snap.step, snap.phase) == (2, 7, "epoch_end")


def test_describe_architecture_resnet_conv_channels():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    snap = describe_architecture(model)
    assert snap.depth == {"layer1": 1, "layer2": 1, "layer3": 1, "layer4": 1}
    assert snap.widths["layer3.0"]["conv1.out_channels"] == model.layer3[0].conv1.out_channels == 256
    assert snap.widths["layer3.0"]["downsample.1.out_channels"] == 256
    assert snap.flops is None


def test_block_widths_and_event_location():
    mlp = nn.Module()
    mlp.fc1, mlp.fc2 = nn.Linear(4, 12), nn.Linear(12, 4)
    assert block_widths(mlp) == {"fc1.out_features": 12}
    assert event_location("insert_block", {"stack": "model.blocks", "index": 0}) == "model.blocks.1"
    assert event_location("dms_export", {"module": "model.blocks.1.mlp"}) == "model.blocks.1.mlp"
    assert event_location("prune", {"path": "layer2", "index": 3}) == "layer2.3"
    assert event_location("dms_attach", {"seed": 1}) == ""
    assert event_location("neuron_branch", {"linear": "model.blocks.0.mlp.fc1", "neurons": [3, 7]}) == (
        "model.blocks.0.mlp.fc1"
    )


def test_history_json_round_trip(tmp_path):
    history = ArchitectureHistory(metadata={"world_size": 1})
    history.add_snapshot(describe_architecture(tiny_vit(), torch.zeros(1, 1, 1, 16), epoch=0, step=0))
    history.add_snapshot(describe_architecture(tiny_vit(3), torch.zeros(1, 1, 1, 16), epoch=1, step=4))
    entry = {
        "epoch": 0,
        "step": 4,
        "traces": {
            "blocks.0": {"mean": 2.5, "stderr": 0.5, "num_probes": 4},
            "blocks.1": {"mean": -1.0, "stderr": 1.0, "num_probes": 4},
        },
        "trace_per_param": {"blocks.0": 0.25, "blocks.1": float("nan")},
        "top_eigenvalues": {"blocks.0": 3.0},
        "valid": False,
    }
    record = history.add_curvature(entry)
    assert isinstance(record, CurvatureRecord)
    assert (record.epoch, record.step, record.valid) == (0, 4, False)
    assert record.trace == {"blocks.0": 2.5, "blocks.1": -1.0}
    assert record.stderr == {"blocks.0": 0.5, "blocks.1": 1.0}
    assert record.top_eigenvalue == {"blocks.0": 3.0}
    assert record.trace_per_param["blocks.0"] == 0.25 and math.isnan(record.trace_per_param["blocks.1"])
    spec = {"stack": "blocks", "index": 1, "seed": 0}
    event = ArchitectureEvent("insert_block", spec, 0, 4, {"score": 0.3}, {"p": 9})
    history.add_event(event)

    path = history.save(tmp_path / "run" / HISTORY_FILENAME)
    assert find_history_file(tmp_path) == path
    back = ArchitectureHistory.load(tmp_path)
    assert back.to_json() == history.to_json()
    assert back.snapshots == history.snapshots
    summary = "inserted a new block after blocks#1: score 0.3"
    row = EventRow(0, 4, "insert_block", "blocks.2", {"score": 0.3}, {"p": 9}, event.spec, "blocks#e0", summary)
    assert back.events == [row]
    # The second snapshot (depth 3, same step as the event, added before it) is placed after the insertion.
    assert back.snapshots[1].block_ids == {"blocks.0": "blocks#0", "blocks.1": "blocks#1", "blocks.2": "blocks#e0"}
    assert back.curvature[0].block_ids == {"blocks.0": "blocks#0", "blocks.1": "blocks#1"}
    assert math.isnan(back.curvature[0].trace_per_param["blocks.1"])  # NaN is stored as null and read back
    assert back.curvature[0].trace == record.trace and back.curvature[0].valid is False
    assert json.loads(open(path).read())["final"]["depth"] == {"blocks": 3}
    assert back.metadata == {"world_size": 1}


def _insert(stack: str, after: int, step: int) -> ArchitectureEvent:
    return ArchitectureEvent("insert_block", {"stack": stack, "index": after, "template": after, "seed": 0}, 0, step)


def test_block_identities_follow_insertions_and_dms_removals():
    depth_gate = {"name": "model/blocks:depth", "kind": "depth", "site": "depth", "stack": "model.blocks",
                  "blocks": [0, 1, 2, 3, 4], "n": 5}  # fmt: skip
    log = [
        _insert("model.blocks", 0, step=10),  # after #0
        _insert("model.blocks", 2, step=20),  # after position 2, which is #1 by then
        ArchitectureEvent("neuron_branch", {"linear": "model.blocks.3.mlp.fc1", "neurons": [1]}, 1, 20),
        ArchitectureEvent("dms_attach", {"gates": [depth_gate]}, 2, 30),
        ArchitectureEvent("dms_export", {"keep": {"model/blocks:depth": [0, 2, 3, 4]}}, 3, 40),  # drops position 1
    ]
    ids = BlockIdentities({"model.blocks": 3, "layer": 1}, log)
    assert ids.order(0)["model.blocks"] == ["model.blocks#0", "model.blocks#1", "model.blocks#2"]
    assert ids.order(1)["model.blocks"] == ["model.blocks#0", "model.blocks#e0", "model.blocks#1", "model.blocks#2"]
    after_two = ["model.blocks#0", "model.blocks#e0", "model.blocks#1", "model.blocks#e1", "model.blocks#2"]
    assert ids.order(2)["model.blocks"] == ids.order(4)["model.blocks"] == after_two
    assert ids.order(5) == {"model.blocks": [b for b in after_two if b != "model.blocks#e0"], "layer": ["layer#0"]}
    # The same position names different blocks before and after an event; an identity keeps its block.
    assert [ids.id_of("model.blocks.1", k) for k in (0, 1, 5)] == [
        "model.blocks#1",
        "model.blocks#e0",
        "model.blocks#1",
    ]
    assert [ids.position_of("model.blocks#2", k) for k in (0, 2, 5)] == [
        "model.blocks.2",
        "model.blocks.4",
        "model.blocks.3",
    ]
    assert ids.position_of("model.blocks#e0", 5) is None
    assert ids.id_of("model.blocks.3.mlp.fc1", 2) == "model.blocks#e1.mlp.fc1"
    assert ids.id_of("head", 3) == "head" and ids.id_of("layer.0", 0) == "layer#0"
    # An observation after some events (a resume, or a logger added late) gives the same identities.
    late = BlockIdentities.from_observation({"model.blocks": 5, "layer": 1}, 2, log)
    after_removal = BlockIdentities.from_observation({"model.blocks": 4, "layer": 1}, 5, log)
    assert (
        [late.order(k) for k in range(6)]
        == [after_removal.order(k) for k in range(6)]
        == [ids.order(k) for k in range(6)]
    )
    # A row at an event's step is placed before or after it by the positions it names.
    before = [f"model.blocks.{i}" for i in range(4)]
    assert ids.resolve(20, before) == 1 and ids.resolve(20, [*before, "model.blocks.4"]) == 2
    assert ids.resolve(40, [], depth={"model.blocks": 4, "layer": 1}) == 5
    # Summaries name blocks by identity.
    start = ArchitectureSnapshot(0, 0, {"model.blocks": 3, "layer": 1}, {}, params=0, num_events=0)
    history = ArchitectureHistory(snapshots=[start], events=[EventRow.from_event(e) for e in log])
    assert history.identities().order(5) == ids.order(5)
    assert [e.block_id for e in history.events] == [
        "model.blocks#e0", "model.blocks#e1", "model.blocks#e1.mlp.fc1", "model.blocks", "model.blocks",
    ]  # fmt: skip
    assert history.events[1].summary == "inserted a new block after model.blocks#1 (copy of model.blocks#1)"
    assert history.events[2].summary == "split 1 neuron of model.blocks#e1.mlp.fc1"
    # The spec's kept indices (no totals), and the block the depth gate removed.
    assert history.events[4].summary == "DMS export: kept 4 gated blocks; removed model.blocks#e0"
    kept = {"model/blocks:depth": 4, "model/blocks/1:mlp": 8, "model/blocks/2:mlp": 4}
    history.events[4].reason = {
        "kept": kept,
        "n": {"model/blocks:depth": 5, "model/blocks/1:mlp": 16, "model/blocks/2:mlp": 16},
    }
    history.events[4].cost = {"flops_before": 2e6, "flops_after": 1.5e6}
    history.assign_block_ids()
    assert history.events[4].summary == (  # the MLP of the removed block (position 1) is not counted
        "DMS export: kept 4/5 gated blocks, 4/16 MLP units in 1 block; removed model.blocks#e0; "
        "flops (DMS count) 2M → 1.5M (75%)"
    )


def test_history_rejects_unknown_version_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="format version 99"):
        ArchitectureHistory.from_dict({"version": 99})
    with pytest.raises(FileNotFoundError, match=r"No architecture_history\.json"):
        find_history_file(tmp_path)


def test_logger_validates_arguments():
    with pytest.raises(ValueError, match="log_every_n_epochs"):
        ArchitectureLogger(log_every_n_epochs=0)
    with pytest.raises(TypeError, match="heatmap"):
        ArchitectureLogger(heatmap="yes")
    with pytest.raises(TypeError, match="log_every_n_epochs"):
        ArchitectureLogger(log_every_n_epochs=True)
    with pytest.raises(ValueError, match="artifact_name"):
        ArchitectureLogger(artifact_name="my run/architecture")


# ---------------------------------------------------------------------------- TensorBoard and CSV


def test_tensorboard_and_csv_loggers_receive_architecture(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    probe = DepthProbe()
    module = TinyClassifier(example_input=False)  # FLOPs from the first training batch instead
    trainer = quiet_trainer(
        max_epochs=2,
        logger=[tb, csv_logger],
        callbacks=[InsertBlockEachEpoch(), ArchitectureLogger(), probe],
        log_every_n_steps=2,
    )
    trainer.fit(module)
    assert probe.depth_after_epoch == {0: 3, 1: 4}

    history = ArchitectureHistory.load(os.path.join(tb.log_dir, HISTORY_FILENAME))
    # The CSV logger gets the same history next to its metrics.csv.
    assert ArchitectureHistory.load(os.path.join(csv_logger.log_dir, HISTORY_FILENAME)).to_json() == history.to_json()
    assert [(s.phase, s.epoch, s.depth["model.blocks"]) for s in history.snapshots] == [
        ("train_start", 0, 2),
        ("epoch_end", 1, 3),
        ("epoch_end", 2, 4),
    ]
    final_flops = count_flops(module, torch.zeros(1, 1, 1, 16)).total
    assert history.final.flops == final_flops
    assert history.final.params == sum(p.numel() for p in module.parameters())
    # Both insertions happen at position 1: the same location, two different blocks.
    assert [(e.kind, e.epoch, e.location, e.block_id) for e in history.events] == [
        ("insert_block", 0, "model.blocks.1", "model.blocks#e0"),
        ("insert_block", 1, "model.blocks.1", "model.blocks#e1"),
    ]
    # Identities against ground truth: the same Python block object always has the same identity, different
    # objects different ones, across snapshots taken before and after insertions.
    identity_of_object: dict[int, str] = {}
    for epoch, objects in probe.objects_after_epoch.items():
        (snap,) = [s for s in history.snapshots if s.phase == "epoch_end" and s.epoch == epoch + 1]
        for position, obj in objects.items():
            assert identity_of_object.setdefault(obj, snap.block_ids[position]) == snap.block_ids[position]
    assert len(set(identity_of_object.values())) == len(identity_of_object) == 4
    assert history.final.block_ids == {
        "model.blocks.0": "model.blocks#0",
        "model.blocks.1": "model.blocks#e1",
        "model.blocks.2": "model.blocks#e0",
        "model.blocks.3": "model.blocks#1",
    }
    # The training loss every log_every_n_steps steps (4 batches per epoch), at the global step.
    assert [step for step, _ in history.metrics["train_loss"]] == [2, 4, 6, 8]

    acc = event_accumulator.EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    depth = [(e.step, e.value) for e in acc.Scalars("arch/depth/model.blocks")]
    steps = [s.step for s in history.snapshots]
    assert depth == [(steps[0], 2.0), (steps[1], 3.0), (steps[2], 4.0)]
    assert [e.value for e in acc.Scalars("arch/params")] == [float(s.params) for s in history.snapshots]
    assert acc.Scalars("arch/flops")[-1].value == pytest.approx(final_flops)
    # Widths by identity: the block born at event 1 appears at the last snapshot only.
    assert [e.step for e in acc.Scalars("arch/width/model.blocks#e1/mlp.fc1.out_features")] == [steps[2]]
    assert [e.value for e in acc.Scalars("arch/width/model.blocks#0/attn.num_heads")] == [2.0, 2.0, 2.0]
    texts = {tag: acc.Tensors(tag) for tag in acc.Tags()["tensors"] if tag.startswith("arch/")}
    event_text = [t.tensor_proto.string_val[0].decode() for t in texts["arch/events/text_summary"]]
    assert len(event_text) == 2
    assert "model.blocks#e0" in event_text[0] and "inserted a new block after model.blocks#0" in event_text[0]
    final_text = texts["arch/final/text_summary"][0].tensor_proto.string_val[0].decode()
    assert json.loads(final_text.replace("\n    ", "\n"))["depth"] == {"model.blocks": 4}
    # Report figures as images at the end (no curvature monitor here, so no heat map).
    assert sorted(acc.Tags()["images"]) == ["arch/params_flops", "arch/training", "arch/widths"]
    image = acc.Images("arch/widths")[-1]
    assert image.step == trainer.global_step and image.width > 300 and image.height > 150

    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("arch/depth/model.blocks")]
    assert [(int(r["step"]), int(float(r["arch/depth/model.blocks"]))) for r in rows] == [
        (steps[0], 2),
        (steps[1], 3),
        (steps[2], 4),
    ]
    assert [int(float(r["arch/epoch"])) for r in rows] == [0, 1, 2]
    # events.csv next to metrics.csv: typed columns, and it reads back as the history's events.
    events_csv = os.path.join(csv_logger.log_dir, "events.csv")
    assert read_events_csv(events_csv) == history.events
    with open(events_csv) as f:
        table = list(csv.DictReader(f))
    assert [(r["step"], r["block_id"], r["reason.why"], r["cost.params"]) for r in table] == [
        (str(e.step), e.block_id, "test", "1") for e in history.events
    ]


def test_resumed_run_continues_the_same_history(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(name: str, max_epochs: int, ckpt_path: str | None = None) -> ArchitectureHistory:
        logger = CSVLogger(tmp_path, name=name)
        callbacks = [
            InsertBlockEachEpoch(),
            ArchitectureLogger(),
            ModelCheckpoint(dirpath=tmp_path / name / "ckpt", save_last=True),
        ]
        trainer = quiet_trainer(max_epochs=max_epochs, logger=logger, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(TinyClassifier(), ckpt_path=ckpt_path)
        return ArchitectureHistory.load(os.path.join(logger.log_dir, HISTORY_FILENAME))

    def story(history: ArchitectureHistory) -> tuple[list, list]:
        snaps = [(s.epoch, s.step, s.depth, s.params, s.flops, s.phase, s.block_ids) for s in history.snapshots]
        return snaps, [(e.kind, e.epoch, e.step, e.location, e.block_id, e.summary) for e in history.events]

    uninterrupted = fit("straight", 2)
    fit("first_half", 1)
    resumed = fit("resumed", 2, ckpt_path=str(tmp_path / "first_half" / "ckpt" / "last.ckpt"))
    assert story(resumed) == story(uninterrupted)
    assert [s.depth["model.blocks"] for s in resumed.snapshots] == [2, 3, 4]
    assert [e.block_id for e in resumed.events] == ["model.blocks#e0", "model.blocks#e1"]
    # A logger that joins at the resume (no state of its own) derives the same identities from the event log.
    late = ArchitectureLogger()
    trainer = quiet_trainer(
        max_epochs=2, logger=False, default_root_dir=tmp_path / "late", callbacks=[InsertBlockEachEpoch(), late]
    )
    trainer.fit(TinyClassifier(), ckpt_path=str(tmp_path / "first_half" / "ckpt" / "last.ckpt"))
    assert [e.block_id for e in late.history.events] == ["model.blocks#e0", "model.blocks#e1"]
    assert late.history.final.block_ids == resumed.final.block_ids


def test_curvature_of_a_monitor_driven_by_depth_growth_is_recorded(tmp_path):
    from lightning_depthgrow.callbacks import CurvatureMonitor, DepthGrowth

    # The monitor is given to DepthGrowth only (not in trainer.callbacks), as the demo does.
    monitor = CurvatureMonitor(num_probes=2, log=False)
    growth = DepthGrowth.paper(final_budget=3.0, warmup_epochs=1, curvature_monitor=monitor, placement="curvature")
    logger = ArchitectureLogger()
    trainer = quiet_trainer(max_epochs=3, logger=CSVLogger(tmp_path), callbacks=[growth, logger])
    trainer.fit(TinyClassifier())
    assert growth.curvature_monitor is monitor and monitor.history
    recorded = [(c.epoch, c.step) for c in logger.history.curvature]
    assert recorded == [(h["epoch"], h["step"]) for h in monitor.history]


class DeeperClassifier(TinyClassifier):
    """The tiny ViT with 4 blocks (DMS may drop some)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tiny_vit(depth=4)


class BlockObjects(pl.Callback):
    """Ground truth: which Python block object sits at each position, at the start and at the end of training."""

    def __init__(self) -> None:
        self.seen: list[dict[str, int]] = []

    def _record(self, pl_module: pl.LightningModule) -> None:
        stack = find_block_stacks(pl_module)[0]
        self.seen.append({stack.block_name(i): id(b) for i, b in enumerate(stack.blocks)})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module)


@pytest.mark.slow
def test_dms_run_widths_and_identities_by_block(tmp_path):
    from lightning_depthgrow.callbacks import DifferentiableModelScaling

    csv_logger = CSVLogger(tmp_path, name="dms")
    objects = BlockObjects()
    module = DeeperClassifier()
    dms = DifferentiableModelScaling(target=0.4, search_epochs=1, arch_lr=0.05)
    trainer = quiet_trainer(max_epochs=2, logger=csv_logger, callbacks=[dms, ArchitectureLogger(), objects])
    trainer.fit(module)
    history = ArchitectureHistory.load(csv_logger.log_dir)

    attach, export = history.events
    assert (attach.kind, export.kind) == ("dms_attach", "dms_export")
    assert attach.location == export.location == "model.blocks"  # DMS rows have a location
    assert export.summary.startswith("DMS export: kept ")
    # The export took effect at its own step: the snapshot right after it shows the sliced model.
    (after,) = [s for s in history.snapshots if s.phase == "event"]
    assert after.step == export.step and after.num_events == 2
    stack = find_block_stacks(module)[0]
    real = {stack.block_name(i): block_widths(b) for i, b in enumerate(stack.blocks)}
    assert after.widths == history.final.widths == real
    # Identities against object identity: a block keeps its start identity through the export; removed blocks
    # are gone from the final mapping (the summary names them).
    start_ids = {obj: f"model.blocks#{i}" for i, obj in enumerate(objects.seen[0].values())}
    assert history.final.block_ids == {pos: start_ids[obj] for pos, obj in objects.seen[1].items()}
    removed = sorted(set(start_ids.values()) - set(history.final.block_ids.values()))
    assert (f"removed {', '.join(removed)}" in export.summary) == bool(removed)
    # Widths heat map data: the kept fraction of each surviving block's MLP is its final width over 32.
    final_by_id = {history.final.block_ids[position]: widths for position, widths in real.items()}
    keys, _, table = history.width_matrix()
    rows = dict(zip(keys, table))
    for block, widths in final_by_id.items():
        row = rows[(block, "mlp.fc1.out_features")]
        assert row[0] == 32 and row[-1] == widths["mlp.fc1.out_features"]
