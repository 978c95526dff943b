"""DMS's embedding-width gate (``embed=True``) on real timm VisionTransformers: the masked supernet computes what the
sliced export computes, export lands on the FLOPs target, the architecture record rebuilds, a Trainer fit runs,
unsupported variants are refused with the model untouched."""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from _helpers import Classifier, make_vit, quiet_trainer, random_loader, tensor_hash
from timm.layers import PatchEmbed, SwiGLU
from torch import nn

from lightning_depthgrow import UnsupportedModelError
from lightning_depthgrow.callbacks import DifferentiableModelScaling
from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    build_architecture,
    export_architecture,
    export_model,
    find_gates,
    fit_architecture,
    remove_gates,
    set_importance,
)
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops, count_parameters

X = torch.randn(3, 1, 1, 40, generator=torch.Generator().manual_seed(0))

# variants the embedding gate handles: every one has a norm, token, pooling or LayerScale path of its own
VARIANTS = {
    "plain": {},
    "avg_fc_norm": {"global_pool": "avg", "fc_norm": True},
    "reg_layerscale_no_embed_class": {"reg_tokens": 2, "init_values": 0.1, "no_embed_class": True},
    "pre_norm_no_cls": {"pre_norm": True, "class_token": False, "global_pool": "avg"},
    "patch_norm_swiglu_qknorm": {"qk_norm": True},  # + a LayerNorm in the patch embedding and SwiGLU (below)
}


def vit(variant: str = "plain", seed: int = 0, **extra) -> nn.Module:
    options = dict(VARIANTS[variant], **extra)
    if variant == "patch_norm_swiglu_qknorm":
        options["embed_layer"] = partial(PatchEmbed, norm_layer=nn.LayerNorm)
        options["mlp_layer"] = SwiGLU
    torch.manual_seed(seed)
    return make_vit(depth=3, embed_dim=32, num_heads=4, **options).eval()


def randomise(model: nn.Module, ratio: float, depth_ratio: float = 0.0, seed: int = 1):
    """Gates as a search might leave them: random importances, every gate at ``ratio`` (depth at ``depth_ratio``)."""
    gates = attach_gates(model, embed=True)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, depth_ratio if g.kind == "depth" else ratio))
    return gates


def test_discovery_is_opt_in_and_one_model_level_width_gate():
    model = vit()
    from lightning_depthgrow.dms import discover_gates

    assert not any(s["site"] == "vit_embed" for s in discover_gates(model))
    specs = discover_gates(model, embed=True)
    embed = [s for s in specs if s["site"] == "vit_embed"]
    assert embed == [{"name": ":embed", "kind": "width", "site": "vit_embed", "block": "", "n": 32, "min_keep": 1}]
    wrapped = [s["name"] for s in discover_gates(Classifier(vit()), embed=True) if s["site"] == "vit_embed"]
    assert wrapped == ["model:embed"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hard_masked_supernet_computes_what_the_export_computes(variant):
    model = vit(variant)
    gates = randomise(model, 0.4, depth_ratio=0.3)
    keep = gates.keep()
    assert 0 < len(keep[":embed"]) < 32
    with torch.no_grad():
        masked = model(X)
    res = ResourceModel.build(model, X)
    predicted = float(res.evaluate(gates, "flops", hard=True)), float(res.evaluate(gates, "params", hard=True))
    export_model(model)
    assert find_gates(model) is None
    assert model.embed_dim == len(keep[":embed"]) and model.patch_embed.proj.out_channels == model.embed_dim
    blocks = list(model.blocks)
    assert blocks and all(b.attn.head_dim == 8 for b in blocks)  # the head geometry is not the embedding's
    assert all(b.attn.qkv.in_features == model.embed_dim == b.mlp.fc2.out_features for b in blocks)
    with torch.no_grad():
        sliced = model(X)
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    # the resource model counted the sliced model exactly
    assert count_flops(model, X).total == predicted[0]
    assert count_parameters(model) == predicted[1]


def test_masked_channels_stay_zero_in_the_residual_stream():
    model = vit("reg_layerscale_no_embed_class")
    gates = randomise(model, 0.5)
    dropped = [i for i in range(32) if i not in gates.keep()[":embed"]]
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(X)
    assert len(seen) == 3 and all(bool((out[..., dropped] == 0).all()) for out in seen)


def test_soft_masks_train_the_embedding_gate():
    """In training the embedding mask is soft and receives a gradient from every use (stream, branches, norms)."""
    model = vit().train()
    gates = attach_gates(model, embed=True)
    model(X).square().mean().backward()
    pending = gates.gates[":embed"].take_pending()
    assert pending.shape == (32,) and bool(pending.abs().gt(0).all())


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_export_lands_within_five_percent_of_the_flops_target(target):
    model = vit()
    full = count_flops(model, X).total
    gates = randomise(model, 0.2)
    res = ResourceModel.build(model, X)
    fit = fit_architecture(gates, res, target * res.full_flops)
    assert fit.within
    with torch.no_grad():
        masked = model(X)
    keep = gates.keep()
    export_model(model)
    assert model.embed_dim == len(keep[":embed"]) < 32  # the embedding width was cut
    exported = count_flops(model, X).total
    assert abs(exported / (target * full) - 1) <= 0.05, exported / full
    with torch.no_grad():
        torch.testing.assert_close(model(X), masked, rtol=1e-5, atol=1e-5)


def test_architecture_record_rebuilds_the_same_model():
    searched = vit()
    randomise(searched, 0.45, depth_ratio=0.3)
    arch = export_architecture(searched)
    assert arch["flags"] == {"width": True, "heads": True, "depth": True, "embed": True}
    export_model(searched)
    fresh = vit(seed=5)
    build_architecture(fresh, arch)
    assert count_flops(fresh, X).total == count_flops(searched, X).total
    assert count_parameters(fresh) == count_parameters(searched)
    assert fresh.embed_dim == searched.embed_dim and len(fresh.blocks) == len(searched.blocks)
    assert [b.mlp.fc1.out_features for b in fresh.blocks] == [b.mlp.fc1.out_features for b in searched.blocks]
    # a record taken on a LightningModule wrapper rebuilds a bare network (gate "model:embed" -> ":embed")
    wrapper = Classifier(vit())
    randomise(wrapper, 0.45)
    record = export_architecture(wrapper)
    assert "model:embed" in record["gates"]
    bare = vit(seed=6)
    build_architecture(bare, record)
    assert bare.embed_dim == record["summary"]["model:embed"]


def test_dms_fit_with_the_embedding_gate_runs_and_exports():
    torch.manual_seed(0)
    module = Classifier(make_vit(depth=2, embed_dim=32, num_heads=4), max_epochs=3)
    full = count_flops(module.model, X).total
    dms = DifferentiableModelScaling(target=0.5, search_epochs=2, embed=True, arch_lr=0.05)
    trainer = quiet_trainer(max_epochs=3, callbacks=[dms], limit_val_batches=0)
    trainer.fit(module, random_loader(n=128, batch_size=16))
    assert find_gates(module) is None
    log = event_log(module)
    attach = next(e for e in log if e.kind == "dms_attach")
    assert attach.spec["embed"] is True
    arch = export_architecture(module, log)
    assert module.model.embed_dim == arch["summary"]["model:embed"]
    assert abs(count_flops(module.model, X).total / (0.5 * full) - 1) <= 0.05
    fresh = make_vit(depth=2, embed_dim=32, num_heads=4)
    build_architecture(fresh, arch)
    assert count_flops(fresh, X).total == count_flops(module.model, X).total
    with torch.no_grad():
        assert module.model(X).shape == (3, 10)


REFUSED = {
    "attention_pool": {"global_pool": "map"},
    "rms_norm": {"norm_layer": "rmsnorm"},
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_variants_are_refused_with_the_model_untouched(case):
    torch.manual_seed(0)
    model = make_vit(depth=2, embed_dim=32, num_heads=4, **REFUSED[case])
    before = tensor_hash(model)
    modules = [type(m) for m in model.modules()]
    with pytest.raises(UnsupportedModelError, match="embed=False"):
        attach_gates(model, embed=True)
    assert tensor_hash(model) == before and [type(m) for m in model.modules()] == modules
    assert find_gates(model) is None and not any("forward" in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    attach_gates(model)  # the other gates still attach
    remove_gates(model)


def test_embed_on_a_model_without_a_vision_transformer_is_refused():
    model = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(UnsupportedModelError, match="embed=False"):
        attach_gates(model, embed=True)
    assert find_gates(model) is None


def test_remove_gates_restores_the_model():
    model = vit("avg_fc_norm")
    with torch.no_grad():
        before = model(X)
    randomise(model, 0.5)
    remove_gates(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(X), before, rtol=0, atol=0)
