"""DMS's FLOP model against torch's FlopCounterMode, per family; Hugging Face models other than GPT-2 and
Llama-style decoders refused clearly."""

from __future__ import annotations

import contextlib

import pytest
import timm
import torch
from _helpers import PairBlock, PairNet
from timm.models.eva import Eva, EvaBlock
from torch import nn

from lightning_depthgrow.adapters import UnsupportedModelError, adapter_for, register_block, unregister_block
from lightning_depthgrow.dms import (
    DMSFamily,
    ResourceModel,
    attach_gates,
    dms_families,
    export_model,
    find_gates,
    fit_architecture,
    set_importance,
)
from lightning_depthgrow.measure import count_flops, count_parameters


@contextlib.contextmanager
def eva_blocks_registered():
    """Eva blocks as a depth stack (only if no adapter knows them yet; then removed again)."""
    probe = EvaBlock(dim=8, num_heads=2)
    added = adapter_for(probe) is None
    if added:
        register_block(EvaBlock, zero_init=["attn.proj", "mlp.fc2"])
    try:
        yield
    finally:
        if added:
            unregister_block(EvaBlock)


def eva(**kw) -> nn.Module:
    return Eva(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=10,
        use_rot_pos_emb=True, **kw,
    )  # fmt: skip


def vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=10
    )


def prune(model: nn.Module, x: torch.Tensor, target: float, seed: int = 0, **flags) -> ResourceModel:
    gates = attach_gates(model, **flags)
    gen = torch.Generator().manual_seed(seed)
    set_importance(gates, {n: torch.rand(g.n, generator=gen) + 0.01 for n, g in gates.gates.items()})
    with torch.no_grad():
        for g in gates.gate_list():
            g.ratio.fill_(min(g.max_ratio, 0.4))
    res = ResourceModel.build(model, x)
    fit_architecture(gates, res, target * res.full_flops)
    return res


@pytest.mark.parametrize(
    "family",
    ["vit", "eva_mlp", "eva_swiglu", "resnet"],
)
def test_resource_model_equals_flop_counter_before_and_after_export(family):
    torch.manual_seed(0)
    x = torch.zeros(2, 3, 32, 32)
    flags = {}
    with eva_blocks_registered():
        if family == "vit":
            model = vit()
        elif family == "eva_mlp":
            model, flags = eva(), {"heads": False}
        elif family == "eva_swiglu":
            model, flags = eva(swiglu_mlp=True, swiglu_align_to=8), {"heads": False}
            assert type(model.blocks[0].mlp).__name__ == "SwiGLU"
        else:
            model = timm.create_model("resnet18", num_classes=10)
        full, params = count_flops(model, x).total, count_parameters(model)
        res = prune(model, x, 0.5, **flags)
        assert res.full_flops == full and res.full_params == params  # every FLOP FlopCounterMode sees
        gates = find_gates(model)
        hard_flops, hard_params = float(res.evaluate(gates, hard=True)), float(res.evaluate(gates, "params", True))
        model.eval()
        with torch.no_grad():
            y = model(x)
        export_model(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        exported = count_flops(model, x).total
        assert exported == pytest.approx(hard_flops, rel=1e-9) and count_parameters(model) == hard_params
        assert abs(exported / (0.5 * full) - 1) <= 0.05


def test_eva_heads_are_refused_with_a_message_and_nothing_attached():
    model = eva()
    with pytest.raises(UnsupportedModelError, match=r"heads.*EvaAttention.*heads=False"):
        attach_gates(model)
    assert find_gates(model) is None


def test_counts_cover_hf_gpt2_conv1d_and_llama_and_dms_refuses_distilbert():
    transformers = pytest.importorskip("transformers")
    ids = {"input_ids": torch.randint(0, 64, (2, 16))}
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
    )
    for model in (gpt2, llama):
        res = ResourceModel.build(model, ids)  # no gates: the whole model is one constant term
        assert res.full_flops == count_flops(model, ids).total  # GPT-2's Conv1D counted (was 7% before)
        assert res.full_params == count_parameters(model)  # tied embeddings once
    # DMS on GPT-2 and Llama: tests/test_dms_hf.py; BERT/RoBERTa: tests/test_dms_bert.py. Other transformers models
    # are refused, nothing attached.
    distilbert = transformers.DistilBertModel(
        transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=64)
    )
    with pytest.raises(UnsupportedModelError, match=r"Hugging Face.*DistilBertModel.*GPT-2"):
        attach_gates(distilbert)
    with pytest.raises(UnsupportedModelError, match=r"nothing to gate in DistilBertModel"):
        attach_gates(distilbert, width=False, heads=False)  # its layers are no known block stack
    assert find_gates(distilbert) is None


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_a_family_registered_in_one_place_gets_gates_export_and_counts():
    """A user's block type: one DMSFamily subclass gives width gates, export and a FLOP model that agree."""
    from lightning_depthgrow.dms import gate_name, register_dms_family, slice_linear_hidden, unregister_dms_family

    class MyBlock(nn.Module):
        def __init__(self, d: int = 16, h: int = 48) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

        def forward(self, x):
            return x + self.fc2(self.fc1(x).relu())

    class MyFamily(DMSFamily):
        name, sites = "my block", ("my_mlp",)

        def block_specs(self, path, block, width, heads):
            if not isinstance(block, MyBlock):
                return None
            spec = {"name": gate_name(path, "mlp"), "kind": "width", "site": "my_mlp", "block": path}
            return [{**spec, "n": block.fc1.out_features, "min_keep": 1}] if width else []

        def mask_hooks(self, model, spec, gates, index, fold):
            fold(model.get_submodule(spec["block"] + ".fc2")).columns.append((index, 1))
            return []

        def plan_export(self, model, spec, keep, slices):
            block = model.get_submodule(spec["block"])
            slice_linear_hidden(slices, [block.fc1], block.fc2, keep)

        def resource_roles(self, model, spec):
            return [("out", spec["block"] + ".fc1"), ("in", spec["block"] + ".fc2")]

    family = register_dms_family(MyFamily())
    register_block(MyBlock, zero_init=["fc2"])
    try:
        assert dms_families()[0] is family
        torch.manual_seed(0)
        network = nn.Sequential(nn.Linear(4, 16), nn.Sequential(MyBlock(), MyBlock(), MyBlock()), nn.Linear(16, 2))
        with pytest.raises(UnsupportedModelError, match="Wrap the model"):
            attach_gates(network)  # the gate container would run as a layer of a Sequential root
        model = Wrapper(network)
        x = torch.randn(5, 4)
        full = count_flops(model, x).total
        res = prune(model, x, 0.6)
        assert res.full_flops == full
        assert {s["site"] for s in find_gates(model).specs} == {"my_mlp", "depth"}
        with torch.no_grad():
            y = model(x)
        hard = float(res.evaluate(find_gates(model), hard=True))
        export_model(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), y)
        assert count_flops(model, x).total == pytest.approx(hard, rel=1e-9)
    finally:
        unregister_block(MyBlock)
        unregister_dms_family(family)


def test_generic_depth_gate_refuses_a_block_that_returns_a_tuple():
    register_block(PairBlock, zero_init=["fc"])
    try:
        model = PairNet(width=8)
        attach_gates(model)
        with pytest.raises(TypeError, match=r"PairBlock to map one tensor.*depth=False"):
            ResourceModel.build(model, torch.zeros(2, 8))  # the first forward, at setup
    finally:
        unregister_block(PairBlock)
