"""torchvision, torch.nn and timm families, and the checks behind every accepted family: a block whose
zeroed copy is not an identity (timm ResNet with SiLU/GELU/LeakyReLU, post-LayerNorm nn.Transformer layers) is
refused with a message naming the fix; a verified insertion that changes the outputs is undone; check_growable
leaves the model untouched; a model without block structure is said to have none."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from lightning_depthgrow import ArchitectureEvent, apply_event, find_block_stacks, register_block
from lightning_depthgrow.adapters import UnsupportedModelError, no_block_structure_message, unregister_block
from lightning_depthgrow.surgery.growth import (
    FunctionNotPreservedError,
    check_growable,
    insert_identity_block,
    verify_insertions,
)
from tests._helpers import tensor_hash

torchvision = pytest.importorskip("torchvision")

torch.set_num_threads(1)


def eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def tv_vit():
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )


def test_torchvision_vit_grows_with_its_named_encoder_layers_and_every_block_runs():
    torch.manual_seed(0)
    model = tv_vit()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: no gradient would reach the blocks
    (stack,) = find_block_stacks(model)
    assert stack.path == "encoder.layers" and stack.block_name(1) == "encoder.layers.encoder_layer_1"
    x = torch.randn(2, 3, 16, 16)
    before = eval_out(model, x)
    insert_identity_block(model, "encoder.layers", 0, seed=0, check_input=x)
    insert_identity_block(model, "encoder.layers", 2, seed=1, check_input=x)
    assert list(model.encoder.layers._modules) == [f"encoder_layer_{i}" for i in range(4)]
    assert torch.equal(eval_out(model, x), before)
    # The new blocks train: a step moves the outputs.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    assert model.encoder.layers.encoder_layer_1.mlp[3].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(eval_out(model, x), before)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_growth_preserves_outputs(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    # Train-mode BatchNorm statistics move the running stats away from 0/1, as in a trained model.
    model.train()
    with torch.no_grad():
        model(x)
    before = eval_out(model, x)
    depth = len(model.layer3)
    for path in ("layer1", "layer3"):
        insert_identity_block(model, path, 0, seed=0, check_input=x)
    assert len(model.layer3) == depth + 1
    assert (eval_out(model, x) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("act", ["silu", "gelu", "leaky_relu"])
def test_timm_resnet_with_a_non_relu_activation_is_refused_untouched(act):
    # Issue 9.2: the block computes act(x + f(x)); with f zeroed that is act(x), not x.
    model = timm.create_model("resnet18", act_layer=act, num_classes=4, pretrained=False)
    digest = tensor_hash(model)
    assert all(s.growable_positions() == [] for s in find_block_stacks(model))
    with pytest.raises(UnsupportedModelError, match=r"after its residual add.*ramp"):
        insert_identity_block(model, "layer2", 0, seed=0)
    with pytest.raises(UnsupportedModelError, match="can grow"):
        check_growable(model, torch.randn(1, 3, 32, 32))
    assert tensor_hash(model) == digest and len(model.layer2) == 2


def test_timm_resnet_with_relu_still_grows_and_passes_the_check():
    model = timm.create_model("resnet18", num_classes=4, pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    assert set(check_growable(model, x).values()) == {None}
    insert_identity_block(model, "layer2", 0, seed=0, check_input=x)


def test_forced_zero_init_on_a_silu_resnet_is_caught_by_the_verified_insertion():
    # The general mechanism: a user adapter without the structural refusal is still checked on a real input.
    from timm.models.resnet import BasicBlock, Bottleneck

    model = timm.create_model("resnet18", act_layer="silu", num_classes=4, pretrained=False)
    register_block((BasicBlock, Bottleneck), zero_init=["bn2"], is_shape_preserving=lambda b: b.downsample is None)
    try:
        digest = tensor_hash(model)
        with pytest.raises(FunctionNotPreservedError, match=r"not an identity.*moved by up to"):
            insert_identity_block(model, "layer2", 0, seed=0, template_index=1, check_input=torch.randn(2, 3, 32, 32))
        assert tensor_hash(model) == digest and len(model.layer2) == 2
    finally:
        unregister_block((BasicBlock, Bottleneck))


def encoder(norm_first):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_pre_ln_nn_transformer_grows_and_keeps_num_layers():
    torch.manual_seed(1)  # not the insertion's seed, else the fresh weights would equal the constructed ones
    model = encoder(norm_first=True)
    x = torch.randn(2, 5, 16)
    before = eval_out(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MultiheadAttention's in_proj is re-initialised, not copied
        insert_identity_block(model, "layers", 1, seed=0, check_input=x)
    assert model.num_layers == len(model.layers) == 3
    assert torch.equal(eval_out(model, x), before)


def test_post_ln_nn_transformer_is_found_but_growth_is_refused_with_the_fix():
    model = encoder(norm_first=False)
    assert [(s.path, len(s)) for s in find_block_stacks(model)] == [("layers", 2)]
    digest = tensor_hash(model)
    with pytest.raises(UnsupportedModelError, match=r"post-LayerNorm.*computes LN\(x\).*ramp.*norm_first=True"):
        insert_identity_block(model, "layers", 0, seed=0)
    assert tensor_hash(model) == digest and model.num_layers == 2


class PostLNBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(PostLNBlock(), PostLNBlock())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_user_registered_post_ln_block_is_refused_by_verification_through_events_and_untouched():
    register_block(PostLNBlock, zero_init=["fc"])
    try:
        torch.manual_seed(0)
        model = Net()
        with torch.no_grad():
            for block in model.blocks:
                block.norm.weight.mul_(3.0)  # trained norms: LN(x) is far from x
        x = torch.randn(4, 8)
        digest = tensor_hash(model)
        event = ArchitectureEvent("insert_block", {"stack": "blocks", "index": 0, "seed": 0})
        with pytest.raises(FunctionNotPreservedError, match="not an identity"), verify_insertions(x):
            apply_event(model, event)
        assert tensor_hash(model) == digest and len(model.blocks) == 2
        with pytest.raises(UnsupportedModelError, match="can grow"):
            check_growable(model, x)
        assert tensor_hash(model) == digest and len(model.blocks) == 2
    finally:
        unregister_block(PostLNBlock)


def test_check_growable_leaves_the_model_exactly_as_it_was():
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, pretrained=False)
    model.train()
    digest, info = tensor_hash(model), [dict(e) for e in model.feature_info]
    assert check_growable(model, torch.randn(2, 3, 16, 16)) == {"blocks": None}
    assert tensor_hash(model) == digest and len(model.blocks) == 2 and model.feature_info == info
    assert all(m.training for m in model.modules())


def test_model_without_block_structure_is_named_as_such():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_block_stacks(model) == []
    message = no_block_structure_message(model)
    assert "No stack of registered residual blocks found in Sequential" in message
    assert "register_block" in message
    with pytest.raises(UnsupportedModelError, match="No stack of registered residual blocks"):
        check_growable(model)


def test_a_diverged_model_is_not_grown():
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, pretrained=False)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FunctionNotPreservedError, match="not finite"):
        insert_identity_block(model, "blocks", 0, seed=0, check_input=torch.randn(1, 3, 16, 16))
    assert len(model.blocks) == 2


def test_unregistering_a_user_override_brings_the_builtin_adapter_back():
    from timm.models.resnet import BasicBlock, Bottleneck

    model = timm.create_model("resnet18", num_classes=4, pretrained=False)
    builtin = find_block_stacks(model)[0].adapter
    override = register_block((BasicBlock, Bottleneck), zero_init=["bn2"])
    assert find_block_stacks(model)[0].adapter is override
    unregister_block((BasicBlock, Bottleneck))
    assert find_block_stacks(model)[0].adapter is builtin


TIMM_FAMILIES = {
    "eva02": (
        lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=4),
        (2, 3, 28, 28),
        "blocks",
    ),
    "eva_layerscale": (
        lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2, num_classes=4, init_values=0.1),
        (2, 3, 28, 28),
        "blocks",
    ),
    "swin": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(1, 2),
            num_classes=4,
        ),
        (2, 3, 32, 32),
        "layers.1.blocks",
    ),
    "mobilenetv3": (
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=4),
        (2, 3, 32, 32),
        "blocks.2",
    ),
    "efficientnet": (
        lambda: timm.create_model("efficientnet_b0", num_classes=4),
        (2, 3, 32, 32),
        "blocks.1",
    ),
}


@pytest.mark.parametrize("name", sorted(TIMM_FAMILIES))
def test_more_timm_families_grow_with_outputs_preserved(name):
    factory, shape, path = TIMM_FAMILIES[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape)
    model.train()
    with torch.no_grad():
        model(x)  # BatchNorm statistics away from 0/1
    before = eval_out(model, x)
    report = check_growable(model, x)
    # EfficientNet's single-block stages change the shape: nothing to copy there.
    assert report[path] is None and all(r is None or "no shape-preserving block" in r for r in report.values())
    stack = next(s for s in find_block_stacks(model) if s.path == path)
    depth = len(stack)
    insert_identity_block(model, path, depth - 1, seed=0, check_input=x)
    insert_identity_block(model, path, 0, seed=1, check_input=x)
    assert len(stack) == depth + 2
    assert (eval_out(model, x) - before).abs().max() <= 1e-5 * max(1.0, before.abs().max().item())


def test_eva_post_norm_blocks_are_refused():
    from timm.models.eva import Eva, EvaBlockPostNorm

    model = Eva(img_size=28, patch_size=14, embed_dim=16, depth=2, num_heads=2, use_post_norm=True)
    assert isinstance(model.blocks[0], EvaBlockPostNorm)
    with pytest.raises(UnsupportedModelError, match="post-LayerNorm"):
        insert_identity_block(model, "blocks", 0, seed=0)


def test_verified_insertion_on_a_bfloat16_model_with_a_float32_example_input():
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, pretrained=False)
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 3, 16, 16)
    before = eval_out(model, x.bfloat16())
    insert_identity_block(model, "blocks", 1, seed=0, check_input=x)
    assert torch.equal(eval_out(model, x.bfloat16()), before)
