"""Issue 9, growth side: each combination either works correctly or is refused before training with a message
that says what to do. Every test here fails on the release before the core redesign."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _helpers import Classifier, make_module, make_vit, quiet_trainer, random_loader

from lightning_depthgrow.callbacks import CurvatureMonitor, DepthGrowth, DifferentiableModelScaling, NeuronGrowth
from lightning_depthgrow.dms import attach_event
from lightning_depthgrow.events import apply_event, event_log
from lightning_depthgrow.measure import count_flops, count_parameters, first_sample


def _fit(module, callbacks, epochs: int = 3, **kwargs):
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    trainer.fit(module, random_loader())
    return trainer


def _refused(module, callbacks, error, match, **kwargs):
    """Fitting raises ``error`` before any training step, with the module's architecture unchanged."""
    blocks = len(module.model.blocks)
    trainer = quiet_trainer(max_epochs=3, callbacks=callbacks, **kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(module, random_loader())
    assert trainer.global_step == 0 and len(module.model.blocks) == blocks
    return trainer


# ---------------------------------------------------------------- 9.1 growth during a DMS search


@pytest.mark.parametrize("grower", ["depth", "neuron"])
def test_growth_during_a_dms_search_is_refused_at_setup(grower):
    growth = DepthGrowth.paper(warmup_epochs=1) if grower == "depth" else NeuronGrowth(warmup_epochs=2)
    dms = DifferentiableModelScaling(target=0.6, search_epochs=2)
    _refused(
        make_module(), [dms, growth], RuntimeError, r"during DifferentiableModelScaling's search.*warmup_epochs >= 3"
    )


def test_a_gated_supernet_without_its_dms_callback_is_refused():
    module = make_module()
    event = attach_event(module, lr=0.01)
    apply_event(module, event)
    event_log(module).append(event)  # as a checkpoint taken during a search leaves it
    _refused(module, [DepthGrowth.paper()], RuntimeError, "DMS search gates")


@pytest.mark.slow
def test_growth_after_the_dms_export_keeps_working():
    module = make_module(max_epochs=3)
    dms = DifferentiableModelScaling(target=0.7, search_epochs=1)
    _fit(module, [dms, DepthGrowth.paper(final_budget=3.0, warmup_epochs=2, placement="uniform")], epochs=3)
    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export", "insert_block"]
    assert event_log(module)[-1].epoch == 1


# ---------------------------------------------------------------- 9.9 one param group per block


class LayerwiseDecay(Classifier):
    """Layer-wise LR decay: one param group per block, as in ViT fine-tuning recipes."""

    def configure_optimizers(self) -> Any:
        blocks = list(self.model.blocks)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        groups = [{"params": list(b.parameters()), "lr": 1e-3 * 0.7 ** (len(blocks) - i)} for i, b in enumerate(blocks)]
        groups.append({"params": [p for p in self.parameters() if id(p) not in in_blocks]})
        return torch.optim.AdamW(groups, lr=1e-3)


def test_param_groups_per_block_are_refused_before_training():
    torch.manual_seed(0)
    module = LayerwiseDecay(make_vit())
    _refused(
        module, [DepthGrowth.paper(placement="uniform")], RuntimeError, "param groups of its own.*not one per block"
    )


# ---------------------------------------------------------------- 9.12 a budget no block fits


def test_a_budget_smaller_than_the_smallest_block_is_refused_naming_its_size():
    module = make_module()
    size = count_parameters(module.model.blocks[0])
    _refused(
        module,
        [DepthGrowth.paper(final_budget=1.05)],
        ValueError,
        rf"smallest block .*model\.blocks\.\d+\) has {size:,}",
    )
    _refused(
        make_module(), [NeuronGrowth(step_budget=2, budget_mode="absolute")], ValueError, "nothing would ever grow"
    )


# ---------------------------------------------------------------- 9.13 a loss that is not finite


class Diverged(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["uniform", "curvature"])
def test_a_diverged_model_is_not_grown_and_the_loss_is_named(placement):
    torch.manual_seed(0)
    module = Diverged(make_vit(), max_epochs=3)
    with pytest.warns(UserWarning, match="training loss is not finite"):
        _fit(module, [DepthGrowth.paper(placement=placement, final_budget=3.0)])
    assert event_log(module) == [] and len(module.model.blocks) == 2


# ---------------------------------------------------------------- 9.15 manual optimization


class Manual(Classifier):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y))
        optimizer.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def test_manual_optimization_is_refused_at_setup_naming_the_callback_and_loss_fn():
    torch.manual_seed(0)
    _refused(
        Manual(make_vit()),
        [DepthGrowth.paper(placement="curvature")],
        RuntimeError,
        r"DepthGrowth\(placement='curvature'\).*loss_fn",
    )
    _refused(Manual(make_vit()), [NeuronGrowth()], RuntimeError, r"NeuronGrowth.*loss_fn")


@pytest.mark.slow
def test_manual_optimization_grows_with_a_loss_fn():
    torch.manual_seed(0)
    module = Manual(make_vit())
    monitor = CurvatureMonitor(loss_fn=_loss, log=False, num_probes=2)
    _fit(module, [DepthGrowth.paper(final_budget=3.0, curvature_monitor=monitor, placement="curvature")], epochs=2)
    assert [e.kind for e in event_log(module)] == ["insert_block"]


# ---------------------------------------------------------------- 9.18 FLOPs per sample everywhere


@pytest.mark.slow
def test_flop_budgets_and_event_costs_count_per_sample():
    from lightning_depthgrow.history import count_model_flops

    module = make_module()
    module.example_input_array = torch.zeros(8, 1, 1, 40)  # a batch of 8: the numbers must not depend on it
    before = count_model_flops(module, module.example_input_array)
    growth = DepthGrowth.paper(final_budget=3.0, budget_metric="flops", placement="uniform")
    _fit(module, [growth], epochs=2)
    (event,) = event_log(module)
    assert (
        growth.start_size
        == before
        == count_flops(module, first_sample(torch.zeros(8, 1, 1, 40))).total - event.cost["flops"]
    )
    assert count_model_flops(module, module.example_input_array) == before + event.cost["flops"]
    assert event.reason["budget_after"] == before + event.cost["flops"]


# ---------------------------------------------------------------- 9.21 trainer.fit(torch.compile(module))


def test_fit_of_a_compiled_lightning_module_is_refused():
    module = make_module()
    trainer = quiet_trainer(max_epochs=2, callbacks=[DepthGrowth.paper()])
    with pytest.raises(RuntimeError, match=r"torch\.compile"):
        trainer.fit(torch.compile(module), random_loader())
    assert trainer.global_step == 0 and len(module.model.blocks) == 2
