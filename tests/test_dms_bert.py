"""DMS on Hugging Face BERT and RoBERTa encoders (``BertModel``, ``BertForSequenceClassification``,
``RobertaForSequenceClassification``), real classes from tiny configs, random init, padded inputs with their
attention mask.

Inside a real ``Trainer.fit`` on a synthetic classification task (token ids -> label): the export lands within 5% of
a 0.5 and a 0.3 FLOPs target (counted by torch's FlopCounterMode), DMS's count of the export equals
FlopCounterMode's, the exported model's logits equal the hard-masked supernet's on padded inputs, every layer runs,
the config depth and every ``layer_idx`` follow the layer list, nothing is left on the module (pickle, deepcopy,
torch.save), ``load_grown`` rebuilds the export from the checkpoint; uniform MLP widths (``tie=("width",)``) reload
with ``save_pretrained`` / ``from_pretrained``, fewer heads warn and rebuild with ``build_architecture``; a search
resumed from a mid-search checkpoint ends as the uninterrupted one. Without a Trainer: random per-layer heads, MLP
units and layers sliced on three model classes give the masked supernet's outputs and FlopCounterMode's count, with
eager and SDPA attention. Decoders (``is_decoder``, cross-attention) and ``embed=True`` are refused at setup with
the module untouched.
"""

from __future__ import annotations

import copy
import io
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
from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    build_architecture,
    export_architecture,
    export_model,
    find_gates,
)
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_flops
from tests._helpers import quiet_trainer, set_keep, tensor_hash

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, LENGTH, CLASSES = 100, 12, 3
CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=40,
    num_labels=CLASSES,
)


def make(name: str, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "roberta_cls":  # RoBERTa's positions start after pad_token_id (1)
        return transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(**{**CONFIG, "pad_token_id": 1, **options})
        )
    config = transformers.BertConfig(**{**CONFIG, **options})
    return (
        transformers.BertModel(config) if name == "bert_model" else transformers.BertForSequenceClassification(config)
    )


MODELS = ("bert_model", "bert_cls", "roberta_cls")


def batch(n: int, seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of random lengths (4..LENGTH, padded with ``pad``), their attention mask and a label: which third
    of the vocabulary most of the real tokens fall in (most tokens drawn from the label's third)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    third = (VOCAB - 2) // CLASSES
    ids = 2 + labels[:, None] * third + torch.randint(0, third, (n, LENGTH), generator=g)
    noise = torch.rand(n, LENGTH, generator=g) < 0.3
    ids = torch.where(noise, torch.randint(2, VOCAB, (n, LENGTH), generator=g), ids)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    lengths[0] = 4  # at least one padded row
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad)), mask, labels


def inputs(net, seed: int = 7, n: int = 3) -> dict[str, torch.Tensor]:
    ids, mask, _ = batch(n, seed, pad=net.config.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def outputs(net, x: dict[str, torch.Tensor]) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        out = net(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class SeqClassifier(pl.LightningModule):
    """Cross-entropy around a Hugging Face ``...ForSequenceClassification``; AdamW."""

    def __init__(self, net) -> None:
        super().__init__()
        self.net = net
        ids, mask, _ = batch(2, seed=99, pad=net.config.pad_token_id)
        self.example_input_array = (ids, mask)

    def forward(self, ids, mask):
        return self.net(input_ids=ids, attention_mask=mask).logits

    def training_step(self, data, batch_idx):
        ids, mask, labels = data
        return F.cross_entropy(self(ids, mask), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loader(net, n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(*batch(n, seed=1, pad=net.config.pad_token_id)), batch_size=16)


def layers(net) -> list[torch.nn.Module]:
    (stack,) = find_block_stacks(net)
    return list(stack.blocks)


def check_layers_run_and_bookkeeping(net) -> None:
    """Config depth and every layer_idx follow the layer list, and every layer runs on a padded batch."""
    blocks = layers(net)
    assert net.config.num_hidden_layers == len(blocks)
    assert [b.attention.self.layer_idx for b in blocks] == list(range(len(blocks)))
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        outputs(net, inputs(net, seed=5))
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(len(blocks)))


def check_nothing_left(module) -> None:
    assert find_gates(module) is None
    assert not any("forward" in m.__dict__ for m in module.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert not [k for k in module.__dict__ if k.startswith("_depthgrow") and k != "_depthgrow_event_log"]
    pickle.dumps(module)
    copy.deepcopy(module)
    torch.save(module, io.BytesIO())


class Snapshots(pl.Callback):
    """Deep copies of the module at the start of the epoch after the search: ``before`` DMS's export (this callback
    listed before DMS: the gated supernet) or ``after`` it (listed after DMS: the exported model)."""

    def __init__(self, key: str, store: dict, epoch: int) -> None:
        self.key, self.store, self.epoch = key, store, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.store[self.key] = copy.deepcopy(pl_module, {id(trainer): trainer})


def fit(module, dms, search_epochs: int, tmp_path=None) -> dict:
    store: dict = {}
    callbacks = [Snapshots("before", store, search_epochs), dms, Snapshots("after", store, search_epochs)]
    trainer = quiet_trainer(
        max_epochs=search_epochs + 1, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(module.net))
    store["notes"] = [str(w.message) for w in caught if "cannot describe the exported model" in str(w.message)]
    store["trainer"] = trainer
    return store


# ------------------------------------------------------------------------------------ inside Trainer.fit
@pytest.mark.parametrize(
    ("name", "target"),
    [("bert_cls", 0.5), ("roberta_cls", 0.5), ("bert_cls", 0.3)],
    ids=["bert", "roberta", "bert-0.3"],
)
def test_dms_fit_exports_an_encoder_on_target_that_matches_the_supernet_and_rebuilds(name, target, tmp_path):
    torch.manual_seed(0)
    module = SeqClassifier(make(name))
    example = module.example_input_array
    full = count_flops(module, example).total
    dms = DifferentiableModelScaling(target=target, search_epochs=2, arch_lr=0.05)
    store = fit(module, dms, search_epochs=2)

    log = event_log(module)
    assert [e.kind for e in log] == ["dms_attach", "dms_export"]
    export = log[-1]
    supernet, exported = store["before"], store["after"]
    assert find_gates(exported) is None and find_gates(module) is None
    counted = count_flops(exported, example).total
    assert abs(counted / (target * full) - 1) <= 0.05  # on target, counted by FlopCounterMode
    assert export.cost["flops_after"] == counted and export.cost["flops_before"] == full
    kept, n = export.reason["kept"], export.reason["n"]
    assert any(kept[k] < n[k] for k in kept if k.endswith(":heads"))  # heads were cut, as were MLP units
    assert any(kept[k] < n[k] for k in kept if k.endswith(":mlp"))
    # the hard-masked supernet at export time computes the exported model, padding mask included
    set_keep(find_gates(supernet), export.spec["keep"])
    supernet.eval(), exported.eval()
    ids, mask, _ = batch(8, seed=7, pad=module.net.config.pad_token_id)
    with torch.no_grad():
        assert (exported(ids, mask) - supernet(ids, mask)).abs().max() <= 1e-5
    net = module.net
    check_layers_run_and_bookkeeping(net)
    check_nothing_left(module)
    # fewer heads: the config cannot say so, a warning says how to rebuild; the config keeps its head count
    assert len(store["notes"]) == 1 and "num_attention_heads" in store["notes"][0]
    assert "build_architecture" in store["notes"][0] and "load_grown" in store["notes"][0]
    assert net.config.num_attention_heads == 4 and "num_attention_heads" in net.config.dms_layer_widths

    # load_grown: the starting model (same seed) plus the checkpoint's events and weights is the trained one
    path = tmp_path / "last.ckpt"
    store["trainer"].save_checkpoint(path)
    fresh = load_grown(SeqClassifier(make(name)), path)
    assert tensor_hash(fresh) == tensor_hash(module)
    x = inputs(net)
    assert torch.equal(outputs(fresh.net, x), outputs(net, x))
    check_layers_run_and_bookkeeping(fresh.net)


def test_dms_fit_with_tied_widths_reloads_with_from_pretrained_and_heads_rebuild_from_the_record(tmp_path):
    """Uniform MLP widths (``tie=("width",)``, heads=False): the config describes the export, which reloads as itself.
    Then per-layer heads: ``from_pretrained`` refuses the weights, ``build_architecture`` on a fresh supernet rebuilds
    the model."""
    torch.manual_seed(0)
    module = SeqClassifier(make("bert_cls"))
    full = count_flops(module, module.example_input_array).total
    store = fit(
        module, DifferentiableModelScaling(target=0.5, search_epochs=2, arch_lr=0.05, heads=False, tie="width"), 2
    )
    net = module.net
    assert store["notes"] == [] and getattr(net.config, "dms_layer_widths", None) is None
    assert abs(count_flops(module, module.example_input_array).total / (0.5 * full) - 1) <= 0.05
    widths = {b.intermediate.dense.out_features for b in layers(net)}
    assert widths == {net.config.intermediate_size} and net.config.intermediate_size < 64
    net.save_pretrained(tmp_path / "tied")
    loaded = type(net).from_pretrained(tmp_path / "tied")
    x = inputs(net)
    assert torch.equal(outputs(loaded, x), outputs(net, x))
    check_layers_run_and_bookkeeping(loaded)

    # per-layer heads, without a Trainer: the record rebuilds what the config cannot describe
    searched = make("bert_cls")
    gates = attach_gates(searched)
    keep = {name: list(range(g.n)) for name, g in gates.gates.items()}
    keep["bert/encoder/layer/0:heads"], keep["bert/encoder/layer/2:heads"] = [1], [0, 3]
    keep["bert/encoder/layer/1:mlp"] = list(range(0, 64, 3))
    set_keep(gates, keep)
    arch = export_architecture(searched)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(searched)
    notes = [str(w.message) for w in caught if "cannot describe the exported model" in str(w.message)]
    assert len(notes) == 1 and "num_attention_heads" in notes[0] and "intermediate_size" in notes[0]
    assert searched.config.dms_layer_widths == {"intermediate_size": [64, 22, 64], "num_attention_heads": [1, 4, 2]}
    searched.save_pretrained(tmp_path / "heads")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(searched).from_pretrained(tmp_path / "heads")
    fresh = make("bert_cls", seed=5)
    build_architecture(fresh, arch)
    fresh.load_state_dict(searched.state_dict())
    assert torch.equal(outputs(fresh, x), outputs(searched, x))
    assert [b.attention.self.query.out_features for b in layers(fresh)] == [8, 32, 16]


def test_a_search_resumed_from_a_checkpoint_ends_like_the_uninterrupted_run(tmp_path):
    """BERT without dropout: a checkpoint of the search phase, resumed, exports and trains to the same bytes."""

    def run(ckpt_path=None, checkpoints=None):
        module = SeqClassifier(make("bert_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        callbacks = [DifferentiableModelScaling(target=0.5, search_epochs=2, arch_lr=0.05)]
        if checkpoints is not None:
            callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_top_k=-1, every_n_epochs=1))
        trainer = quiet_trainer(
            max_epochs=3,
            callbacks=callbacks,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=checkpoints is not None,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader(module.net), ckpt_path=ckpt_path)
        return module

    whole = run(checkpoints=tmp_path)
    (search_phase,) = sorted(tmp_path.glob("epoch=0-*.ckpt"))  # after the first of the two search epochs
    resumed = run(ckpt_path=search_phase)
    assert tensor_hash(resumed) == tensor_hash(whole)
    assert [e.kind for e in event_log(resumed)] == [e.kind for e in event_log(whole)] == ["dms_attach", "dms_export"]
    check_layers_run_and_bookkeeping(resumed.net)


# ------------------------------------------------------------------------------------ export without a Trainer
def random_keep(gates, seed: int) -> dict[str, list[int]]:
    """Random kept elements: 1, 2, 3 heads in successive layers, a random part of each MLP, all layers but one."""
    g = torch.Generator().manual_seed(seed)
    keep, layer = {}, 0
    for name, gate in gates.gates.items():
        if gate.kind == "heads":
            k, layer = 1 + layer % gate.n, layer + 1
        else:
            k = gate.n - 1 if gate.kind == "depth" else int(torch.randint(1, gate.n, (1,), generator=g))
        keep[name] = sorted(torch.randperm(gate.n, generator=g)[:k].tolist())
    return keep


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_export_slices_heads_units_and_layers_to_the_masked_supernet(name, attention):
    net = make(name, initializer_range=0.2).eval()  # sharp attention: a wrong head or padding mask shows
    net.config._attn_implementation = attention
    x = inputs(net)
    gates = attach_gates(net)
    assert sorted({s["kind"] for s in gates.specs}) == ["depth", "heads", "width"]
    res = ResourceModel.build(net, x)
    assert res.full_flops == count_flops(net, x).total
    keep = random_keep(gates, seed=3)
    set_keep(gates, keep)
    hard = float(res.evaluate(gates, hard=True))
    masked = outputs(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(net)

    assert find_gates(net) is None
    assert (outputs(net, x) - masked).abs().max() <= 1e-5
    assert count_flops(net, x).total == hard < res.full_flops  # DMS's count of the export is FlopCounterMode's
    blocks = layers(net)
    assert len(blocks) == 2
    heads = [b.attention.self.query.out_features // b.attention.self.attention_head_size for b in blocks]
    assert len(set(heads)) > 1 and heads == [b.attention.self.num_attention_heads for b in blocks]
    check_layers_run_and_bookkeeping(net)


# ------------------------------------------------------------------------------------ refusals
REFUSED = {
    "decoder": (lambda: make("bert_cls", is_decoder=True), "is_decoder=True"),
    "cross_attention": (lambda: make("bert_model", is_decoder=True, add_cross_attention=True), "is_decoder=True"),
    "embed": (lambda: make("bert_cls"), "embed=False"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_variants_are_refused_at_setup_with_the_module_untouched(case):
    build, match = REFUSED[case]
    net = build()
    if case == "cross_attention":  # a BertModel: no classification head, so no Trainer here
        before = tensor_hash(net)
        for flags in ({}, {"width": False, "heads": False}):  # depth alone is refused as well
            with pytest.raises(UnsupportedModelError, match=match):
                attach_gates(net, **flags)
        assert tensor_hash(net) == before and find_gates(net) is None
        return
    module = SeqClassifier(net)
    before = tensor_hash(module)
    dms = DifferentiableModelScaling(target=0.5, search_epochs=1, embed=case == "embed")
    trainer = quiet_trainer(max_epochs=2, callbacks=[dms], limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(UnsupportedModelError, match=match):
        trainer.fit(module, loader(net, n=16))
    assert tensor_hash(module) == before and not event_log(module)
    check_nothing_left(module)
