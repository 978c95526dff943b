"""Pipeline (a) of DMS: the searched architecture as a record, rebuilt from a fresh supernet."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from lightning_depthgrow.adapters import UnsupportedModelError
from lightning_depthgrow.dms import (
    ResourceModel,
    apply_attach,
    apply_export,
    attach_event,
    attach_gates,
    build_architecture,
    export_architecture,
    export_event,
    export_model,
    find_gates,
    fit_to_budget,
    set_importance,
)
from lightning_depthgrow.measure import count_flops


def vit(depth: int = 4, embed_dim: int = 32) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=(1, 40),
        patch_size=(1, 4),
        in_chans=1,
        num_classes=10,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=4,
        mlp_ratio=2.0,
    )


class Wrapper(nn.Module):
    """What a LightningModule looks like to DMS: the network as ``model``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x):
        return self.model(x)


def search_like(model: nn.Module, x: torch.Tensor, target: float, seed: int = 0) -> None:
    gates = attach_gates(model)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, 0.5 if g.kind == "depth" else 0.3))
    res = ResourceModel.build(model, x)
    fit_to_budget(gates, res, target * res.full_flops)


@pytest.mark.parametrize("make,x", [(vit, torch.zeros(2, 1, 1, 40)), (None, torch.zeros(2, 3, 32, 32))])
def test_rebuilt_from_scratch_has_the_exported_architecture_and_flops(make, x):
    if make is None:

        def make():
            return ResNet(BasicBlock, [1, 3, 2, 1], channels=(8, 16, 16, 16), stem_width=8, num_classes=10)

    torch.manual_seed(0)
    searched = make()
    search_like(searched, x, 0.5)
    arch = json.loads(json.dumps(export_architecture(searched)))  # a plain record, JSON round trip
    export_model(searched)
    torch.manual_seed(1)
    fresh = make()
    init = {k: v.clone() for k, v in fresh.state_dict().items()}
    build_architecture(fresh, arch)
    exported, rebuilt = searched.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in rebuilt.items()}
    assert count_flops(fresh, x).total == count_flops(searched, x).total
    assert find_gates(fresh) is None
    # fresh weights (slices of the fresh supernet's), not the searched ones
    name = "head.weight" if "head.weight" in init else "fc.weight"  # not gated, not renumbered
    assert torch.equal(rebuilt[name], init[name]) and not torch.equal(rebuilt[name], exported[name])


def test_architecture_from_the_event_log_of_an_exported_wrapper_rebuilds_a_bare_network():
    torch.manual_seed(0)
    x = torch.zeros(2, 1, 1, 40)
    lit = Wrapper(vit())
    attach = attach_event(lit, lr=0.01)
    apply_attach(lit, attach.spec)
    gates = find_gates(lit)
    set_importance(gates, {n: torch.rand(g.n) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(0.4)
    export = export_event(lit)
    apply_export(lit, export.spec)
    arch = export_architecture(lit, [attach.to_dict(), export])
    assert all(name.startswith("model/") for name in arch["gates"])
    bare = vit()
    build_architecture(bare, arch)
    assert count_flops(bare, x).total == count_flops(lit, x).total
    assert [b.mlp.fc1.out_features for b in bare.blocks] == [b.mlp.fc1.out_features for b in lit.model.blocks]


def test_a_record_of_another_supernet_is_refused_and_the_model_left_alone():
    torch.manual_seed(0)
    searched = vit()
    search_like(searched, torch.zeros(2, 1, 1, 40), 0.5)
    arch = export_architecture(searched)
    other = vit(embed_dim=48)
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(UnsupportedModelError, match="does not fit this model"):
        build_architecture(other, arch)
    assert find_gates(other) is None
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="needs a model with DMS gates"):
        export_architecture(other)
