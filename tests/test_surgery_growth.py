"""Depth growth: the grown model computes exactly what the original did, for every built-in adapter and
for a user-registered block; the new block trains; seeded growth is deterministic and replayable; bad
requests fail with a clear message and leave the model untouched."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from _helpers import TinyGPT
from timm.layers import LayerScale
from timm.models.convnext import ConvNeXt
from torch import nn

from lightning_depthgrow import ArchitectureEvent, UnsupportedModelError, apply_event, find_block_stacks
from lightning_depthgrow.adapters import adapter_for, get_stack
from lightning_depthgrow.events import replay_events
from lightning_depthgrow.surgery import insert_identity_block

torch.set_num_threads(1)

VIT = dict(pretrained=False, img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
RESNET = dict(pretrained=False, channels=(8, 16, 32, 64), stem_width=8, num_classes=5)
CONVNEXT = dict(pretrained=False, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5)
IMAGE = (2, 3, 32, 32)

# name -> (factory, input shape or None for token ids, [(stack, after_index), ...] applied in order)
MODELS = {
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", **VIT), (2, 3, 16, 16), [("blocks", 0), ("blocks", 2)]),
    "vit_layerscale": (
        lambda: timm.create_model("vit_tiny_patch16_224", init_values=1e-5, **VIT),
        (2, 3, 16, 16),
        [("blocks", 1), ("blocks", 0)],
    ),
    "deit_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", **VIT),
        (2, 3, 16, 16),
        [("blocks", 0), ("blocks", 2)],
    ),
    "resnet_basic": (
        lambda: timm.create_model("resnet18", **RESNET),
        IMAGE,
        [("layer2", 0), ("layer4", 1), ("layer1", 0)],
    ),
    "resnet_bottleneck": (
        lambda: timm.create_model("resnet26", **RESNET),
        IMAGE,
        [("layer3", 0), ("layer1", 1), ("layer4", 1)],
    ),
    "convnext_layerscale": (
        lambda: timm.create_model("convnext_atto", **CONVNEXT),
        IMAGE,
        [("stages.1.blocks", 0), ("stages.3.blocks", 0)],
    ),
    # timm.create_model drops None-valued kwargs, so ls_init_value=None must go to the class itself.
    "convnext_no_layerscale": (
        lambda: ConvNeXt(ls_init_value=None, conv_mlp=True, num_classes=5, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32)),
        IMAGE,
        [("stages.0.blocks", 0), ("stages.1.blocks", 1)],
    ),
    "convnextv2_grn": (
        lambda: timm.create_model("convnextv2_atto", **CONVNEXT),
        IMAGE,
        [("stages.1.blocks", 1), ("stages.2.blocks", 0)],
    ),
    "gpt": (
        lambda: TinyGPT(vocab_size=32, context=16, dim=32, depth=2, num_heads=2),
        None,
        [("blocks", 0), ("blocks", 2)],
    ),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor, list[tuple[str, int]]]:
    factory, shape, positions = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    _randomize_scales(model)
    x = torch.randint(0, 32, (2, 12)) if shape is None else torch.randn(shape)
    return model, x, positions


def _randomize_scales(model: nn.Module) -> None:
    """Move norm weights, LayerScale gammas and BN statistics away from their (often 0 or 1) inits.

    timm zero-initialises the last BN of every ResNet block and starts LayerScale at 1e-5; with those the
    original blocks would be near-identities themselves and the comparison would prove little.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and (name.endswith("weight") or name.endswith("gamma")):
                param.uniform_(0.5, 1.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def _zeroed_params(model: nn.Module, block_name: str) -> list[str]:
    block = model.get_submodule(block_name)
    names = []
    for target in adapter_for(block).zero_names(block):
        prefix = f"{block_name}.{target}"
        names += [n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
    return names


@pytest.mark.parametrize("name", list(MODELS))
def test_growth_preserves_outputs_in_eval_and_train_mode(name):
    model, x, positions = _build(name)
    for stack_path, after in positions:
        grown = copy.deepcopy(model)
        depth = len(get_stack(grown, stack_path))
        block, change = insert_identity_block(grown, stack_path, after, seed=1)

        assert len(get_stack(grown, stack_path)) == depth + 1
        assert grown.get_submodule(f"{stack_path}.{after + 1}") is block
        assert [p for p, _ in change.added] == list(block.parameters())
        assert all(p is not twin and p.shape == twin.shape for p, twin in change.added)
        for mode in ("eval", "train"):
            getattr(model, mode)()
            getattr(grown, mode)()
            with torch.no_grad():
                expected, actual = _output(model, x), _output(grown, x)
            assert (actual - expected).abs().max().item() <= 1e-6, (stack_path, after, mode)
        # The zeroed branch output is not a coincidence of small weights: the rest of the block is random.
        assert any(p.abs().sum() > 0 for n, p in block.named_parameters() if "weight" in n)
        assert {id(adapter_for(b)) for b in get_stack(grown, stack_path).blocks} == {id(adapter_for(block))}
        model = grown  # grow the already grown model at the next position


@pytest.mark.parametrize("name", list(MODELS))
def test_new_block_receives_gradient_and_trains(name):
    model, x, positions = _build(name)
    stack_path, after = positions[0]
    block, _ = insert_identity_block(model, stack_path, after, seed=0)
    block_name = f"{stack_path}.{after + 1}"
    zeroed = _zeroed_params(model, block_name)
    assert zeroed, "the adapter must zero something"
    initial = {n: p.detach().clone() for n, p in block.named_parameters()}

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    for step in range(2):
        optimizer.zero_grad()
        _output(model, x).float().square().mean().backward()
        if step == 0:
            # At birth only the zeroed parameters (the branch outputs) can see a gradient; they must.
            assert all(params[n].grad.abs().sum() > 0 for n in zeroed), zeroed
        optimizer.step()
    unchanged = [n for n, p in block.named_parameters() if torch.equal(p, initial[n])]
    assert not unchanged, f"parameters of the new block did not train: {unchanged}"


def test_seeded_growth_is_deterministic_and_leaves_global_rng_alone():
    model, _, _ = _build("vit")
    rng = torch.get_rng_state()
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    insert_identity_block(a, "blocks", 1, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    insert_identity_block(b, "blocks", 1, seed=7)
    insert_identity_block(c, "blocks", 1, seed=8)

    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.2.attn.qkv.weight"], sc["blocks.2.attn.qkv.weight"])
    # Without a seed the global RNG is what draws the weights (so it advances).
    insert_identity_block(copy.deepcopy(model), "blocks", 1)
    assert not torch.equal(torch.get_rng_state(), rng)


def test_replaying_events_on_a_fresh_model_reproduces_identical_weights():
    model, _, _ = _build("resnet_basic")
    start = copy.deepcopy(model)
    insert_identity_block(model, "layer2", 0, seed=3)
    insert_identity_block(model, "layer3", 1, seed=4, template_index=1)
    events = [
        ArchitectureEvent("insert_block", {"stack": "layer2", "index": 0, "template": 1, "seed": 3}),
        ArchitectureEvent("insert_block", {"stack": "layer3", "index": 1, "template": 1, "seed": 4}),
    ]
    replayed = copy.deepcopy(start)
    changes = replay_events(replayed, [events[0].to_dict(), events[1]])

    assert [len(c.added) for c in changes] == [len(list(model.layer2[1].parameters()))] * 2
    expected, actual = model.state_dict(), replayed.state_dict()
    assert list(expected) == list(actual)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    single = copy.deepcopy(start)
    apply_event(single, events[0])
    assert torch.equal(single.layer2[1].conv1.weight, model.layer2[1].conv1.weight)


def test_default_template_after_a_downsampling_block_is_a_later_shape_preserving_block():
    model, _, _ = _build("resnet_basic")
    assert model.layer2[0].downsample is not None
    block, change = insert_identity_block(model, "layer2", 0, seed=0)
    assert block.conv1.in_channels == block.conv2.out_channels == 16 and block.downsample is None
    twin_names = {id(t): n for n, t in model.named_parameters()}
    assert {twin_names[id(t)].split(".")[:2] == ["layer2", "2"] for _, t in change.added} == {True}


def test_new_block_matches_template_device_dtype_mode_and_drop_path():
    model = timm.create_model("vit_tiny_patch16_224", drop_path_rate=0.1, init_values=1e-5, **VIT).double()
    model.eval()
    block, _ = insert_identity_block(model, "blocks", 1, seed=0)
    assert all(p.dtype == torch.float64 for p in block.parameters())
    assert not any(m.training for m in block.modules())
    assert block.drop_path1.drop_prob == model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(block.ls1, LayerScale) and torch.count_nonzero(block.ls1.gamma) == 0
    model.train()
    block, _ = insert_identity_block(model, "blocks", 0, seed=0)
    assert all(m.training for m in block.modules())


def test_container_and_timm_feature_info_stay_consistent():
    model, x, _ = _build("vit")
    container = model.blocks
    insert_identity_block(model, "blocks", 0, seed=0)
    insert_identity_block(model, "blocks", 2, seed=0)
    assert model.blocks is container and isinstance(container, nn.Sequential)
    assert [info["module"] for info in model.feature_info] == [f"blocks.{i}" for i in range(4)]
    intermediates = model.forward_intermediates(x, indices=4, intermediates_only=True)
    assert len(intermediates) == 4

    wrapper = nn.Module()  # as inside a LightningModule: the stack path gains a prefix
    wrapper.net, _, _ = _build("vit")
    apply_event(wrapper, ArchitectureEvent("insert_block", {"stack": "net.blocks", "index": 1, "seed": 0}))
    assert [info["module"] for info in wrapper.net.feature_info] == ["blocks.0", "blocks.1", "blocks.2"]

    gpt, _, _ = _build("gpt")
    blocks = gpt.blocks
    insert_identity_block(gpt, "blocks", 1, seed=0)
    assert gpt.blocks is blocks and isinstance(blocks, nn.ModuleList) and len(blocks) == 3
    assert [s.path for s in find_block_stacks(gpt)] == ["blocks"]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


@pytest.mark.parametrize(
    ("stack", "after", "kwargs", "error", "message"),
    [
        ("blockz", 0, {}, UnsupportedModelError, r"No block stack at 'blockz'.*\('layer1', 2\)"),
        (
            "layer1",
            2,
            {},
            IndexError,
            r"after_index=2 is out of range for stack 'layer1' with 2 blocks; valid .*0\.\.1",
        ),
        ("layer1", -1, {}, IndexError, r"after_index=-1 is out of range"),
        ("layer1", "1", {}, TypeError, r"after_index must be an int, got str"),
        ("layer2", 1, {"template_index": 5}, IndexError, r"template_index=5 is out of range"),
        ("layer2", 1, {"template_index": 0}, UnsupportedModelError, r"layer2\.0 changes the shape"),
    ],
)
def test_bad_requests_name_the_cause_and_leave_the_model_untouched(stack, after, kwargs, error, message):
    model, _, _ = _build("resnet_basic")
    snapshot = _snapshot(model)
    with pytest.raises(error, match=message):
        insert_identity_block(model, stack, after, seed=0, **kwargs)
    _assert_unchanged(model, snapshot)


def test_stack_without_shape_preserving_block_is_rejected():
    # One block per stage; layer2..4 each downsample, layer1 keeps the deep stem's 16 channels.
    model = timm.create_model("resnet10t", **{**RESNET, "channels": (16, 32, 64, 64)})
    snapshot = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"Stack 'layer3'.*has no shape-preserving block"):
        insert_identity_block(model, "layer3", 0)
    _assert_unchanged(model, snapshot)
    insert_identity_block(model, "layer1", 0)  # layer1 keeps the stem's shape: growable
    assert len(model.layer1) == 2


def test_model_without_block_stack_is_rejected_with_how_to_register():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    snapshot = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"No stack of registered residual blocks.*register_block"):
        insert_identity_block(model, "", 0)
    _assert_unchanged(model, snapshot)


def test_bad_event_spec_is_rejected_before_mutation():
    model, _, _ = _build("gpt")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"lacks \['index'\]"):
        apply_event(model, ArchitectureEvent("insert_block", {"stack": "blocks"}))
    with pytest.raises(IndexError, match="after_index=9"):
        apply_event(model, ArchitectureEvent("insert_block", {"stack": "blocks", "index": 9, "seed": 0}))
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("name", "stack", "zeroed"),
    [
        ("vit", "blocks", ["attn.proj", "mlp.fc2"]),
        ("vit_layerscale", "blocks", ["ls1.gamma", "ls2.gamma"]),
        ("deit_distilled", "blocks", ["attn.proj", "mlp.fc2"]),
        ("resnet_basic", "layer1", ["bn2"]),
        ("resnet_bottleneck", "layer1", ["bn3"]),
        ("convnext_layerscale", "stages.0.blocks", ["gamma"]),
        ("convnext_no_layerscale", "stages.0.blocks", ["mlp.fc2"]),
        ("convnextv2_grn", "stages.0.blocks", ["mlp.fc2"]),
        ("gpt", "blocks", ["attn.proj", "mlp.proj"]),
    ],
)
def test_each_adapter_zeroes_what_docs_adapters_md_says(name, stack, zeroed):
    model, _, _ = _build(name)
    block, _ = insert_identity_block(model, stack, 0, seed=0)
    assert adapter_for(block).zero_names(block) == zeroed
    for target in zeroed:
        tensors = (
            [block.get_parameter(target)]
            if target.endswith("gamma")
            else list(block.get_submodule(target).parameters())
        )
        assert tensors and all(torch.count_nonzero(t) == 0 for t in tensors)
