"""``DepthGrowth()``'s defaults (since 0.7): the benchmarked G_stack recipe, inside a real ``Trainer.fit``, on a
module without an example input; the paper's recipe as the ``DepthGrowth.paper`` preset; the input helper."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_depthgrow import load_grown, register_block
from lightning_depthgrow.adapters import unregister_block
from lightning_depthgrow.callbacks import DepthGrowth, plumbing
from lightning_depthgrow.callbacks.depth_growth import DEFAULT_AT, DEFAULT_FACTOR, DEFAULT_RAMP_FRACTION
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_parameters
from lightning_depthgrow.surgery import FunctionNotPreservedError
from lightning_depthgrow.surgery.ramp import ramp_traces, ramped_blocks
from tests._helpers import (
    HOOK_DICTS,
    PROBE,
    Logits,
    RankRecord,
    make_module,
    quiet_trainer,
    random_loader,
    rank_records,
    tensor_hash,
)


def _no_example(depth: int = 2, max_epochs: int = 6) -> pl.LightningModule:
    module = make_module(depth=depth, max_epochs=max_epochs)
    module.example_input_array = None
    return module


# ---------------------------------------------------------------- the arguments


def test_the_default_is_the_benchmarked_g_stack_recipe() -> None:
    growth = DepthGrowth()
    assert (growth.operator, growth.factor, growth.at, growth.placement) == ("stack", 3, (1 / 3,), "uniform")
    assert (growth.ramp_fraction, growth.ramp_steps, growth.final_budget) == (0.12, None, 3.0)
    assert (DEFAULT_AT, DEFAULT_FACTOR, DEFAULT_RAMP_FRACTION) == ((1 / 3,), 3, 0.12)
    # Naming another operator keeps the other defaults (zero-init needs no ramp; factor is only for stack).
    assert (DepthGrowth(operator="zero_init").ramp_steps, DepthGrowth(operator="copy").ramp_fraction) == (0, 0.12)
    assert DepthGrowth(ramp_steps=180).ramp_steps == 180 and DepthGrowth(ramp_steps=180).ramp_fraction is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(warmup_epochs=2),
        dict(grow_every=2),
        dict(blocks_per_step=2),
        dict(step_budget=0.25, scale_by_lr=True),
        dict(max_per_stack=None),
        dict(placement="curvature"),
    ],
)
def test_paper_arguments_without_an_operator_are_refused_naming_the_preset(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"without an operator.*DepthGrowth\.paper\(.*operator='zero_init'"):
        DepthGrowth(**kwargs)
    assert DepthGrowth.paper(**kwargs).operator == "zero_init"
    if "warmup_epochs" in kwargs:  # the epoch schedule with stacking: name the operator
        assert DepthGrowth(operator="stack", **kwargs).warmup_epochs == 2


def test_the_paper_preset_is_the_previous_defaults() -> None:
    paper = DepthGrowth.paper()
    assert (paper.operator, paper.ramp_steps, paper.final_budget, paper.factor) == ("zero_init", 0, 2.0, 2)
    assert (paper.warmup_epochs, paper.grow_every, paper.at) == (1, 1, None)
    assert (paper.blocks_per_step, paper.max_per_stack, paper.step_budget, paper.scale_by_lr) == (1, 1, None, False)
    lr_scaled = DepthGrowth.paper(step_budget=0.25, scale_by_lr=True)
    assert (lr_scaled.step_budget, lr_scaled.scale_by_lr) == (0.25, True)
    assert DepthGrowth.paper(at=[0.5]).at == (0.5,) and DepthGrowth.paper(at=[0.5]).warmup_epochs is None


@pytest.mark.parametrize("ramp", [0.0, 1.0, 1.5, float("nan"), -0.1])
def test_a_ramp_fraction_outside_zero_one_is_refused(ramp: float) -> None:
    with pytest.raises(ValueError, match="ramp_steps"):
        DepthGrowth(ramp_steps=ramp)


class _Unsized(IterableDataset):
    def __iter__(self):
        yield from random_loader().dataset


def test_a_ramp_fraction_needs_the_run_length_and_says_so_before_anything_changes() -> None:
    growth = DepthGrowth(operator="stack", warmup_epochs=1)  # epoch schedule: only the ramp needs the length
    module = _no_example()
    start = tensor_hash(module)
    with pytest.raises(ValueError, match=r"ramp_steps=0\.12.*length is unknown.*as a number of steps"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, DataLoader(_Unsized(), batch_size=16))
    assert tensor_hash(module) == start and event_log(module) == []


# ---------------------------------------------------------------- the default inside fit


def _fit_default(tmp_path: Path, module: pl.LightningModule | None = None) -> tuple[Any, DepthGrowth, Logits, Logits]:
    module = module if module is not None else _no_example()
    growth, before, after = DepthGrowth(), Logits(), Logits()
    trainer = quiet_trainer(max_epochs=6, callbacks=[before, growth, after], default_root_dir=tmp_path)
    trainer.fit(module, random_loader())
    return module, growth, before, after


def test_the_default_grows_a_module_without_an_example_input_and_leaves_nothing_on_it(tmp_path: Path) -> None:
    start = count_parameters(_no_example())
    module, growth, before, after = _fit_default(tmp_path)
    # 6 epochs x 4 steps = 24 steps: 3x deeper after step round(24 / 3) = 8, ramp round(0.12 * 24) = 3 steps.
    assert growth.ramp_steps == 3
    grow, fold = event_log(module)
    assert grow.kind == "stack_blocks" and grow.step == 8
    assert grow.spec == {"stack": "model.blocks", "factor": 3, "order": "stack", "ramp_steps": 3}
    torch.testing.assert_close(after.seen[8], before.seen[8], atol=1e-5, rtol=0)  # the function at birth
    assert not torch.equal(after.seen[9], before.seen[8])  # and it trains on
    assert fold.kind == "fold_ramps" and fold.step == 11 and ramped_blocks(module) == {}
    assert len(module.model.blocks) == 6 and count_parameters(module) <= 3 * start
    # The verified trial ran on the input recorded during training (no example input), and accepted the stack.
    assert growth._deferred_growable == ["model.blocks"]

    # Nothing of ours is left on the module: no hook (the forward-input recorder included), no recorded input.
    plain = _no_example()
    quiet_trainer(max_epochs=1).fit(plain, random_loader())
    for attribute in HOOK_DICTS:
        for sub, ref in zip(module.modules(), plain.modules()):
            assert len(getattr(sub, attribute)) == len(getattr(ref, attribute)), (attribute, type(sub).__name__)
    assert plumbing.captured_input(module) is None and not ramp_traces(module)
    module.eval()
    with torch.no_grad():
        expected = module(PROBE)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        with torch.no_grad():
            assert torch.equal(clone.eval()(PROBE), expected)


class InPlace(nn.Module):
    """A residual block that scales its *input* in place: a ramp returns that input, changed (not an identity)."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return x + self.fc(x)


class InPlaceModule(pl.LightningModule):
    """No example_input_array; training_step calls the module itself, so its input is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks, self.head = nn.Sequential(InPlace(), InPlace()), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch.clone()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_trial_on_the_recorded_input_refuses_before_the_first_optimizer_step() -> None:
    register_block(InPlace, zero_init=["fc"])
    try:
        torch.manual_seed(0)
        module = InPlaceModule()
        start = tensor_hash(module)
        trainer = quiet_trainer(max_epochs=2, callbacks=[DepthGrowth()])
        batches = [torch.randn(2, 4) for _ in range(3)]
        with pytest.raises(FunctionNotPreservedError, match=r"modifies its input in place.*recorded at the first"):
            trainer.fit(module, DataLoader(batches, batch_size=None))
        assert tensor_hash(module) == start and trainer.global_step == 0 and event_log(module) == []
        assert len(module.blocks) == 2 and module._forward_pre_hooks == {} and not ramp_traces(module)
    finally:
        unregister_block(InPlace)


@pytest.mark.slow
def test_the_default_resumes_mid_ramp_bitwise_without_an_example_input(tmp_path: Path) -> None:
    # 8 epochs x 4 steps = 32: growth after step round(32 / 3) = 11, ramp round(0.12 * 32) = 4 steps (11..15).
    def run(ckpt_path: str | None, dirpath: Path, seed: int = 0) -> tuple[pl.LightningModule, DepthGrowth]:
        growth = DepthGrowth()
        saver = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(max_epochs=8, callbacks=[growth, saver], enable_checkpointing=True, deterministic=True)
        torch.manual_seed(seed)
        module = _no_example(max_epochs=8) if seed == 0 else make_module(depth=2, max_epochs=8, seed=seed)
        module.example_input_array = None
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module, growth

    full, _ = run(None, tmp_path / "full")
    assert [(e.kind, e.step) for e in event_log(full)] == [("stack_blocks", 11), ("fold_ramps", 15)]
    mid = tmp_path / "full" / "epoch=2.ckpt"  # step 12: the ramp is at 1 / 4
    state = torch.load(mid, weights_only=False)
    assert state["state_dict"]["model.blocks.2.depthgrow_ramp"].tolist() == [1, 4]
    callback_state = next(v for k, v in state["callbacks"].items() if k.startswith("DepthGrowth"))
    assert callback_state["growable"] == ["model.blocks"]  # the first run's trial verdict, for the resumed one

    resumed, growth = run(str(mid), tmp_path / "resumed", seed=123)  # fresh weights: all from the checkpoint
    assert [e.to_dict() for e in event_log(resumed)] == [e.to_dict() for e in event_log(full)]
    assert tensor_hash(resumed) == tensor_hash(full)
    assert growth._deferred_growable == ["model.blocks"] and resumed._forward_pre_hooks == {}
    fresh = load_grown(make_module(depth=2), tmp_path / "full" / "epoch=7.ckpt").eval()
    full.eval()
    with torch.no_grad():
        assert torch.equal(fresh(PROBE), full(PROBE))


@pytest.mark.slow
def test_the_default_without_an_example_input_keeps_ddp_ranks_identical(tmp_path: Path) -> None:
    # Each rank records its own batch; the trial's verdict and every step's verification input are rank 0's.
    # Per rank 32 samples / batch 8 = 4 steps per epoch, 3 epochs = 12: growth after step 4, ramp 1 step.
    trainer = quiet_trainer(
        max_epochs=3, devices=2, strategy="ddp_spawn", callbacks=[DepthGrowth(), RankRecord(tmp_path)]
    )
    module = _no_example(max_epochs=3)
    trainer.fit(module, random_loader(n=64, batch_size=8))
    ranks = rank_records(tmp_path)
    assert ranks[0] == ranks[1]
    assert [(e["kind"], e["step"]) for e in ranks[0]["events"]] == [("stack_blocks", 4), ("fold_ramps", 5)]
    assert ranks[0]["events"][0]["spec"]["factor"] == 3 and ranks[0]["ramped"] == {}


# ---------------------------------------------------------------- the paper preset

# What ``DepthGrowth()`` made on this run before 0.7 (the parent commit of this change, with and without an
# example input): ``[kind, spec, epoch, step]``.
OLD_DEFAULT_EVENTS = [
    ["insert_block", {"stack": "model.blocks", "index": 0, "template": 0, "seed": 0}, 0, 4],
    ["insert_block", {"stack": "model.blocks", "index": 2, "template": 2, "seed": 1009}, 1, 8],
]


def test_the_paper_preset_makes_the_events_the_old_defaults_made() -> None:
    hashes = []
    for example in (True, False):
        module = make_module(depth=2, max_epochs=4)
        if not example:
            module.example_input_array = None
        quiet_trainer(max_epochs=4, callbacks=[DepthGrowth.paper()], deterministic=True).fit(module, random_loader())
        assert [[e.kind, e.spec, e.epoch, e.step] for e in event_log(module)] == OLD_DEFAULT_EVENTS
        assert module._forward_pre_hooks == {}
        hashes.append(tensor_hash(module))
    # Verifying on the recorded input (no example input) changes nothing in training: bitwise the same weights.
    assert hashes[0] == hashes[1]


# ---------------------------------------------------------------- the input helper


class Keywords(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        return x if mask is None else x * mask


def test_the_recorded_input_is_the_latest_call_written_as_the_module_is_called() -> None:
    module = Keywords()
    assert plumbing.captured_input(module) is None
    plumbing.capture_inputs(module)
    x, mask = torch.ones(3, 2), torch.zeros(3, 2)
    module(x)
    assert torch.equal(plumbing.captured_input(module), x)
    module(x, mask)
    assert [t.shape for t in plumbing.captured_input(module)] == [(3, 2), (3, 2)]
    module(x, mask=mask, scale=2)
    recorded = plumbing.captured_input(module)
    assert set(recorded) == {"x", "mask", "scale"} and torch.equal(recorded["mask"], mask)
    recorded["x"].mul_(5)  # a copy: running a module on it cannot change the batch
    assert torch.equal(x, torch.ones(3, 2))
    assert plumbing.example_input(module, sample=True)["x"].shape == (1, 2)
    assert plumbing.example_input(module, given="given") == "given"
    plumbing.release_module(module)
    assert plumbing.captured_input(module) is None and not module._forward_pre_hooks
    # Without a recorder: the first tensor of a batch, one row (what ArchitectureLogger counts FLOPs on).
    assert plumbing.example_input(module, batch={"y": 1, "x": torch.ones(4, 2)}).shape == (1, 2)
    plumbing.capture_inputs(module)  # a copy made during fit holds an inert recorder
    copied = copy.deepcopy(module)
    copied(x)
    assert plumbing.captured_input(copied) is None
    plumbing.release_module(module)


def test_a_model_without_example_input_grows_with_the_logger_counting_flops(tmp_path: Path) -> None:
    from lightning_depthgrow.callbacks import ArchitectureLogger

    logger = ArchitectureLogger(heatmap=False)
    module = _no_example()
    trainer = quiet_trainer(max_epochs=6, callbacks=[DepthGrowth(), logger], default_root_dir=tmp_path)
    trainer.fit(module, random_loader())
    assert [e.kind for e in event_log(module)] == ["stack_blocks", "fold_ramps"]
    flops = [s.flops for s in logger.history.snapshots]
    assert flops[0] and flops[-1] > flops[0]
