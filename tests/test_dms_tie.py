"""DMS's tied gates (``tie=("width",)``) on real timm VisionTransformers: one learnable ratio shared by every block's
MLP gate, so the export has the same MLP width in every block (each block keeps its own most important units); the
resource model, the budget fit, the export, a real Trainer fit, resume and DDP work with it; it is refused where it
cannot apply, with the module untouched; searches without it record and replay as before."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import Classifier, make_vit, quiet_trainer, random_loader, tensor_hash
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from test_dms_callback import HashProbe, MNIST1DDataModule, trainer, vit_classifier

from lightning_depthgrow import UnsupportedModelError
from lightning_depthgrow.callbacks import DifferentiableModelScaling
from lightning_depthgrow.dms import (
    ARCH_GROUP_KEY,
    ResourceModel,
    attach_event,
    attach_gates,
    build_architecture,
    export_architecture,
    export_model,
    find_gates,
    fit_architecture,
    remove_gates,
    set_importance,
    tie_specs,
)
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops, count_parameters

X = torch.randn(3, 1, 1, 40, generator=torch.Generator().manual_seed(0))
MLP = ["blocks/0:mlp", "blocks/1:mlp", "blocks/2:mlp"]


def vit(seed: int = 0, depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_vit(depth=depth, embed_dim=32, num_heads=4).eval()


def tied(model: torch.nn.Module, seed: int = 1, **flags):
    """Tied MLP gates (plus the embedding gate) with random, different importances in every block."""
    options = {"heads": False, "depth": False, "embed": True, "tie": ("width",), **flags}
    gates = attach_gates(model, **options)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    return gates


def mlp_widths(model: torch.nn.Module) -> list[int]:
    return [b.mlp.fc1.out_features for b in model.blocks]


def test_tie_specs_group_equal_gates_and_leave_the_rest():
    model = vit()
    gates = attach_gates(model, embed=True, depth=False, tie=("width", "heads"))
    assert gates.tied() == {
        "blocks/0:mlp": MLP,
        "blocks/0:heads": ["blocks/0:heads", "blocks/1:heads", "blocks/2:heads"],
    }
    assert "tie" not in next(s for s in gates.specs if s["name"] == ":embed")  # no partner of its size: untied
    # one learnable ratio per group: the MLP gates hold the very same Parameter, listed once for the optimizer
    assert all(gates.gates[n].ratio is gates.gates[MLP[0]].ratio for n in MLP)
    assert len(gates.arch_parameters()) == 3 and len({id(p) for p in gates.arch_parameters()}) == 3
    # the state_dict keeps one entry per gate (the keys of an untied search), all holding the shared value
    assert sum(k.endswith(":mlp.ratio") for k in model.state_dict()) == 3
    remove_gates(model)
    assert (
        tie_specs(tie_specs(attach_event(model, 0.01).spec["gates"], "width"), ())
        == attach_event(model, 0.01).spec["gates"]
    )


def test_a_shared_ratio_keeps_the_same_count_and_each_block_its_own_units():
    model = vit()
    gates = tied(model)
    with torch.no_grad():
        gates.gates[MLP[1]].ratio.fill_(0.55)  # set through one gate: every tied gate moves
    keep = gates.keep()
    assert len({len(keep[n]) for n in MLP}) == 1 and len(keep[MLP[0]]) == round(0.45 * 64)
    assert keep[MLP[0]] != keep[MLP[1]]  # which units: each block's own importances
    for n in MLP:
        order = gates.gates[n].importance.argsort(descending=True)[: len(keep[n])]
        assert sorted(order.tolist()) == keep[n]


def test_task_and_resource_gradients_reach_the_shared_ratio_summed():
    """Autograd sums every tied gate's gradient into the one ratio; the callback's closed form does the same."""
    model = vit().train()
    gates = tied(model)
    res = ResourceModel.build(model, X)
    ratio = gates.gates[MLP[0]].ratio
    # the straight-through FLOPs count through autograd ...
    res.evaluate(gates, "flops").backward()
    autograd = ratio.grad.clone()
    # ... equals the closed form summed over the tied gates (what on_before_optimizer_step adds)
    _, mask_grad = res.count_and_mask_gradient(gates, "flops")
    per_gate = gates.bank.ratio_gradient(mask_grad)
    distinct = gates.bank.distinct_gradient(per_gate)
    ratios, owner, _ = gates.bank.distinct_ratios()
    assert len(distinct) == len(ratios) == 2 and owner == [0, 1, 1, 1]
    torch.testing.assert_close(distinct[1].to(autograd.dtype), autograd, rtol=1e-6, atol=0)
    torch.testing.assert_close(distinct[1], per_gate[1:].sum())


def test_ignoring_the_tie_would_give_unequal_widths():
    """The same importances and per-gate ratio steps: untied gates end at different widths, tied ones cannot."""
    for tie in ((), ("width",)):
        model = vit()
        gates = tied(model, tie=tie)
        with torch.no_grad():
            for step, n in enumerate(MLP):  # what different per-block gradients would do to separate ratios
                gates.gates[n].ratio.add_(0.1 * (step + 1))
        gates.project_()
        widths = {len(gates.keep()[n]) for n in MLP}
        assert (len(widths) == 1) == bool(tie), (tie, widths)


@pytest.mark.parametrize("target", [0.3, 0.4, 0.5])
def test_fit_to_target_keeps_equal_widths_and_the_export_computes_the_masked_supernet(target):
    model = vit()
    full = count_flops(model, X).total
    gates = tied(model)
    res = ResourceModel.build(model, X)
    assert res.full_flops == full
    fit = fit_architecture(gates, res, target * res.full_flops)
    assert fit.within and len({fit.keep[n] for n in MLP}) == 1
    predicted = float(res.evaluate(gates, "flops", hard=True)), float(res.evaluate(gates, "params", hard=True))
    with torch.no_grad():
        masked = model(X)
    keep = gates.keep()
    export_model(model)
    assert find_gates(model) is None
    assert mlp_widths(model) == [len(keep[MLP[0]])] * 3 and model.embed_dim == len(keep[":embed"])
    exported = count_flops(model, X).total
    assert exported == predicted[0] and count_parameters(model) == predicted[1]  # exact: FlopCounterMode's count
    assert abs(exported / (target * full) - 1) <= 0.05, exported / full
    with torch.no_grad():
        torch.testing.assert_close(model(X), masked, rtol=1e-5, atol=1e-5)


def test_architecture_record_rebuilds_the_tied_export():
    searched = vit()
    gates = tied(searched)
    res = ResourceModel.build(searched, X)
    fit_architecture(gates, res, 0.4 * res.full_flops)
    arch = export_architecture(searched)
    export_model(searched)
    fresh = vit(seed=5)
    build_architecture(fresh, arch)
    assert mlp_widths(fresh) == mlp_widths(searched) and len(set(mlp_widths(fresh))) == 1
    assert count_flops(fresh, X).total == count_flops(searched, X).total


def tied_dms(**kw) -> DifferentiableModelScaling:
    options = dict(target=0.5, embed=True, depth=False, heads=False, tie=("width",), arch_lr=0.05)
    return DifferentiableModelScaling(**{**options, **kw})


class ArchGroupSize(Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sizes.append(len(next(g for g in optimizer.param_groups if g.get(ARCH_GROUP_KEY))["params"]))


def test_trainer_fit_searches_one_mlp_width_and_lands_on_the_target():
    model = vit_classifier(epochs=4)
    full = count_flops(model, X).total
    probe = ArchGroupSize()
    trainer(4, [tied_dms(search_epochs=3), probe]).fit(model, MNIST1DDataModule(batch_size=128, limit_train=1024))
    assert find_gates(model) is None
    log = event_log(model)
    attach, export = (next(e for e in log if e.kind == k) for k in ("dms_attach", "dms_export"))
    assert attach.spec["tie"] == ["width"] and all(
        s.get("tie") == "model/blocks/0:mlp" for s in attach.spec["gates"][1:]
    )
    widths = mlp_widths(model.model)
    assert len(set(widths)) == 1 and widths[0] < 64, widths
    assert abs(count_flops(model, X).total / (0.5 * full) - 1) <= 0.05
    assert export.reason["within_tolerance"] is True
    # the optimizer holds two architecture ratios (embedding, the shared MLP one), not four
    assert probe.sizes[0] == 2 and probe.sizes[-1] == 0
    with torch.no_grad():
        assert model(X).shape == (3, 10)


def run_with_checkpoints(tmp_path, ckpt_path=None, dms=None) -> Classifier:
    model = vit_classifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    run = trainer(4, [dms or tied_dms(search_epochs=2), checkpoint], enable_checkpointing=True)
    run.fit(model, MNIST1DDataModule(batch_size=64, limit_train=256, shuffle=False), ckpt_path=ckpt_path)
    return model


def test_resume_during_search_and_after_export_equals_uninterrupted_run(tmp_path):
    reference = run_with_checkpoints(tmp_path)
    expected = reference.state_dict()
    assert len(set(mlp_widths(reference.model))) == 1
    for ckpt in ("epoch=0.ckpt", "epoch=2.ckpt"):  # during search; after the export at epoch 2
        resumed = run_with_checkpoints(tmp_path / "resumed", ckpt_path=str(tmp_path / ckpt)).state_dict()
        assert list(resumed) == list(expected)
        assert all(torch.equal(resumed[k], expected[k]) for k in expected), ckpt
    # a search-phase checkpoint of a tied search cannot be resumed untied (nor the other way round)
    with pytest.raises(ValueError, match="Resume with the same settings"):
        run_with_checkpoints(tmp_path / "other", str(tmp_path / "epoch=0.ckpt"), tied_dms(search_epochs=2, tie=()))


def test_ddp_two_processes_stay_identical_with_tied_gates(tmp_path):
    model = vit_classifier()
    run = trainer(
        2, [tied_dms(search_epochs=1), HashProbe(str(tmp_path))], devices=2, strategy="ddp_spawn", deterministic=False
    )
    run.fit(model, MNIST1DDataModule(batch_size=32, limit_train=128))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["hash"] == ranks[1]["hash"]
    keep = ranks[0]["events"][1]["spec"]["keep"]
    assert len({len(v) for k, v in keep.items() if k.endswith(":mlp")}) == 1


def test_refused_where_it_cannot_apply_with_the_module_untouched():
    with pytest.raises(ValueError, match="Depth gates cannot be tied"):
        DifferentiableModelScaling(target=0.5, search_epochs=1, tie=("depth",))
    with pytest.raises(ValueError, match="heads=False"):
        DifferentiableModelScaling(target=0.5, search_epochs=1, heads=False, tie="heads")
    # a one-block ViT has no two MLP gates to tie: refused at setup, before the module is touched
    torch.manual_seed(0)
    module = Classifier(make_vit(depth=1, embed_dim=32, num_heads=4), max_epochs=2)
    before = tensor_hash(module)
    with pytest.raises(UnsupportedModelError, match="nothing to tie"):
        quiet_trainer(max_epochs=2, callbacks=[tied_dms(search_epochs=1)]).fit(module, random_loader())
    assert tensor_hash(module) == before and find_gates(module) is None and not event_log(module)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert not any("forward" in m.__dict__ for m in module.modules())
    with pytest.raises(UnsupportedModelError, match="nothing to tie"):
        attach_gates(module.model, heads=False, depth=False, tie="width")
    assert find_gates(module.model) is None and tensor_hash(module) == before


def test_untied_searches_record_and_replay_as_before():
    model = vit()
    event = attach_event(model, 0.01, heads=False, depth=False, embed=True)
    assert "tie" not in event.spec and not any("tie" in s for s in event.spec["gates"])
    gates = attach_gates(model, heads=False, depth=False, embed=True, specs=event.spec["gates"])
    assert gates.tied() == {} and len(gates.arch_parameters()) == 4
    remove_gates(model)
    tied_event = attach_event(model, 0.01, heads=False, depth=False, embed=True, tie="width")
    with pytest.raises(UnsupportedModelError, match="do not match"):  # a tied record needs the tie to re-attach
        attach_gates(model, heads=False, depth=False, embed=True, specs=tied_event.spec["gates"])
    assert find_gates(model) is None
