"""DMS on Hugging Face decoders (GPT-2, Llama/Mistral/Qwen2/Qwen3 with grouped-query attention), real classes from
tiny configs, random init.

Inside a real ``Trainer.fit`` with the callback at a 0.5 FLOPs target: the export lands within 5% of the target
(counted by torch's FlopCounterMode), our count of the exported model is within 2% of FlopCounterMode's, the
exported model's logits equal the masked supernet's at export time, every layer runs, the config depth and every
``layer_idx`` follow the layer list, cached and uncached greedy generation agree, and ``load_grown`` rebuilds the
exported model from the checkpoint. Without a Trainer: heads (kv-head groups), MLP units and layers sliced on five
families give the masked supernet's logits exactly and the count FlopCounterMode gives; a config out of step is
refused before export touches anything; DistilBERT is refused with a message (HF ViT's heads too).
"""

from __future__ import annotations

import copy
import pickle
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import find_block_stacks, load_grown
from lightning_depthgrow.adapters import UnsupportedModelError
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import ResourceModel, attach_gates, export_model, find_gates, remove_gates
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops
from tests._helpers import quiet_trainer, set_keep, tensor_hash

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, LENGTH = 32, 16
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=64)


def gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_inner=64, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def llama():
    # 4 query heads over 2 key/value heads: gated as 2 groups of 2
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **DECODER)
    )


def mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(num_attention_heads=4, num_key_value_heads=2, **DECODER)
    )


def qwen2():
    # biased q/k/v; layers 0-1 full attention, 2-3 sliding window: layer_types must follow removals
    config = transformers.Qwen2Config(
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        **DECODER,
    )
    return transformers.Qwen2ForCausalLM(config)


def qwen3():
    # q_norm/k_norm over head_dim; multi-head attention (one query head per key/value head)
    return transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=4, head_dim=8, **DECODER)
    )


MODELS = {"gpt2": gpt2, "llama": llama, "mistral": mistral, "qwen2": qwen2, "qwen3": qwen3}


def tokens(seed=0, batch=2, length=LENGTH):
    """Arithmetic progressions mod VOCAB (random start and step): a rule a tiny LM learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, VOCAB, (batch, 1), generator=g), torch.randint(1, 4, (batch, 1), generator=g)
    return (start + step * torch.arange(length)) % VOCAB


class CausalLM(pl.LightningModule):
    """Next-token cross-entropy around a Hugging Face causal LM; AdamW."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = tokens(seed=99)

    def forward(self, ids):
        return self.net(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        logits = self(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def decoder_layers(net):
    (stack,) = find_block_stacks(net)
    return stack.blocks


def attention(layer):
    return layer.attn if hasattr(layer, "attn") else layer.self_attn


def logits(net, ids):
    net.eval()
    with torch.no_grad():
        return net(input_ids=ids).logits


def check_layers_run_and_bookkeeping(net) -> None:
    """Config depth, layer_types and every layer_idx follow the layer list, and every layer runs."""
    layers = decoder_layers(net)
    assert net.config.num_hidden_layers == len(layers)
    assert [attention(layer).layer_idx for layer in layers] == list(range(len(layers)))
    types = getattr(net.config, "layer_types", None)
    if types is not None and hasattr(attention(layers[0]), "layer_type"):
        assert types == [attention(layer).layer_type for layer in layers]
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        logits(net, tokens(seed=5))
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(len(layers)))


def check_generation(net) -> None:
    """Greedy generation with and without the KV cache agree (left padding, so the attention mask is used)."""
    net.eval()
    ids = tokens(seed=3, batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(net.generate(ids, use_cache=True, **kwargs), net.generate(ids, use_cache=False, **kwargs))


# ------------------------------------------------------------------------------------ inside Trainer.fit
class Snapshots(pl.Callback):
    """Deep copies of the module at the start of epoch 1: ``before`` DMS's export (the gated supernet, this callback
    listed before DMS) or ``after`` it (listed after DMS)."""

    def __init__(self, key: str, store: dict) -> None:
        self.key, self.store = key, store

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.store[self.key] = copy.deepcopy(pl_module, {id(trainer): trainer})


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dms_fit_exports_an_hf_decoder_on_target_that_matches_the_supernet_and_generates(name, tmp_path):
    torch.manual_seed(0)
    module = CausalLM(MODELS[name]())
    example = module.example_input_array
    full = count_flops(module, example).total
    data = DataLoader(TensorDataset(torch.cat([tokens(seed=s, batch=16) for s in range(4)])), batch_size=16)
    store: dict = {}
    dms = DifferentiableModelScaling(target=0.5, search_epochs=1, arch_lr=0.05)
    trainer = quiet_trainer(
        max_epochs=2,
        callbacks=[Snapshots("before", store), dms, Snapshots("after", store)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)

    (export,) = [e for e in event_log(module) if e.kind == "dms_export"]
    supernet, exported = store["before"], store["after"]
    assert find_gates(exported) is None and find_gates(module) is None
    # on target (5%, counted by FlopCounterMode) and our count within 2% of FlopCounterMode's
    counted = count_flops(exported, example).total
    assert abs(counted / (0.5 * full) - 1) <= 0.05
    assert abs(export.cost["flops_after"] / counted - 1) <= 0.02
    assert export.cost["flops_before"] == full
    # the masked supernet at export time (its gates set to what the export kept) computes the exported model
    gates = find_gates(supernet)
    set_keep(gates, export.spec["keep"])
    supernet.eval(), exported.eval()
    ids = tokens(seed=7, batch=3)
    with torch.no_grad():
        assert torch.allclose(exported(ids), supernet(ids), atol=1e-5, rtol=0)
    kept = export.reason["kept"]
    assert sum(kept.values()) < sum(export.reason["n"].values())  # something was sliced
    check_layers_run_and_bookkeeping(module.net)
    check_generation(module.net)
    pickle.dumps(module)

    # load_grown: the starting model (same seed) plus the checkpoint's events and weights is the trained one
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(0)
    fresh = load_grown(CausalLM(MODELS[name]()), path)
    assert tensor_hash(fresh) == tensor_hash(module)
    assert torch.equal(logits(fresh.net, ids), logits(module.net, ids))
    check_layers_run_and_bookkeeping(fresh.net)


def test_a_search_resumed_from_a_checkpoint_ends_like_the_uninterrupted_run(tmp_path):
    """GPT-2 without dropout: a checkpoint of the search phase, resumed, exports and trains to the same bytes."""

    def run(ckpt_path=None, checkpoints=None):
        torch.manual_seed(0)
        net = gpt2()
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            setattr(net.config, attr, 0.0)
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        module = CausalLM(net)
        data = DataLoader(TensorDataset(torch.cat([tokens(seed=s, batch=16) for s in range(4)])), batch_size=16)
        callbacks = [DifferentiableModelScaling(target=0.5, search_epochs=1, arch_lr=0.05)]
        if checkpoints is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1))
        trainer = quiet_trainer(
            max_epochs=2,
            callbacks=callbacks,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=checkpoints is not None,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module

    whole = run(checkpoints=tmp_path)
    (search_phase,) = sorted(tmp_path.glob("epoch=0-*.ckpt"))
    resumed = run(ckpt_path=search_phase)
    assert tensor_hash(resumed) == tensor_hash(whole)
    assert [e.kind for e in event_log(resumed)] == [e.kind for e in event_log(whole)] == ["dms_attach", "dms_export"]
    assert resumed.net.config.n_layer == whole.net.config.n_layer == len(resumed.net.transformer.h)
    check_generation(resumed.net)


# ------------------------------------------------------------------------------------ export without a Trainer
def random_keep(gates, seed: int) -> dict[str, list[int]]:
    """Random kept elements: 1, 2, ... heads (or kv-head groups) in successive layers, so layers differ; a random
    part of each MLP; all layers but one."""
    g = torch.Generator().manual_seed(seed)
    keep, layer = {}, 0
    for name, gate in gates.gates.items():
        if gate.kind == "heads":
            k, layer = 1 + layer % gate.n, layer + 1
        else:
            k = gate.n - 1 if gate.kind == "depth" else int(torch.randint(1, gate.n, (1,), generator=g))
        keep[name] = sorted(torch.randperm(gate.n, generator=g)[:k].tolist())
    return keep


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_slices_heads_units_and_layers_to_the_masked_supernet(name):
    torch.manual_seed(0)
    net = MODELS[name]()
    ids = {"input_ids": tokens(seed=1)}
    gates = attach_gates(net)
    kinds = sorted({s["kind"] for s in gates.specs})
    assert kinds == ["depth", "heads", "width"]
    heads = {s["name"]: s["n"] for s in gates.specs if s["kind"] == "heads"}
    kv = net.config.n_head if name == "gpt2" else net.config.num_key_value_heads
    assert set(heads.values()) == {kv}  # GQA: one element per key/value head and its query heads
    res = ResourceModel.build(net, ids)
    assert res.full_flops == count_flops(net, ids).total
    keep = random_keep(gates, seed=3)
    set_keep(gates, keep)
    hard = float(res.evaluate(gates, hard=True))
    masked = logits(net, ids["input_ids"])
    export_model(net)

    assert find_gates(net) is None
    assert torch.allclose(logits(net, ids["input_ids"]), masked, atol=1e-5, rtol=0)
    assert abs(count_flops(net, ids).total / hard - 1) <= 0.02
    layers = decoder_layers(net)
    assert len(layers) == 3
    if name != "gpt2":
        groups = net.config.num_attention_heads // net.config.num_key_value_heads
        kept_heads = []
        for layer in layers:
            attn = attention(layer)
            assert attn.num_key_value_groups == groups  # GQA stays valid
            kv_heads = attn.k_proj.out_features // attn.head_dim
            assert attn.q_proj.out_features == kv_heads * groups * attn.head_dim == attn.o_proj.in_features
            kept_heads.append(kv_heads)
        assert len(set(kept_heads)) > 1  # layers keep different head counts
    check_layers_run_and_bookkeeping(net)
    check_generation(net)


# ------------------------------------------------------------------------------------ the config after export
def uniform_keep(gates, seed: int, heads: bool) -> dict[str, list[int]]:
    """The same number of kept elements in every layer (different elements per layer), all layers but one; heads
    (kv-head groups) kept whole unless ``heads``."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for name, gate in gates.gates.items():
        k = {"depth": gate.n - 1, "width": gate.n // 3, "heads": gate.n // 2 if heads else gate.n}[gate.kind]
        keep[name] = sorted(torch.randperm(gate.n, generator=g)[:k].tolist())
    return keep


def exported(name, keep_fn):
    torch.manual_seed(0)
    net = MODELS[name]()
    gates = attach_gates(net)
    keep = keep_fn(gates)
    set_keep(gates, keep)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(net)
    notes = [str(w.message) for w in caught if "cannot describe the exported model" in str(w.message)]
    return net, keep, notes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_uniform_export_updates_the_config_so_save_and_from_pretrained_round_trip(name, tmp_path):
    # GPT-2 derives head_dim from n_embd / n_head, so only its MLP width can change in a config
    net, _, notes = exported(name, lambda gates: uniform_keep(gates, seed=1, heads=name != "gpt2"))
    assert notes == []
    ids = tokens(seed=2)
    expected = logits(net, ids)
    layer = decoder_layers(net)[0]
    config = net.config
    if name == "gpt2":
        assert config.n_inner == layer.mlp.c_fc.nf == 64 // 3 and config.n_head == 4
    else:
        attn = layer.self_attn
        assert config.intermediate_size == layer.mlp.gate_proj.out_features == 64 // 3
        assert config.num_key_value_heads * attn.head_dim == attn.k_proj.out_features
        assert config.num_attention_heads * attn.head_dim == attn.q_proj.out_features
        assert (
            config.head_dim == attn.head_dim and config.num_key_value_heads < MODELS[name]().config.num_key_value_heads
        )
    assert getattr(config, "dms_layer_widths", None) is None
    rebuilt = type(net)(copy.deepcopy(config))  # the model class from the config, then the weights
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(logits(rebuilt, ids), expected)
    net.save_pretrained(tmp_path)
    loaded = type(net).from_pretrained(tmp_path)
    assert torch.equal(logits(loaded, ids), expected)
    check_layers_run_and_bookkeeping(loaded)


@pytest.mark.parametrize(
    ("name", "what"),
    [("gpt2", "heads"), ("gpt2", "mlp"), ("llama", "heads"), ("llama", "mlp")],
)
def test_an_export_a_config_cannot_describe_keeps_its_values_records_the_layers_and_warns(name, what, tmp_path):
    """Per-layer MLP widths or kv-head groups (or GPT-2 heads of a size n_embd / n_head does not give): the config
    keeps the supernet's counts, records the exported per-layer ones, a warning says how to reload; loading by
    the config refuses the weights (size mismatch) instead of rebuilding a silently different model."""

    def keep_fn(gates):
        keep = uniform_keep(gates, seed=1, heads=name == "gpt2")  # GPT-2: uniform heads are already too much
        depth = next(n for n, g in gates.gates.items() if g.kind == "depth")
        keep[depth] = list(range(gates.gates[depth].n - 1))  # the first layer stays, the last goes
        if what == "mlp" or name != "gpt2":
            first = next(n for n, g in gates.gates.items() if g.kind == ("width" if what == "mlp" else "heads"))
            keep[first] = keep[first][:1]  # the first layer keeps fewer than the others
        if name == "gpt2" and what == "mlp":  # MLP widths differ, heads all kept
            keep.update({n: list(range(g.n)) for n, g in gates.gates.items() if g.kind == "heads"})
        return keep

    supernet = MODELS[name]().config
    net, _, notes = exported(name, keep_fn)
    field = {("gpt2", "heads"): "n_head", ("gpt2", "mlp"): "n_inner"}.get((name, what))
    field = field or {"heads": "num_key_value_heads", "mlp": "intermediate_size"}[what]
    assert len(notes) == 1 and field in notes[0] and "load_grown" in notes[0] and "build_architecture" in notes[0]
    assert getattr(net.config, field) == getattr(supernet, field)
    per_layer = net.config.dms_layer_widths[field]
    layers = decoder_layers(net)
    if field == "n_head":
        assert per_layer == [layer.attn.split_size // layer.attn.head_dim for layer in layers] == [2, 2, 2]
    elif field == "n_inner":
        assert per_layer == [layer.mlp.c_fc.nf for layer in layers] and len(set(per_layer)) == 2
    elif field == "intermediate_size":
        assert per_layer == [layer.mlp.gate_proj.out_features for layer in layers] and len(set(per_layer)) == 2
    else:
        kv = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in layers]
        assert per_layer == kv and len(set(kv)) == 2
    if name == "gpt2" and what == "heads":
        assert net.config.n_inner == layers[0].mlp.c_fc.nf == 64 // 3  # what the config can say is still said
    with pytest.raises(RuntimeError, match="size mismatch"):
        type(net)(copy.deepcopy(net.config)).load_state_dict(net.state_dict())
    net.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(net).from_pretrained(tmp_path)


def test_export_refuses_a_config_out_of_step_before_touching_the_model():
    torch.manual_seed(0)
    net = llama()
    gates = attach_gates(net)
    set_keep(gates, random_keep(gates, seed=0))
    net.config.num_hidden_layers = 5  # the user's config no longer describes the 4 layers
    before = tensor_hash(net)
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers is 5"):
        export_model(net)
    assert tensor_hash(net) == before and find_gates(net) is gates
    assert len(net.model.layers) == 4 and [a.self_attn.layer_idx for a in net.model.layers] == [0, 1, 2, 3]
    remove_gates(net)


def test_other_hf_models_are_refused_with_a_message_and_nothing_attached():
    # BERT and RoBERTa encoders are gated (tests/test_dms_bert.py); DistilBERT's layers are not
    distilbert = transformers.DistilBertForMaskedLM(
        transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, vocab_size=VOCAB)
    )
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    )
    with pytest.raises(UnsupportedModelError, match=r"Hugging Face.*DistilBertForMaskedLM.*GPT-2.*Llama.*BERT"):
        attach_gates(distilbert)
    with pytest.raises(UnsupportedModelError, match=r"nothing to gate in DistilBertForMaskedLM"):
        attach_gates(distilbert, width=False, heads=False)  # depth only: its layers are no known block stack
    assert find_gates(distilbert) is None
    # HF ViT is gated (tests/test_dms_embed_families.py) except for its heads, refused with what to do
    with pytest.raises(UnsupportedModelError, match=r"heads=False"):
        attach_gates(vit)
    assert find_gates(vit) is None


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_counts_agree_with_flop_counter_for_eager_and_sdpa_attention(name):
    """The same model with eager and SDPA attention: FlopCounterMode counts the same FLOPs (SDPA through its math
    kernel, grouped-query attention included), and DMS's hard count of a sliced model equals it under both."""
    counts = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        net = MODELS[name]()
        net.config._attn_implementation = implementation
        ids = {"input_ids": tokens(seed=2)}
        gates = attach_gates(net)
        res = ResourceModel.build(net, ids)
        set_keep(gates, random_keep(gates, seed=4))
        hard = float(res.evaluate(gates, hard=True))
        export_model(net)
        counts[implementation] = (res.full_flops, hard, count_flops(net, ids).total)
    assert counts["eager"] == counts["sdpa"]
    full, hard, exported = counts["sdpa"]
    assert hard == exported < full
