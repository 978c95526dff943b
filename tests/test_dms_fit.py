"""DMS export lands on its target: depth and width chosen jointly, measured by torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    export_model,
    fit_architecture,
    fit_to_budget,
    set_importance,
)
from lightning_depthgrow.measure import count_flops, count_parameters


def small_vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=(1, 40),
        patch_size=(1, 4),
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
    )


def small_resnet() -> nn.Module:
    return ResNet(Bottleneck, [2, 3, 2, 3], channels=(32, 64, 64, 64), stem_type="deep", stem_width=8, num_classes=10)


def searched(model: nn.Module, width_ratio: float, depth_ratio: float, seed: int = 0):
    """Gates as a search might leave them: ranked importances, widths and depth pruned as given."""
    gates = attach_gates(model)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, depth_ratio if g.kind == "depth" else width_ratio))
    return gates


CASES = {
    "vit": (small_vit, torch.zeros(2, 1, 1, 40)),
    "resnet": (small_resnet, torch.zeros(2, 3, 32, 32)),
}


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("target", [0.3, 0.4, 0.5, 0.7])
@pytest.mark.parametrize("start", ["below", "above"])
def test_export_lands_within_five_percent_of_the_flops_target(family, target, start):
    """Whether the search stopped below the target (too many blocks dropped) or above it, the exported
    model's FLOPs, counted by FlopCounterMode, are within 5% of target x the supernet's."""
    make, x = CASES[family]
    torch.manual_seed(0)
    model = make().eval()
    full = count_flops(model, x).total
    # below: half the blocks and a third of the widths gone; above: nothing pruned but 10% of widths
    gates = searched(model, 0.35, 0.55) if start == "below" else searched(model, 0.1, 0.0)
    res = ResourceModel.build(model, x)
    before = float(res.evaluate(gates, hard=True)) / res.full_flops
    if target < res.minimum(gates) / res.full_flops:
        pytest.skip("below what the gates can reach")
    assert abs(before - target) > 0.05 * target or start == "above"  # the fit has work to do
    fit = fit_architecture(gates, res, target * res.full_flops)
    assert fit.within
    with torch.no_grad():
        y_masked = model(x)
    export_model(model)
    exported = count_flops(model, x).total
    assert abs(exported / (target * full) - 1) <= 0.05, (exported / full, target)
    assert exported == pytest.approx(fit.value, rel=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_masked, rtol=1e-5, atol=1e-5)


def test_fit_prefers_the_searched_depth_and_keeps_relative_widths():
    torch.manual_seed(0)
    model = small_vit()
    x = torch.zeros(2, 1, 1, 40)
    gates = searched(model, 0.35, 0.55)  # 2 of 4 blocks
    res = ResourceModel.build(model, x)
    widths = {n: g.keep_count() for n, g in gates.gates.items() if g.kind == "width"}
    fit = fit_architecture(gates, res, 0.45 * res.full_flops)
    assert fit.within and fit.depth_changed == 0  # widths can fill 0.45 on two blocks
    assert fit.keep["blocks:depth"] == 2
    scale = [fit.keep[n] / k for n, k in widths.items()]
    assert max(scale) - min(scale) < 0.05 and min(scale) > 1  # width given back, in the searched proportions
    # 0.75 cannot be reached on two blocks (their widths max out): a block comes back
    fit = fit_architecture(gates, res, 0.75 * res.full_flops)
    assert fit.within and fit.keep["blocks:depth"] >= 3


def test_fit_on_params_and_an_unreachable_budget_warns_with_the_ratio():
    torch.manual_seed(0)
    model = small_vit()
    gates = searched(model, 0.2, 0.3)
    res = ResourceModel.build(model, torch.zeros(2, 1, 1, 40))
    fit = fit_architecture(gates, res, 0.5 * res.full_params, "params")
    assert fit.within
    export_model(model)
    assert abs(count_parameters(model) / (0.5 * res.full_params) - 1) <= 0.05

    model = small_vit()
    gates = searched(model, 0.2, 0.3)
    res = ResourceModel.build(model, torch.zeros(2, 1, 1, 40))
    floor = res.minimum(gates)
    with pytest.warns(UserWarning, match=r"off the budget"):
        fit_to_budget(gates, res, 0.5 * floor)
    assert float(res.evaluate(gates, hard=True)) == pytest.approx(floor)  # the closest it can get
