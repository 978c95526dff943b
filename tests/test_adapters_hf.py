"""Hugging Face transformers models grow with no register_block: the function is preserved (logits before ==
after on a real input), the config depth, ``layer_types`` and every ``layer_idx`` follow the layer list, cached
and uncached greedy generation agree after growth, new blocks are re-initialised (GPT-2's Conv1D included),
and post-LayerNorm encoders (BERT) are found but their growth is refused with the module untouched."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_depthgrow import find_block_stacks  # noqa: E402
from lightning_depthgrow.adapters import UnsupportedModelError  # noqa: E402
from lightning_depthgrow.surgery.growth import (  # noqa: E402
    FunctionNotPreservedError,
    check_growable,
    insert_identity_block,
    remove_block,
)
from tests._helpers import tensor_hash  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

VOCAB = 64
DECODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB)


def gpt2(**kw):
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, **kw)
    return transformers.GPT2LMHeadModel(config)


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=1, **DECODER))


def mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=1, **DECODER))


def qwen2():
    # Layer 0 full attention, layer 1 sliding window: layer_types must follow the inserted layers.
    config = transformers.Qwen2Config(
        num_key_value_heads=1, use_sliding_window=True, sliding_window=3, max_window_layers=1, **DECODER
    )
    return transformers.Qwen2ForCausalLM(config)


DECODERS = {"gpt2": gpt2, "llama": llama, "mistral": mistral, "qwen2": qwen2}


def tokens(seed=0, batch=2, length=8):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def layers(model):
    (stack,) = find_block_stacks(model)
    return stack


def perturb(model, seed=1, scale=0.05):
    """Move every weight (the zeroed ones too) as training would, so the new blocks contribute."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_growth_preserves_logits_and_keeps_config_and_layer_idx_in_step(name):
    torch.manual_seed(0)
    model = DECODERS[name]()
    stack = layers(model)
    ids = tokens()
    before = logits(model, ids)
    # In the middle (Llama's layers[:num_hidden_layers] would drop the old last layer) and at the end.
    insert_identity_block(model, stack.path, 0, seed=0)
    insert_identity_block(model, stack.path, 2, seed=1)
    after = logits(model, ids)
    assert (after - before).abs().max() <= 1e-5
    assert model.config.num_hidden_layers == len(stack) == 4
    for position, block in enumerate(stack.blocks):
        attn = block.attn if name == "gpt2" else block.self_attn
        assert attn.layer_idx == position
    if name == "qwen2":
        # The copies take their template's type: [full, sliding] -> [full, full, sliding, sliding].
        full, sliding = "full_attention", "sliding_attention"
        assert model.config.layer_types == [full, full, sliding, sliding]
        assert [b.self_attn.layer_type for b in stack.blocks] == model.config.layer_types


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_cached_and_uncached_greedy_generation_agree_after_growth(name):
    torch.manual_seed(0)
    model = DECODERS[name]()
    stack = layers(model)
    insert_identity_block(model, stack.path, 0, seed=0)
    perturb(model)  # the grown blocks now contribute, so a shared KV-cache slot would show
    model.eval()
    ids = tokens(seed=3, batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_gpt2_new_block_is_reinitialised_not_a_copy_of_conv1d_weights():
    torch.manual_seed(0)
    model = gpt2()
    stack = layers(model)
    template = stack.container[0]
    with torch.no_grad():
        for p in template.parameters():
            p.add_(1.0)  # as if trained: far from any fresh init
    block, _ = insert_identity_block(model, stack.path, 0, seed=0, template_index=0)
    fresh = block.attn.c_attn.weight
    assert not torch.equal(fresh, template.attn.c_attn.weight)
    assert abs(fresh.std().item() - model.config.initializer_range) < 0.01
    assert abs(fresh.mean().item()) < 0.01
    assert torch.equal(block.ln_1.weight, torch.ones_like(block.ln_1.weight))
    assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.bias.abs().sum() == 0


def test_hf_vit_growth_preserves_outputs_and_config():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(pixel_values=x).logits
    stack = layers(model)
    insert_identity_block(model, stack.path, 1, seed=0, check_input={"pixel_values": x})
    assert torch.equal(model(pixel_values=x).logits, before)
    assert model.config.num_hidden_layers == len(stack) == 3


def bert():
    config = transformers.BertConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB
    )
    return transformers.BertForSequenceClassification(config)


def test_bert_is_found_for_curvature_but_growth_is_refused_and_module_untouched():
    model = bert()
    stack = layers(model)
    assert (stack.path, len(stack)) == ("bert.encoder.layer", 2)
    assert stack.growable_positions() == []
    digest, depth = tensor_hash(model), model.config.num_hidden_layers
    with pytest.raises(UnsupportedModelError, match=r"post-LayerNorm.*ramp"):
        insert_identity_block(model, stack.path, 0, seed=0)
    with pytest.raises(UnsupportedModelError, match=r"No block stack of BertForSequenceClassification can grow"):
        check_growable(model, {"input_ids": tokens()})
    assert tensor_hash(model) == digest and len(stack) == 2 and model.config.num_hidden_layers == depth


def test_config_depth_out_of_step_with_the_layer_list_is_refused_before_any_change():
    model = llama()
    model.config.num_hidden_layers = 1  # LlamaModel now runs layers[:1]: layer 1 never runs
    stack = layers(model)
    digest = tensor_hash(model)
    with pytest.raises(FunctionNotPreservedError, match=r"model.layers.1.*do not run"):
        insert_identity_block(model, stack.path, 0, seed=0, check_input=tokens())
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers is 1"):
        insert_identity_block(model, stack.path, 0, seed=0)
    assert tensor_hash(model) == digest and len(stack) == 2 and model.config.num_hidden_layers == 1
    assert [b.self_attn.layer_idx for b in stack.blocks] == [0, 1]


def test_user_adapter_that_does_not_silence_the_block_is_refused_at_insertion_and_undone():
    from lightning_depthgrow import register_block
    from lightning_depthgrow.adapters import unregister_block

    gpt2_block = transformers.models.gpt2.modeling_gpt2.GPT2Block
    register_block(gpt2_block, zero_init=["attn.c_proj"], name="only-attention-zeroed")  # MLP branch still on
    try:
        model = gpt2()
        stack = layers(model)
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(FunctionNotPreservedError, match=r"not an identity.*outputs moved"):
            insert_identity_block(model, stack.path, 1, seed=0, check_input=tokens())
        assert len(stack) == 2 and model.config.n_layer == 2
        assert list(model.state_dict()) == list(state)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    finally:
        unregister_block(gpt2_block)


def test_remove_block_is_the_inverse_of_insertion_for_config_and_layer_idx():
    model = qwen2()
    stack = layers(model)
    types = list(model.config.layer_types)
    insert_identity_block(model, stack.path, 0, seed=0)
    remove_block(model, stack.path, 1)
    assert model.config.layer_types == types and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in stack.blocks] == [0, 1]


def test_user_registration_of_a_builtin_block_type_keeps_the_builtin_bookkeeping():
    # Older releases told users to register_block(GPT2Block, ...) themselves; the config and layer_idx must
    # still follow the layers (else cached generation breaks and Llama drops its last layer).
    from lightning_depthgrow import register_block
    from lightning_depthgrow.adapters import unregister_block

    llama_layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    register_block(llama_layer, zero_init=["self_attn.o_proj", "mlp.down_proj"])
    try:
        torch.manual_seed(0)
        model = llama()
        ids = tokens()
        before = logits(model, ids)
        insert_identity_block(model, "model.layers", 0, seed=0)
        assert (logits(model, ids) - before).abs().max() <= 1e-5
        assert model.config.num_hidden_layers == 3
        assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    finally:
        unregister_block(llama_layer)
