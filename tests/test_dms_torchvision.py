"""DMS on torchvision's ResNet and VisionTransformer (issue 10 item 3): real classes, tiny configs, random init.

What DMS did on these models before: a torchvision ResNet got only generic depth gates (the 0.5 FLOPs target was
refused: 0.878 of the supernet was the floor); the VisionTransformer got depth gates that the resource model did not
see (its blocks are ``encoder_layer_i``, the model looked for ``encoder.layers.0``), so the search could not go below
1.0, and ``export_model`` renamed the blocks to ``0, 1, ...`` (new state_dict keys) while its count was off by the
dropped blocks. ``count_flops`` saw none of ``nn.MultiheadAttention``'s FLOPs (eval runs its fused fast path).
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from _helpers import ImageClassifier, quiet_trainer, tensor_hash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import UnsupportedModelError, find_block_stacks, load_grown
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    build_architecture,
    export_architecture,
    export_model,
    find_gates,
    fit_architecture,
    set_importance,
)
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops, count_parameters

torchvision = pytest.importorskip("torchvision")
from torchvision.models import VisionTransformer  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

X16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def basic_resnet() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 1, 1], num_classes=10)


def bottleneck_resnet() -> nn.Module:
    # at 16 x 16 pixels much of the FLOPs sits in the ungated conv3/downsample: the gates reach 0.29 at most
    return ResNet(Bottleneck, [3, 1, 1, 1], num_classes=10)


def vit(image_size: int = 16, patch_size: int = 4) -> nn.Module:
    model = VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-inits it: no gradient would reach the blocks
    return model


MAKERS = {"resnet_basic": basic_resnet, "resnet_bottleneck": bottleneck_resnet, "vit": vit}
FLAGS = {"resnet_basic": {}, "resnet_bottleneck": {}, "vit": {"heads": False}}


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Trained-like BatchNorm statistics and affines, so slicing the wrong channel of a norm would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def block_calls(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often every block of every registered stack runs in one eval forward pass."""
    calls: dict[str, int] = {}
    handles = []
    for stack in find_block_stacks(model):
        for i, block in enumerate(stack.blocks):
            name = stack.block_name(i)
            calls[name] = 0
            handles.append(block.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def mask_to(module: nn.Module, keep: dict[str, list[int]]) -> None:
    """Set the attached gates' hard masks to exactly ``keep`` (what an export event recorded)."""
    gates = find_gates(module)
    with torch.no_grad():
        for name, gate in gates.gates.items():
            kept = set(keep[name])
            gate.importance.copy_(
                torch.tensor([2.0 if i in kept else 1.0 for i in range(gate.n)]) + 1e-3 * torch.arange(gate.n)
            )
            gate.ratio.fill_((gate.n - len(kept) + 0.25) / gate.n)
    assert gates.keep() == keep


# ---------------------------------------------------------------- the counter and the gates found
def test_count_flops_counts_multihead_attention_as_the_formula_says():
    """torchvision's ViT runs nn.MultiheadAttention, whose eval fast path FlopCounterMode cannot see: it counted
    1508608 of these 2918656 FLOPs. Every matmul, by hand: patch conv, per block qkv, scores, weighted sum, out
    projection and MLP, then the head."""
    torch.manual_seed(0)
    model = vit(image_size=32, patch_size=8)
    batch, tokens, dim, heads, mlp, layers = 2, 17, 32, 2, 64, 4
    patch = 2 * batch * 16 * dim * (3 * 8 * 8)
    attention = 2 * batch * tokens * dim * 3 * dim + 2 * (2 * batch * heads * tokens * tokens * (dim // heads))
    block = attention + 2 * batch * tokens * dim * dim + 2 * (2 * batch * tokens * dim * mlp)
    expected = patch + layers * block + 2 * batch * dim * 10
    assert torch.backends.mha.get_fastpath_enabled()
    assert count_flops(model, torch.zeros(2, 3, 32, 32)).total == expected == 2918656
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_gates_found_on_torchvision_blocks():
    torch.manual_seed(0)
    names = {k: [(s["name"], s["n"]) for s in attach_gates(MAKERS[k](), **FLAGS[k]).specs] for k in MAKERS}
    assert names["resnet_basic"] == [
        ("layer1/0:conv1", 64), ("layer1/1:conv1", 64), ("layer2/0:conv1", 128), ("layer2/1:conv1", 128),
        ("layer3/0:conv1", 256), ("layer4/0:conv1", 512),
        ("layer1:depth", 2), ("layer2:depth", 1),  # layer2/0 downsamples: its skip is no identity
    ]  # fmt: skip
    assert names["resnet_bottleneck"] == [
        ("layer1/0:conv1", 64), ("layer1/0:conv2", 64), ("layer1/1:conv1", 64), ("layer1/1:conv2", 64),
        ("layer1/2:conv1", 64), ("layer1/2:conv2", 64), ("layer2/0:conv1", 128), ("layer2/0:conv2", 128),
        ("layer3/0:conv1", 256), ("layer3/0:conv2", 256),
        ("layer4/0:conv1", 512), ("layer4/0:conv2", 512),
        ("layer1:depth", 2),  # layer1/0 widens 64 -> 64 * 4 through its downsample
    ]  # fmt: skip
    assert names["vit"] == [(f"encoder/layers/encoder_layer_{i}:mlp", 64) for i in range(4)] + [
        ("encoder/layers:depth", 4)
    ]


def test_vit_heads_are_refused_with_a_message_and_nothing_is_attached():
    torch.manual_seed(0)
    model = vit()
    before = tensor_hash(model)
    with pytest.raises(UnsupportedModelError, match=r"(?s)heads.*MultiheadAttention.*heads=False"):
        attach_gates(model)
    assert find_gates(model) is None and tensor_hash(model) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())

    # the callback refuses at setup, with the module as it was
    module = ImageClassifier(model)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))), batch_size=4)
    trainer = quiet_trainer(max_epochs=2, callbacks=[DifferentiableModelScaling(target=0.5, search_epochs=1)])
    with pytest.raises(UnsupportedModelError, match="heads=False"):
        trainer.fit(module, data)
    assert find_gates(module) is None and not event_log(module) and tensor_hash(model) == before


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ResNet(Bottleneck, [1, 2, 1, 1], groups=4, width_per_group=16), "grouped convolution"),
        (lambda: ResNet(BasicBlock, [1, 2, 1, 1], norm_layer=lambda c: nn.GroupNorm(4, c)), "GroupNorm"),
    ],
    ids=["resnext", "groupnorm"],
)
def test_inner_channels_that_cannot_be_sliced_are_refused(make, message):
    model = make()
    with pytest.raises(UnsupportedModelError, match=rf"(?s){message}.*width=False"):
        attach_gates(model)
    assert find_gates(model) is None
    assert {s["kind"] for s in attach_gates(model, width=False).specs} == {"depth"}  # depth alone still searches


@pytest.mark.slow  # a second interpreter
def test_family_module_never_imports_torchvision():
    """The DMS families load (first use of discovery) without importing torchvision (timm, which imports it, is
    blocked here); the torchvision families are registered and recognise nothing until torchvision is imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["timm"] = None  # timm imports torchvision itself
        import torch
        from lightning_depthgrow.dms import discover_gates, dms_families
        assert discover_gates(torch.nn.Linear(2, 2)) == []
        names = [f.name for f in dms_families()]
        assert "torchvision ResNet block" in names and "torchvision VisionTransformer EncoderBlock" in names, names
        assert "torchvision" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------- export against the masked supernet and the counter
CASES = [("resnet_basic", 0.3), ("resnet_basic", 0.5), ("resnet_bottleneck", 0.5), ("vit", 0.3), ("vit", 0.5)]


@pytest.mark.parametrize("family, target", CASES)
def test_export_equals_the_masked_supernet_and_the_count_equals_flop_counter(family, target):
    torch.manual_seed(0)
    model = MAKERS[family]().eval()
    randomise_norms(model)
    full, params = count_flops(model, X16).total, count_parameters(model)
    gates = attach_gates(model, **FLAGS[family])
    gen = torch.Generator().manual_seed(0)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():  # as a search might leave them: half of every stack's gated blocks and a third of widths
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, 0.5 if g.kind == "depth" else 0.3))
    res = ResourceModel.build(model, X16)
    assert res.full_flops == full and res.full_params == params  # every FLOP FlopCounterMode counts
    fit = fit_architecture(gates, res, target * full)
    assert fit.within
    dropped = {n: g.n - k for n, k in fit.keep.items() if (g := gates.gates[n]).kind == "depth"}
    assert sum(dropped.values()) >= 1  # export removes blocks: the depth factors and the stack keys are exercised
    hard_flops, hard_params = float(res.evaluate(gates, hard=True)), float(res.evaluate(gates, "params", True))
    with torch.no_grad():
        masked = model(X16)
    export_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X16), masked, rtol=1e-5, atol=1e-5)
    exported = count_flops(model, X16).total
    assert abs(exported / hard_flops - 1) <= 0.02 and exported == pytest.approx(hard_flops, rel=1e-9)
    assert count_parameters(model) == hard_params
    assert abs(exported / (target * full) - 1) <= 0.05
    assert set(block_calls(model, X16).values()) == {1}  # every block of the exported model runs, once
    if family == "vit":
        depth = len(model.encoder.layers)
        assert list(model.encoder.layers._modules) == [f"encoder_layer_{i}" for i in range(depth)]


def test_the_floor_the_target_is_checked_against_is_what_export_reaches():
    """Every stage of a ResNet-18 but the first holds one removable block: a one-element depth gate. The floor
    (``ResourceModel.minimum``, which refuses targets below it) counted those blocks as unremovable."""
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10)
    gates = attach_gates(model)
    floor = ResourceModel.build(model, X16).minimum(gates)
    set_importance(gates, {n: torch.rand(g.n) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(g.max_ratio)
    assert [gates.gates[f"layer{i}:depth"].keep_count() for i in (1, 2, 3, 4)] == [1, 0, 0, 0]
    export_model(model)
    assert count_flops(model, X16).total == floor


def test_vit_depth_mask_scales_both_branches_and_a_dropped_block_is_the_identity():
    """The torchvision_vit depth style: ``x + m attn(ln_1(x))``, then ``x + m mlp(ln_2(x))``; at m = 0 the block
    returns its input exactly, at m = 1 what the block computes."""
    torch.manual_seed(0)
    model = vit().eval()
    block = model.encoder.layers.encoder_layer_1
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        plain = block(x)
    gates = attach_gates(model, width=False, heads=False)
    depth = gates.gates["encoder/layers:depth"]
    set_importance(gates, {"encoder/layers:depth": torch.tensor([4.0, 1.0, 3.0, 2.0])})  # block 1 ranks last
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain, rtol=0, atol=0)
        depth.ratio.fill_(0.3)  # drops the lowest-ranked block, encoder_layer_1
        assert depth.keep_count() == 3
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    # in training, a soft mask m scales each branch: check against the formula with the block's own modules
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    gated = block(x)  # with autograd on: the soft masks
    m = gates.masks()[gates.index["encoder/layers:depth"]][1].detach()
    assert 0.01 < float(m) < 0.5
    with torch.no_grad():
        y = block.ln_1(x)
        h = x + m * block.self_attention(y, y, y, need_weights=False)[0]
        mlp = block.mlp
        hidden = mlp[1](mlp[0](block.ln_2(h)))
        expected = h + m * nn.functional.linear(hidden, mlp[3].weight, mlp[3].bias)  # mlp[3]'s own weights
    torch.testing.assert_close(gated.detach(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- inside Trainer.fit
class ExportProbe(pl.Callback):
    """A copy of the LightningModule at the start of epoch ``epoch`` (before or after DMS's export there,
    depending on where it sits in the callback list)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.copy = epoch, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.copy = copy.deepcopy(pl_module, {id(trainer): trainer})


def images(n: int = 32, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    return DataLoader(data, batch_size=8)


@pytest.mark.slow  # two epochs
@pytest.mark.parametrize("family", ["resnet_basic", "vit"])
def test_dms_fit_exports_on_target_and_the_exported_model_is_the_masked_supernet(family, tmp_path):
    torch.manual_seed(0)
    module = ImageClassifier(MAKERS[family]())
    supernet = count_flops(module.model, X16).total
    before, after = ExportProbe(1), ExportProbe(1)
    dms = DifferentiableModelScaling(target=0.5, search_epochs=1, arch_lr=0.05, **FLAGS[family])
    trainer = quiet_trainer(max_epochs=2, callbacks=[before, dms, after], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, images())

    assert [e.kind for e in event_log(module)] == ["dms_attach", "dms_export"]
    export = event_log(module)[-1]
    exported = after.copy.model.eval()
    flops = count_flops(exported, X16).total
    assert export.cost["flops_before"] == supernet
    assert abs(flops / export.cost["flops_after"] - 1) <= 0.02  # the callback's count against FlopCounterMode
    assert abs(flops / (0.5 * supernet) - 1) <= 0.05  # the target, from either side
    assert set(block_calls(exported, X16).values()) == {1}
    # the search ran through these gates: every gate ranked its elements by dL/dm, the resource loss moved the ratios
    assert not any(g.all_equal() for g in find_gates(before.copy).gate_list())
    assert export.reason["searched_ratio"] < 1.0
    # the exported model computes what the gated supernet computed under the exported masks
    masked = before.copy
    mask_to(masked, export.spec["keep"])
    with torch.no_grad():
        torch.testing.assert_close(exported(X16), masked.eval()(X16), rtol=1e-5, atol=1e-5)
    if family == "vit":
        depth = len(module.model.encoder.layers)
        assert depth < 4 and list(module.model.encoder.layers._modules) == [f"encoder_layer_{i}" for i in range(depth)]

    # nothing left on the module; it pickles
    assert find_gates(module) is None
    assert not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in module.modules())
    twin = pickle.loads(pickle.dumps(module)).eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 16, 16)
        assert torch.equal(twin(x), module.eval()(x))

    # the architecture record (from the event log of the wrapper) rebuilds a fresh bare network with the same shapes
    arch = json.loads(json.dumps(export_architecture(module, event_log(module))))
    torch.manual_seed(1)
    fresh = MAKERS[family]()
    build_architecture(fresh, arch)
    shapes = {k: v.shape for k, v in module.model.state_dict().items()}
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    assert count_flops(fresh, X16).total == count_flops(module.model, X16).total
    fresh.load_state_dict(module.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), module.model(x))

    # load_grown replays the search's events on a freshly built supernet and loads the weights
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    torch.manual_seed(2)
    loaded = load_grown(MAKERS[family](), tmp_path / "end.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module.model(x))
