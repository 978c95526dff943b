"""DepthGrowth(optimizer_state="copy"): copied blocks start with their source block's optimizer state (issue 14)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.events import ArchitectureEvent, apply_event, event_log
from lightning_depthgrow.measure import count_parameters
from tests._helpers import RankRecord, make_module, quiet_trainer, random_loader, rank_records, tensor_hash


def _params(depth: int) -> int:
    return count_parameters(make_module(depth=depth))


def _stack(optimizer_state: str = "copy", ramp_steps: int = 3, **kwargs: Any) -> DepthGrowth:
    return DepthGrowth(
        final_budget=_params(4),
        budget_mode="absolute",
        operator="stack",
        factor=2,
        ramp_steps=ramp_steps,
        warmup_epochs=1,
        optimizer_state=optimizer_state,
        **kwargs,
    )


class StateAfterGrowth(Callback):
    """After the growth step (put after DepthGrowth in the callbacks): the Adam state of every parameter of the
    stacked blocks 2, 3 and of their sources 0, 1, cloned, keyed by ``(block, parameter name)``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state: dict[tuple[int, str], dict[str, torch.Tensor] | None] = {}
        self.same_object = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        optimizer = trainer.optimizers[0]
        blocks = pl_module.model.blocks
        for i, block in enumerate(blocks):
            for name, p in block.named_parameters():
                state = optimizer.state.get(p)
                self.state[(i, name)] = None if not state else {k: v.clone() for k, v in state.items()}
        source, copy = dict(blocks[0].named_parameters()), dict(blocks[2].named_parameters())
        self.same_object = any(
            optimizer.state[copy[n]]["exp_avg"] is optimizer.state[source[n]]["exp_avg"]
            for n in source
            if copy[n] in optimizer.state
        )


@pytest.mark.parametrize("optimizer_state", ["copy", "fresh"])
def test_stacked_blocks_start_with_their_source_blocks_adam_state(optimizer_state: str) -> None:
    growth, seen = _stack(optimizer_state), StateAfterGrowth(step=4)
    module = make_module(depth=2, max_epochs=2)
    trainer = quiet_trainer(max_epochs=2, callbacks=[growth, seen])
    trainer.fit(module, random_loader())
    grow = event_log(module)[0]
    assert grow.kind == "stack_blocks" and grow.step == 4
    assert grow.spec.get("optimizer_state") == ("copy" if optimizer_state == "copy" else None)
    names = [name for (i, name) in seen.state if i == 0]
    assert len(names) > 4 and all(seen.state[(0, n)] is not None for n in names)  # the sources trained 4 steps
    for copy, source in ((2, 0), (3, 1)):
        for name in names:
            state = seen.state[(copy, name)]
            if optimizer_state == "fresh":
                assert state is None
                continue
            expected = seen.state[(source, name)]
            assert state is not None and state.keys() == expected.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(state[k], expected[k]) for k in expected), (copy, name)
    assert not seen.same_object  # copies, so the blocks' moments move apart from the next step on


@pytest.mark.slow
def test_resume_mid_ramp_with_copied_state_is_bitwise(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, dirpath: Path, optimizer_state: str = "copy") -> pl.LightningModule:
        saver = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        callbacks = [_stack(optimizer_state, ramp_steps=6), saver]
        trainer = quiet_trainer(max_epochs=4, callbacks=callbacks, enable_checkpointing=True)
        module = make_module(depth=2, max_epochs=4)
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module

    full = run(None, tmp_path / "full")
    mid = tmp_path / "full" / "epoch=1.ckpt"  # step 8: grown at step 4, ramp at 4 / 6
    checkpoint = torch.load(mid, weights_only=False)
    assert checkpoint["state_dict"]["model.blocks.2.depthgrow_ramp"].tolist() == [4, 6]
    resumed = run(str(mid), tmp_path / "resumed")
    assert [e.kind for e in event_log(resumed)] == ["stack_blocks", "fold_ramps"]
    assert event_log(resumed)[0].spec["optimizer_state"] == "copy"
    assert tensor_hash(resumed) == tensor_hash(full)
    # The option changes training (else the equality above would not show the copied state was resumed).
    assert tensor_hash(run(None, tmp_path / "fresh", "fresh")) != tensor_hash(full)


@pytest.mark.slow
def test_copied_state_under_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    trainer = quiet_trainer(
        max_epochs=3, devices=2, strategy="ddp_spawn", callbacks=[_stack(ramp_steps=2), RankRecord(tmp_path)]
    )
    trainer.fit(make_module(depth=2, max_epochs=3), random_loader(n=64, batch_size=8))
    ranks = rank_records(tmp_path)
    assert ranks[0] == ranks[1]
    assert [(e["kind"], e["step"]) for e in ranks[0]["events"]] == [("stack_blocks", 4), ("fold_ramps", 6)]
    assert ranks[0]["events"][0]["spec"]["optimizer_state"] == "copy"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"operator": "stack", "optimizer_state": "adam"}, ValueError, "optimizer_state.*'fresh', 'copy'.*'adam'"),
        ({"operator": "stack", "optimizer_state": None}, TypeError, "optimizer_state"),
        ({"operator": "copy", "optimizer_state": True}, TypeError, "optimizer_state"),
        ({"operator": "zero_init", "optimizer_state": "copy"}, ValueError, "operator='zero_init' makes zero-initial"),
    ],
)
def test_a_bad_optimizer_state_is_refused(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DepthGrowth(final_budget=2.0, at=[0.3], **kwargs)


def test_an_event_with_a_bad_optimizer_state_is_refused_before_the_model_changes() -> None:
    module = make_module(depth=2)
    before = tensor_hash(module)
    spec = {"stack": "model.blocks", "factor": 2, "order": "stack", "ramp_steps": 0, "optimizer_state": "moments"}
    with pytest.raises(ValueError, match="optimizer_state"):
        apply_event(module, ArchitectureEvent("stack_blocks", spec))
    assert len(module.model.blocks) == 2 and tensor_hash(module) == before
