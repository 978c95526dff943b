"""DifferentiableModelScaling's contract with the user's module and Trainer (issues 8 and 9).

Nothing is patched onto the user's module (it pickles, deep-copies and saves after fit), every argument is checked,
combinations that cannot work are refused before anything is attached, every torch LR scheduler keeps working with
the architecture param group, a diverged search is not exported, targets are never read as absolute counts by
accident, and a search-phase checkpoint loaded into a bare network says what it is.
"""

from __future__ import annotations

import copy
import io
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _helpers import PairBlock, PairNet, make_vit, quiet_trainer, tensor_hash
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import load_grown
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import ARCH_GROUP_KEY, export_model, find_gates
from lightning_depthgrow.events import EventLogMismatchError, event_log
from lightning_depthgrow.measure import count_flops

EXAMPLE = torch.zeros(2, 1, 1, 40)
BATCHES = 4  # training batches per epoch


def tiny_vit(depth: int = 2) -> nn.Module:
    return make_vit(depth=depth, embed_dim=32, num_heads=4)


def loader(n: int = 16 * BATCHES, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 1, 40, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


class Lit(pl.LightningModule):
    """A plain classifier: Adam over all parameters, no scheduler."""

    def __init__(self, depth: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = tiny_vit(depth)
        self.example_input_array = EXAMPLE

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(module: pl.LightningModule, callbacks: list, epochs: int = 2, ckpt_path=None, **kw) -> pl.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0, **kw)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def dms(**kw) -> DifferentiableModelScaling:
    options = dict(target=0.5, search_epochs=1, arch_lr=0.05)
    options.update(kw)
    return DifferentiableModelScaling(**options)


def snapshot(module: nn.Module) -> dict:
    """Everything a callback could leave on a module: weights, hooks anywhere, instance attributes, events."""
    hooks = {
        name: [
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._load_state_dict_pre_hooks),
            len(m._state_dict_hooks),
            sorted(k for k in m.__dict__ if not k.startswith("_") or k.startswith(("_dms", "_depthgrow"))),
        ]
        for name, m in module.named_modules()
    }
    return {"hash": tensor_hash(module), "keys": list(module.state_dict()), "hooks": hooks}


# ---------------------------------------------------------------- issue 8 item 4: nothing left behind
def test_nothing_patched_on_the_module_and_it_pickles_after_fit():
    plain = Lit()
    fit(plain, [], epochs=2)
    module = Lit()
    fit(module, [dms()], epochs=2)
    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export"]
    added = set(module.__dict__) - set(plain.__dict__)
    assert added <= {"_depthgrow_event_log"}, added  # the architecture history, plain data
    assert not any(callable(module.__dict__[k]) for k in added)
    for name in ("training_step", "configure_optimizers", "forward"):
        assert name not in module.__dict__, name
    assert not any("forward" in m.__dict__ for m in module.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    assert len(module._load_state_dict_pre_hooks) == len(plain._load_state_dict_pre_hooks)

    pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(module)
    x = torch.randn(3, 1, 1, 40)
    module.eval(), loaded.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(module(x), loaded(x)) and torch.equal(module(x), twin(x))
    # the copy's training_step is its class's method bound to the copy, not a closure over the original
    assert twin.training_step.__func__ is Lit.training_step and twin.training_step.__self__ is twin


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def test_training_stopped_during_the_search_warns_and_the_gated_module_still_pickles():
    module = Lit()
    with pytest.warns(UserWarning, match=r"before the export at epoch 2.*export_model"):
        fit(module, [dms(search_epochs=2), StopAfterFirstEpoch()], epochs=3)
    assert find_gates(module) is not None and [e.kind for e in event_log(module)] == ["dms_attach"]
    copy.deepcopy(module)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    x = torch.randn(3, 1, 1, 40)
    module.eval()
    with torch.no_grad():
        gated = module(x)
        export_model(module)
        assert torch.allclose(module(x), gated, atol=1e-5)


class StepProbe(pl.Callback):
    """The architecture group's options and the ratios' gradients at each optimizer step (after DMS's hook)."""

    def __init__(self) -> None:
        self.groups: list[dict] = []
        self.grads: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        arch = [g for g in optimizer.param_groups if g.get(ARCH_GROUP_KEY)]
        assert len(arch) == 1
        self.groups.append({k: v for k, v in arch[0].items() if k != "params"} | {"n": len(arch[0]["params"])})
        gates = find_gates(pl_module)
        if gates is not None:
            self.grads.append(sum(float(p.grad.abs().sum()) for p in gates.arch_parameters() if p.grad is not None))


def test_resource_loss_reaches_the_ratios_without_touching_training_step():
    """The hinge is added through Lightning's hooks: the search alone (no export-time trimming) reaches the target."""
    module = Lit()
    probe = StepProbe()
    fit(module, [dms(target=0.5, search_epochs=2, enforce_target=False), probe], epochs=3)
    export = next(e for e in event_log(module) if e.kind == "dms_export")
    assert export.reason.get("changed_elements", 0) == 0 and export.reason["searched_ratio"] <= 0.6
    assert probe.grads and probe.grads[0] > 0  # the ratios have a gradient from the first step on


def test_resource_gradient_is_added_in_real_units_under_a_grad_scaler():
    """The resource gradient joins the ratios' gradients after AMP unscaling: a scaled fp16 run steers the ratios
    as the fp32 run does (added before unscaling it would be 2**14 times too small next to the task gradient)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    runs = []
    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**14))]):
        module, probe = Lit(), StepProbe()
        trainer = fit(
            module, [dms(target=0.5, search_epochs=2, enforce_target=False), probe], epochs=3, plugins=plugins
        )
        runs.append((probe.grads, next(e for e in event_log(module) if e.kind == "dms_export").reason))
    assert getattr(trainer.precision_plugin, "scaler", None) is not None
    (grads32, export32), (grads16, export16) = runs
    assert grads16[:4] == pytest.approx(grads32[:4], rel=0.02)  # the resource gradient dominates these steps
    assert export16["searched_ratio"] == pytest.approx(export32["searched_ratio"], abs=0.02)


# ---------------------------------------------------------------- issue 8 item 5: argument validation
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(lambda_res=float("nan")), ValueError, "lambda_res"),
        (dict(lambda_res=0.0), ValueError, "lambda_res"),
        (dict(lambda_res="1"), TypeError, "lambda_res"),
        (dict(arch_lr=float("inf")), ValueError, "arch_lr"),
        (dict(arch_lr=True), TypeError, "arch_lr"),
        (dict(search_epochs=2.0), TypeError, "search_epochs"),
        (dict(search_epochs=True), TypeError, "search_epochs"),
        (dict(search_epochs=0), ValueError, "search_epochs"),
        (dict(target="0.5"), TypeError, "target"),
        (dict(target=float("nan")), ValueError, "target"),
        (dict(target=0.0), ValueError, "target"),
        (dict(target=1.0), ValueError, "target"),
        (dict(target=True), TypeError, "target"),
        (dict(resource="macs"), ValueError, "resource"),
        (dict(schedule_fraction=0.0), ValueError, "schedule_fraction"),
        (dict(schedule_fraction=float("nan")), ValueError, "schedule_fraction"),
        (dict(width="yes"), TypeError, "width"),
        (dict(heads=1), TypeError, "heads"),
        (dict(depth=None), TypeError, "depth"),
        (dict(enforce_target="no"), TypeError, "enforce_target"),
        (dict(absolute_target=1), TypeError, "absolute_target"),
        (dict(width=False, heads=False, depth=False), ValueError, "width"),
    ],
)
def test_every_argument_is_checked(kwargs, error, name):
    with pytest.raises(error, match=f"`?{name}`?"):
        dms(**kwargs)


# ---------------------------------------------------------------- issue 9 item 19: fractions vs counts
def test_target_above_one_is_refused_unless_asked_for_as_a_count():
    with pytest.raises(ValueError, match=r"target=0\.4.*absolute_target=True"):
        dms(target=40)
    with pytest.raises(ValueError, match=r"absolute_target=True.*count"):
        dms(target=0.5, absolute_target=True)
    module = Lit()
    full = count_flops(module, EXAMPLE).total
    budget = 0.6 * full
    fit(module, [dms(target=budget, absolute_target=True)], epochs=2)
    export = next(e for e in event_log(module) if e.kind == "dms_export")
    assert export.reason["target_ratio"] == pytest.approx(budget / full, rel=1e-6)
    assert count_flops(module, EXAMPLE).total <= budget


def test_resuming_a_search_with_another_target_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    fit(Lit(), [dms(search_epochs=2), checkpoint], epochs=3, enable_checkpointing=True)
    search_ckpt = str(tmp_path / "epoch=0.ckpt")
    module = Lit(seed=1)
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"target=0\.5.*target=0\.4"):
        fit(module, [dms(target=0.4, search_epochs=2)], epochs=3, ckpt_path=search_ckpt)
    with pytest.raises(ValueError, match="resource"):
        fit(module, [dms(resource="params", search_epochs=2)], epochs=3, ckpt_path=search_ckpt)
    with pytest.raises(ValueError, match=r"arch_lr=0\.05.*arch_lr=0\.01"):
        fit(module, [dms(arch_lr=0.01, search_epochs=2)], epochs=3, ckpt_path=search_ckpt)
    assert snapshot(module) == before  # refused before the checkpoint's architecture or weights were applied
    after_export = Lit()
    fit(after_export, [dms(target=0.4, search_epochs=2)], epochs=4, ckpt_path=str(tmp_path / "epoch=2.ckpt"))
    assert [e.kind for e in event_log(after_export)] == ["dms_attach", "dms_export"]  # the search was over
    resumed = Lit()
    fit(resumed, [dms(search_epochs=2)], epochs=3, ckpt_path=search_ckpt)  # the same target resumes
    assert [e.kind for e in event_log(resumed)] == ["dms_attach", "dms_export"]


# ---------------------------------------------------------------- issue 9 items 5 and 7: refused before attaching
def test_search_that_never_exports_is_refused_at_setup():
    module = Lit()
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"search_epochs=2.*max_epochs=2"):
        fit(module, [dms(search_epochs=2)], epochs=2)
    assert snapshot(module) == before  # (event_log() would create an empty log: look at it last)
    with pytest.raises(ValueError, match=r"max_steps=4"):
        fit(module, [dms(search_epochs=1)], epochs=-1, max_steps=4)
    assert snapshot(module) == before and find_gates(module) is None and not event_log(module)


class FailingSetup(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("another callback's setup failed")


@pytest.mark.parametrize("case", ["target_too_low", "no_example_input", "later_callback_fails"])
def test_failed_setup_leaves_the_module_untouched(case):
    module = Lit()
    callbacks = [dms()]
    if case == "target_too_low":
        callbacks = [dms(target=0.001, depth=False)]
        match = "below the smallest model"
    elif case == "no_example_input":
        module.example_input_array = None
        match = "example input"
    else:
        callbacks.append(FailingSetup())
        match = "another callback"
    before = snapshot(module)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fit(module, callbacks, epochs=2)
    assert snapshot(module) == before  # (event_log() would create an empty log: look at it last)
    assert find_gates(module) is None and not event_log(module)
    module.example_input_array = EXAMPLE
    fit(module, [dms()], epochs=2)  # the same module trains with DMS afterwards
    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export"]


# ---------------------------------------------------------------- issue 9 item 8: every torch scheduler
def build_scheduler(name: str, optimizer: torch.optim.Optimizer, steps: int):
    sched = torch.optim.lr_scheduler
    if name == "OneCycleLR":
        return sched.OneCycleLR(optimizer, max_lr=[1e-2, 2e-2], total_steps=steps), "step"
    if name == "CosineAnnealingLR":
        return sched.CosineAnnealingLR(optimizer, T_max=steps), "step"
    if name == "LambdaLR":
        return sched.LambdaLR(optimizer, [lambda s: 0.9**s, lambda s: 1.0 / (1 + s)]), "step"
    if name == "MultiplicativeLR":
        return sched.MultiplicativeLR(optimizer, lambda s: 0.95), "step"
    if name == "SequentialLR":
        warm = sched.LinearLR(optimizer, start_factor=0.1, total_iters=3)
        cos = sched.CosineAnnealingLR(optimizer, T_max=steps - 3)
        return sched.SequentialLR(optimizer, [warm, cos], milestones=[3]), "step"
    if name == "ChainedScheduler":
        return sched.ChainedScheduler(
            [sched.ConstantLR(optimizer, 0.5, 2), sched.ExponentialLR(optimizer, 0.9)]
        ), "step"
    if name == "CyclicLR":
        return sched.CyclicLR(optimizer, base_lr=1e-4, max_lr=1e-2, step_size_up=2), "step"
    if name == "CosineAnnealingWarmRestarts":
        return sched.CosineAnnealingWarmRestarts(optimizer, T_0=3), "step"
    if name == "StepLR":
        return sched.StepLR(optimizer, step_size=1, gamma=0.5), "epoch"
    if name == "MultiStepLR":
        return sched.MultiStepLR(optimizer, milestones=[1, 2], gamma=0.5), "epoch"
    if name == "PolynomialLR":
        return sched.PolynomialLR(optimizer, total_iters=steps, power=2.0), "step"
    if name == "ReduceLROnPlateau":
        return sched.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, min_lr=[1e-5, 1e-6]), "epoch"
    raise KeyError(name)


SCHEDULERS = [
    "OneCycleLR",
    "CosineAnnealingLR",
    "LambdaLR",
    "MultiplicativeLR",
    "SequentialLR",
    "ChainedScheduler",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "StepLR",
    "MultiStepLR",
    "PolynomialLR",
    "ReduceLROnPlateau",
]


class Scheduled(Lit):
    """Two param groups (decay / no decay) and one of torch's LR schedulers."""

    def __init__(self, scheduler: str, optimizer: str = "adamw") -> None:
        super().__init__()
        self.scheduler, self.optimizer_name = scheduler, optimizer

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim > 1]
        other = [p for p in self.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=1e-2, momentum=0.9)
        else:
            optimizer = torch.optim.AdamW(groups, lr=1e-3)
        scheduler, interval = build_scheduler(self.scheduler, optimizer, 3 * BATCHES)
        config = {"scheduler": scheduler, "interval": interval}
        if self.scheduler == "ReduceLROnPlateau":
            config["monitor"] = "train_loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


class LrProbe(pl.Callback):
    """The user's groups' lrs and the architecture group's options at every optimizer step."""

    def __init__(self) -> None:
        self.user: list[list[float]] = []
        self.arch: list[tuple] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.user.append([g["lr"] for g in optimizer.param_groups if not g.get(ARCH_GROUP_KEY)])
        for g in optimizer.param_groups:
            if g.get(ARCH_GROUP_KEY):
                self.arch.append((g["lr"], g.get("betas", (g.get("momentum"),))[0], g["weight_decay"]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_torch_scheduler_keeps_working_with_the_architecture_group(name):
    optimizer = "sgd" if name == "CyclicLR" else "adamw"
    reference = LrProbe()
    fit(Scheduled(name, optimizer), [reference], epochs=3)
    probe = LrProbe()
    module = Scheduled(name, optimizer)
    fit(module, [dms(search_epochs=2, arch_lr=0.03), probe], epochs=3)
    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export"]
    assert len(probe.arch) == 3 * BATCHES
    assert all(a == (0.03, 0.0, 0.0) for a in probe.arch), probe.arch  # constant lr, no momentum, no decay
    if name != "ReduceLROnPlateau":  # its decisions follow the (DMS-changed) loss
        flat = [lr for lrs in probe.user for lr in lrs]
        assert flat == pytest.approx([lr for lrs in reference.user for lr in lrs])  # the user's schedule is untouched


@pytest.mark.slow
def test_one_cycle_resumes_mid_search_like_an_uninterrupted_run(tmp_path):
    def run(ckpt_path=None):
        module = Scheduled("OneCycleLR")
        checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        fit(module, [dms(search_epochs=2), checkpoint], epochs=3, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module

    reference = run()
    resumed = run(ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert tensor_hash(resumed) == tensor_hash(reference)


# ---------------------------------------------------------------- issue 8 item 2: DMS on the callback base
def test_dms_on_the_base_exports_at_epoch_start_and_a_0_1_checkpoint_resumes(tmp_path):
    from lightning_depthgrow.callbacks import ArchitectureCallback
    from lightning_depthgrow.events import load_checkpoint_events

    def run(ckpt_path=None, out=tmp_path):
        module = Lit()
        checkpoint = ModelCheckpoint(dirpath=out, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        fit(module, [dms(search_epochs=2), checkpoint], epochs=3, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module

    assert isinstance(dms(), ArchitectureCallback) and dms().change_at == "epoch_start"
    reference = run()
    # the export runs at the start of epoch 2: the last search epoch's checkpoint still holds the gated supernet
    assert [e.kind for e in load_checkpoint_events(str(tmp_path / "epoch=1.ckpt"))] == ["dms_attach"]
    export = event_log(reference)[-1]
    assert (export.kind, export.epoch) == ("dms_export", 2) and export.cost["seconds"] > 0
    # a checkpoint written by DMS 0.1 (its callback state had only these three keys) resumes like the base's own
    old = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    (key,) = [k for k in old["callbacks"] if "DifferentiableModelScaling" in k]
    assert {"growth_steps", "last_growth_epoch"} <= set(old["callbacks"][key])
    old["callbacks"][key] = {"target": 0.5, "absolute_target": False, "resource": "flops"}
    torch.save(old, tmp_path / "old.ckpt")
    resumed = run(ckpt_path=str(tmp_path / "old.ckpt"), out=tmp_path / "resumed")
    assert tensor_hash(resumed) == tensor_hash(reference)


# ---------------------------------------------------------------- issue 9 item 13: NaN loss
class Diverging(Lit):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_non_finite_loss_is_reported_and_nothing_is_exported():
    module = Diverging()
    with pytest.raises(RuntimeError, match=r"loss is not finite.*step 2"):
        fit(module, [dms(search_epochs=2)], epochs=3)
    assert "dms_export" not in [e.kind for e in event_log(module)]


# ---------------------------------------------------------------- issue 9 item 11: search checkpoints and load_grown
def test_search_checkpoint_into_a_bare_network_says_what_it_is(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trained = Lit()
    fit(trained, [dms(search_epochs=2), checkpoint], epochs=3, enable_checkpointing=True)
    search_ckpt = tmp_path / "epoch=0.ckpt"

    bare = tiny_vit()
    before = snapshot(bare)
    with pytest.raises(EventLogMismatchError, match=r"(?s)during a DMS search.*export_model"):
        load_grown(bare, search_ckpt)
    assert snapshot(bare) == before

    # the way out the message gives: the LightningModule takes the gated supernet, export_model slices it
    lit = load_grown(Lit(seed=1), search_ckpt)
    x = torch.randn(5, 1, 1, 40)
    lit.eval()
    with torch.no_grad():
        gated = lit(x)
        export_model(lit)
        assert find_gates(lit) is None
        assert torch.allclose(lit(x), gated, atol=1e-5)  # eval computes the hard masks: what export keeps
    # after the export, the bare network loads as before
    exported = load_grown(tiny_vit(), tmp_path / "epoch=2.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(exported(x), trained.eval()(x))


# ---------------------------------------------------------------- issue 9 item 7: refused before any gate is attached
class Recording(pl.LightningModule):
    """Records every sub-module added to this very instance (a deep copy records on itself, not here)."""

    def __init__(self, net: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = example
        self.__dict__["added_to_me"] = []

    def add_module(self, name, module):
        if "added_to_me" in self.__dict__ and id(self) == self.__dict__.get("me", id(self)):
            self.__dict__["added_to_me"].append(name)
        return super().add_module(name, module)

    def forward(self, x):
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch, batch_idx):
        return self(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def tiny_bert() -> nn.Module:
    """A DistilBERT: DMS gates BERT and RoBERTa encoders (tests/test_dms_bert.py), not DistilBERT's layers."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    return DistilBertForMaskedLM(config)


@pytest.mark.parametrize("case", ["hf_bert", "tuple_block"])
def test_a_model_the_core_refuses_is_refused_before_any_gate_is_attached(case):
    from lightning_depthgrow.adapters.registry import register_block, unregister_block

    if case == "hf_bert":  # a transformers model DMS does not gate (DistilBERT)
        net, example = tiny_bert(), torch.randint(0, 64, (2, 16))
        data = TensorDataset(torch.randint(0, 64, (8, 16)))
        match, way_out = "Hugging Face transformers", "scale the Hugging Face config by hand"
    else:
        register_block(PairBlock, zero_init=["fc"])
        net, example = PairNet(), torch.zeros(2, 40)
        data = TensorDataset(torch.randn(8, 40))
        match, way_out = "PairBlock to map one tensor", "depth=False"
    try:
        module = Recording(net, example)
        module.__dict__["me"] = id(module)
        before = snapshot(module)
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = quiet_trainer(max_epochs=2, callbacks=[dms()], limit_val_batches=0, num_sanity_val_steps=0)
        with pytest.raises(Exception, match=match) as info:
            trainer.fit(module, DataLoader(data, batch_size=4))
        assert way_out in str(info.value)
        assert module.__dict__["added_to_me"] == []  # no gate container was ever added to the user's module
        assert snapshot(module) == before and find_gates(module) is None
        assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())  # bitwise
        assert not event_log(module)
    finally:
        if case == "tuple_block":
            unregister_block(PairBlock)


class Uncopyable(Lit):
    """Holds a lock, which copy.deepcopy refuses: the setup checks then run on the module itself."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.lock = threading.Lock()


def test_a_module_that_cannot_be_copied_still_searches_and_a_refusal_still_leaves_it_untouched():
    with pytest.raises(TypeError):
        copy.deepcopy(Uncopyable())
    module = Uncopyable()
    before = snapshot(module)
    with pytest.raises(ValueError, match="below the smallest model"):
        fit(module, [dms(target=0.001, depth=False)], epochs=2)
    assert snapshot(module) == before and find_gates(module) is None and not event_log(module)
    fit(module, [dms()], epochs=2)
    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export"]
