"""DMS core without Lightning: top-k masks, importance EMA, gates, resource counts, export."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import make_vit
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from lightning_depthgrow.adapters import UnsupportedModelError
from lightning_depthgrow.dms import (
    GateBank,
    ResourceModel,
    TopKGate,
    apply_attach,
    apply_export,
    attach_event,
    attach_gates,
    export_event,
    export_model,
    find_gates,
    fit_to_budget,
    normalised_rank,
    remove_gates,
    set_importance,
    update_importance,
)
from lightning_depthgrow.measure import count_flops, count_parameters
from lightning_depthgrow.surgery.optim import update_optimizer


def tiny_vit(depth: int = 3, **kw) -> nn.Module:
    return make_vit(depth=depth, embed_dim=32, num_heads=4, **kw)


def tiny_resnet(block: type) -> nn.Module:
    net = ResNet(block, [1, 2, 1, 3], channels=(8, 16, 16, 16), stem_width=8, num_classes=10, zero_init_last=False)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        net(torch.randn(4, 3, 32, 32))
    return net


def randomise(gates, ratio: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {name: torch.rand(g.n, generator=gen) for name, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(ratio, g.max_ratio))


def test_normalised_rank_is_uniform_and_breaks_ties_by_index():
    c = torch.tensor([0.5, 0.1, 0.5, 0.0])
    assert normalised_rank(c).tolist() == [0.625, 0.375, 0.875, 0.125]


@pytest.mark.parametrize("n", [1, 3, 7, 64])
def test_hard_mask_keeps_round_of_keep_ratio_and_agrees_with_soft_mask(n):
    gate = TopKGate(n, "width", min_keep=0)
    set_importance_one(gate, torch.rand(n) + 0.1)
    for a in torch.linspace(0, 1, 41).tolist():
        with torch.no_grad():
            gate.ratio.fill_(a)
        a_eff = float(gate.ratio_value())
        hard = gate.hard_mask()
        assert hard.sum() == round((1 - a_eff) * n + 1e-9) or abs((1 - a_eff) * n % 1 - 0.5) < 1e-6
        assert torch.equal(hard.bool(), gate.soft_mask() >= 0.5)
        kept = hard.bool()
        if kept.any() and (~kept).any():  # the kept ones are the most important
            assert gate.importance[kept].min() >= gate.importance[~kept].max()


def set_importance_one(gate: TopKGate, value: torch.Tensor) -> None:
    with torch.no_grad():
        gate.importance.copy_(value)


def test_mask_is_all_ones_while_importances_are_equal_yet_ratio_gets_gradient():
    gate = TopKGate(5, "heads").train()
    with torch.no_grad():
        gate.ratio.fill_(0.6)
    m = gate.mask()
    assert torch.equal(m.detach(), torch.ones(5))
    m.sum().backward()
    assert gate.ratio.grad is not None and gate.ratio.grad < 0
    assert gate.temperature == 20.0 and TopKGate(5, "width").temperature == 5.0


def test_importance_is_ema_of_squared_taylor_score_unscaled_and_skips_non_finite():
    gate = TopKGate(4, "width").train()
    set_importance_one(gate, torch.tensor([0.4, 0.1, 0.3, 0.2]))
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5])
    m = gate.mask()
    (1024.0 * (m * weights).sum() ** 2).backward()  # a loss scaled by an AMP-like factor of 1024
    m_value = m.detach()
    grad = 2 * (m_value * weights).sum() * weights  # dL/dm of the unscaled loss
    expected = 0.99 * torch.tensor([0.4, 0.1, 0.3, 0.2]) + 0.01 * (m_value * grad) ** 2
    assert update_importance([gate], scale=1024.0)
    torch.testing.assert_close(gate.importance, expected)
    before = gate.importance.clone()
    (gate.mask() * float("inf")).sum().backward()
    assert not update_importance([gate])
    assert torch.equal(gate.importance, before)


def test_reduce_hook_sees_the_gradients_of_all_gates():
    a, b = TopKGate(2, "width").train(), TopKGate(3, "depth").train()
    (a.mask().sum() + 2 * b.mask().sum()).backward()
    seen = []
    update_importance([a, b], reduce=lambda t: seen.append(t.clone()) or t * 0 + 1.0)
    assert torch.equal(seen[0], torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(b.importance, torch.full((3,), 0.01))


def test_vit_gates_found_and_removable_without_changing_outputs_or_keys():
    vit = tiny_vit().eval()
    x = torch.randn(2, 1, 1, 40)
    keys, y = list(vit.state_dict()), vit(x)
    gates = attach_gates(vit)
    assert sorted(gates.gates) == sorted(
        [f"blocks/{i}:{k}" for i in range(3) for k in ("heads", "mlp")] + ["blocks:depth"]
    )
    assert torch.equal(vit(x), y)  # all-ones masks at the start
    copied = copy.deepcopy(vit)  # hooks of a copy use the copy's gates
    randomise(find_gates(copied), 0.5)
    assert not torch.equal(copied(x), y) and torch.equal(vit(x), y)
    remove_gates(vit)
    assert list(vit.state_dict()) == keys and torch.equal(vit(x), y)


@pytest.mark.parametrize("family", ["vit", "vit_layerscale", "basic", "bottleneck"])
def test_export_equals_hard_masked_model_and_resource_model_matches_flop_counter(family):
    torch.manual_seed(0)
    if family.startswith("vit"):
        model = tiny_vit(init_values=0.1 if family == "vit_layerscale" else None)
        x = torch.randn(3, 1, 1, 40)
    else:
        model = tiny_resnet(BasicBlock if family == "basic" else Bottleneck)
        x = torch.randn(3, 3, 32, 32)
    flops_full, params_full = count_flops(model, x).total, count_parameters(model)
    gates = attach_gates(model)
    res = ResourceModel.build(model, x)
    assert abs(res.full_flops - flops_full) <= 0.02 * flops_full
    assert res.full_params == params_full
    randomise(gates, 0.45)
    model.eval()
    with torch.no_grad():
        y_hard = model(x)
    hard_flops, hard_params = float(res.evaluate(gates, "flops", hard=True)), float(res.evaluate(gates, "params", True))
    assert hard_flops < 0.95 * flops_full  # something was really pruned
    export_model(model)
    assert find_gates(model) is None
    assert not any(h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_hard, rtol=1e-5, atol=1e-5)
    exported = count_flops(model, x).total
    assert abs(exported - hard_flops) <= 0.02 * exported
    assert count_parameters(model) == hard_params


def test_straight_through_resource_has_hard_value_and_soft_gradient():
    model = tiny_vit()
    x = torch.randn(1, 1, 1, 40)
    gates = attach_gates(model)
    res = ResourceModel.build(model, x)
    randomise(gates, 0.3)
    with torch.no_grad():  # keep every block: a removed block's widths cost nothing (hard factor 0)
        gates.gates["blocks:depth"].ratio.zero_()
    soft = res.evaluate(gates, "flops")
    assert float(soft) == float(res.evaluate(gates, "flops", hard=True))
    soft.backward()
    assert all(g.ratio.grad is not None and g.ratio.grad < 0 for g in gates.gate_list())


def test_optimizer_state_after_export_is_the_sliced_state_before():
    torch.manual_seed(0)
    model = tiny_vit()
    x, y = torch.randn(8, 1, 1, 40), torch.randint(0, 10, (8,))
    gates = attach_gates(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    randomise(gates, 0.5)
    with torch.no_grad():
        gates.gates["blocks:depth"].ratio.fill_(0.3)  # drop exactly one block ...
    assert gates.keep()["blocks:depth"] == [1, 2]  # ... block 0 (so blocks[0] below is the old block 1)
    fc1 = model.blocks[1].mlp.fc1.weight
    dropped = list(model.blocks[0].parameters())
    qkv = model.blocks[1].attn.qkv.weight
    before = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in (fc1, qkv)}
    keep = gates.keep()
    change = export_model(model, keep)
    update_optimizer(opt, change, model)
    mlp_keep = torch.tensor(keep["blocks/1:mlp"])
    new_fc1 = model.blocks[0].mlp.fc1.weight
    torch.testing.assert_close(opt.state[new_fc1]["exp_avg"], before[id(fc1)]["exp_avg"][mlp_keep])
    torch.testing.assert_close(opt.state[new_fc1]["exp_avg_sq"], before[id(fc1)]["exp_avg_sq"][mlp_keep])
    assert float(opt.state[new_fc1]["step"]) == float(before[id(fc1)]["step"])
    heads = keep["blocks/1:heads"]
    rows = torch.tensor([s * 32 + h * 8 + d for s in range(3) for h in heads for d in range(8)])
    torch.testing.assert_close(opt.state[model.blocks[0].attn.qkv.weight]["exp_avg"], before[id(qkv)]["exp_avg"][rows])
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for g in opt.param_groups for p in g["params"])
    assert all(p not in opt.state for p in dropped + gates.arch_parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # the sliced optimizer steps the smaller model


def test_events_replay_on_a_fresh_model_gives_identical_state_dict():
    torch.manual_seed(0)
    model = tiny_vit()
    base = copy.deepcopy(model)
    attach = attach_event(model, lr=0.01)
    change = apply_attach(model, attach.spec)
    assert change.new_group[1] == {"lr": 0.01, "weight_decay": 0.0, "dms_architecture": True}
    randomise(find_gates(model), 0.5)
    export = export_event(model)
    apply_export(model, export.spec)
    replay = copy.deepcopy(base)
    apply_attach(replay, attach.spec)  # fresh gates: all-equal importances, so keep comes from the event
    apply_export(replay, export.spec)
    state, replayed = model.state_dict(), replay.state_dict()
    assert list(state) == list(replayed)
    assert all(torch.equal(state[k], replayed[k]) for k in state)


def test_fit_to_budget_lands_near_the_budget_by_moving_width_first():
    model = tiny_vit()
    gates = attach_gates(model)
    res = ResourceModel.build(model, torch.zeros(1, 1, 1, 40))
    randomise(gates, 0.2)
    depth = {n: g.keep_count() for n, g in gates.gates.items() if g.kind != "width"}
    budget = 0.5 * res.full_flops
    changed = fit_to_budget(gates, res, budget)
    assert changed > 0 and abs(float(res.evaluate(gates, hard=True)) / budget - 1) <= 0.05
    assert {n: g.keep_count() for n, g in gates.gates.items() if g.kind != "width"} == depth


def test_nothing_gateable_and_tied_dimensions_raise_clear_errors():
    plain = nn.Module()
    plain.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"nothing to gate.*Linear"):
        attach_gates(plain)
    vit = tiny_vit()
    vit.blocks[0].mlp.norm = nn.LayerNorm(64)
    with pytest.raises(UnsupportedModelError, match=r"MLP hidden units.*tied"):
        attach_gates(vit)
    assert find_gates(vit) is None  # nothing attached on failure
    grouped = ResNet(Bottleneck, [1, 2, 1, 1], channels=(8, 8, 8, 8), stem_width=8, cardinality=2, base_width=8)
    with pytest.raises(UnsupportedModelError, match="grouped convolution"):
        attach_gates(grouped)
    attach_gates(grouped, width=False)  # depth only is fine


def test_export_rejects_bad_keep_without_touching_the_model():
    model = tiny_vit()
    gates = attach_gates(model)
    keep = gates.keep()
    keep["blocks/0:mlp"] = [5, 2]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="sorted unique"):
        export_model(model, keep)
    assert find_gates(model) is gates
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(v.nan_to_num(), after[k].nan_to_num()) for k, v in state.items())


@pytest.mark.parametrize("layerscale", [False, True])
def test_folded_vit_masks_equal_activation_masking_in_output_and_dl_dm(layerscale):
    """Masks folded into fc2/proj weights give the output and dL/dm of masking the activations themselves."""
    torch.manual_seed(0)
    model = tiny_vit(**({"init_values": 0.5} if layerscale else {})).train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 1, 40), torch.randint(0, 10, (4,))
    gates = attach_gates(model)
    randomise(gates, 0.4)
    with torch.no_grad():
        gates.gates["blocks:depth"].ratio.fill_(0.3)  # soft depth masks strictly between 0 and 1
    masks = {name: m.detach().clone().requires_grad_() for name, m in zip(gates.gates, gates.masks())}
    for i, block in enumerate(reference.blocks):
        heads, mlp, depth = masks[f"blocks/{i}:heads"], masks[f"blocks/{i}:mlp"], masks["blocks:depth"]
        head_dim = block.attn.head_dim
        block.attn.proj.register_forward_pre_hook(lambda m, a, h=heads, d=head_dim: (a[0] * h.repeat_interleave(d),))
        block.mlp.fc2.register_forward_pre_hook(lambda m, a, w=mlp: (a[0] * w,))
        for branch in (block.ls1, block.ls2):
            branch.register_forward_hook(lambda m, a, out, d=depth, j=i: out * d[j])
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    expected = reference(x)
    torch.testing.assert_close(out, expected)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(expected, y).backward()
    for name, gate in gates.gates.items():
        torch.testing.assert_close(gate.take_pending(), masks[name].grad, msg=name)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight.grad, reference.blocks[1].mlp.fc2.weight.grad)


def test_gate_bank_equals_each_gate_alone():
    """One flat computation over many gates gives every gate's own soft, hard and straight-through mask."""
    gen = torch.Generator().manual_seed(0)
    gates = [TopKGate(n, kind) for n, kind in [(6, "width"), (1, "depth"), (4, "heads"), (9, "width")]]
    for g, a in zip(gates, [0.3, 0.5, 0.6, 0.05]):
        with torch.no_grad():
            g.ratio.fill_(a)
    gates[0].importance.copy_(torch.rand(6, generator=gen))
    gates[2].importance.copy_(torch.tensor([0.2, 0.2, 0.1, 0.3]))  # ties broken by index; gate 3 stays all-equal
    bank = GateBank(gates)
    for g, soft, hard in zip(gates, bank.soft().split(bank.sizes), bank.hard().split(bank.sizes)):
        rank = normalised_rank(g.importance)
        expected = torch.sigmoid(g.temperature * (rank - g.ratio.clamp(0, g.max_ratio)))
        if g.importance.max() == g.importance.min() and (g.n > 1 or g.importance[0] == 0):
            expected, hard_expected = torch.ones(g.n), torch.ones(g.n)
        else:
            hard_expected = (rank >= g.ratio.clamp(0, g.max_ratio)).float()
        torch.testing.assert_close(soft.detach(), expected)
        assert torch.equal(hard, hard_expected) and torch.equal(g.hard_mask(), hard_expected)
    assert torch.equal(bank.straight_through().detach(), bank.hard())
