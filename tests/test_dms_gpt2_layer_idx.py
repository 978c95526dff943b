"""DMS on Hugging Face GPT-2 built with ``scale_attn_by_inverse_layer_idx=True`` (tiny config, random init).

Each layer scales its attention by ``1 / (layer_idx + 1)``, fixed when the layer is built. Removing a block that is
not the last renumbers the layers after it: the sliced model in memory keeps each layer's old scale, a model rebuilt
from the exported config (``save_pretrained`` / ``from_pretrained``) scales by the new positions, so it would reload
computing something else. Depth gates on such a stack are refused at DMS setup (module and optimizer untouched), and
the stack-level bookkeeping refuses such a removal on any other path; removing the last block keeps every kept
layer's position and is allowed. Width and head gates keep every layer's position: their exports reload as
themselves (``from_pretrained`` for a uniform MLP width, ``build_architecture`` on a fresh supernet for heads).
"""

from __future__ import annotations

import copy
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow.adapters import UnsupportedModelError
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import attach_gates, build_architecture, export_architecture, export_model, find_gates
from lightning_depthgrow.events import event_log
from lightning_depthgrow.surgery import remove_block
from tests._helpers import quiet_trainer, set_keep, tensor_hash

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, LENGTH = 32, 12


def gpt2(scaled: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        initializer_range=0.2,  # sharp attention, so a layer's scale shows in the logits
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_inner=48,
        vocab_size=VOCAB,
        n_positions=32,
        scale_attn_by_inverse_layer_idx=scaled,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def tokens(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, LENGTH), generator=g)


def logits(net, ids):
    net.eval()
    with torch.no_grad():
        return net(input_ids=ids).logits


def reloaded(net, path):
    net.save_pretrained(path)
    return type(net).from_pretrained(path)


class CausalLM(pl.LightningModule):
    def __init__(self, net) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = tokens(seed=99)

    def forward(self, ids):
        return self.net(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        out = self(ids)
        return F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return self.optimizer


def data():
    return DataLoader(TensorDataset(torch.cat([tokens(seed=s, batch=8) for s in range(4)])), batch_size=8)


def test_the_hazard_a_renumbered_layer_reloads_as_another_function(tmp_path):
    """Why depth is refused: the first block removed from a scaled stack (plain surgery on a copy of the layers, as
    an export that bypassed the bookkeeping would leave it), the layers after it keep their old scale in memory but
    a model rebuilt from the config scales by their new positions."""
    net = gpt2()
    ids = tokens(seed=1)
    del net.transformer.h[0]  # ModuleList renumbers its keys; nothing else is told
    net.config.n_layer = 2
    for position, block in enumerate(net.transformer.h):
        block.attn.layer_idx = position
    in_memory = logits(net, ids)
    assert not torch.allclose(logits(reloaded(net, tmp_path), ids), in_memory, atol=1e-4)
    # and a model built with scale_attn_by_inverse_layer_idx=False does reload as itself
    plain = gpt2(scaled=False)
    del plain.transformer.h[0]
    plain.config.n_layer = 2
    for position, block in enumerate(plain.transformer.h):
        block.attn.layer_idx = position
    assert torch.equal(logits(reloaded(plain, tmp_path / "plain"), ids), logits(plain, ids))


def test_depth_gates_on_a_scaled_stack_are_refused_by_attach_gates_before_anything_is_attached():
    net = gpt2()
    before = tensor_hash(net)
    with pytest.raises(UnsupportedModelError, match=r"scale_attn_by_inverse_layer_idx=True.*depth=False"):
        attach_gates(net)
    assert find_gates(net) is None and tensor_hash(net) == before
    assert [b.attn.layer_idx for b in net.transformer.h] == [0, 1, 2]


def test_dms_with_depth_on_a_scaled_gpt2_is_refused_at_setup_with_module_and_optimizer_untouched():
    module = CausalLM(gpt2())
    before = tensor_hash(module)
    keys = set(module.__dict__)
    dms = DifferentiableModelScaling(target=0.5, search_epochs=1, arch_lr=0.05)
    trainer = quiet_trainer(max_epochs=2, callbacks=[dms], limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(UnsupportedModelError) as caught:
        trainer.fit(module, data())
    message = str(caught.value)
    assert "scale_attn_by_inverse_layer_idx=True" in message
    assert "DifferentiableModelScaling(depth=False)" in message and "scale_attn_by_inverse_layer_idx=False" in message
    assert tensor_hash(module) == before and find_gates(module) is None
    assert not [k for k in set(module.__dict__) - keys if k.startswith("_depthgrow")]  # nothing of ours left
    assert event_log(module) == []
    assert not hasattr(module, "optimizer")  # refused in setup: configure_optimizers never ran
    assert trainer.global_step == 0


def test_the_stack_refuses_removing_a_block_that_is_not_the_last_and_allows_the_last(tmp_path):
    net = gpt2()
    ids = tokens(seed=2)
    before = tensor_hash(net)
    with pytest.raises(UnsupportedModelError, match=r"scale_attn_by_inverse_layer_idx=True"):
        remove_block(net, "transformer.h", 1)
    assert tensor_hash(net) == before and len(net.transformer.h) == 3 and net.config.n_layer == 3
    assert [b.attn.layer_idx for b in net.transformer.h] == [0, 1, 2]
    # the last block: the others keep their positions, so the model reloads as itself
    remove_block(net, "transformer.h", 2)
    assert net.config.n_layer == 2 and [b.attn.layer_idx for b in net.transformer.h] == [0, 1]
    assert torch.equal(logits(reloaded(net, tmp_path), ids), logits(net, ids))


def test_dms_width_and_heads_on_a_scaled_gpt2_export_what_reloads_as_itself(tmp_path):
    """depth=False in a real Trainer.fit: the export matches the hard-masked supernet, every layer keeps its index,
    and the exported model rebuilt from a fresh supernet (build_architecture, then its weights) computes the same."""
    module = CausalLM(gpt2())
    store: dict = {}

    class Snapshot(pl.Callback):  # listed before DMS: the gated supernet; after it: the exported model
        def __init__(self, key: str) -> None:
            self.key = key

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                store[self.key] = copy.deepcopy(pl_module, {id(trainer): trainer})

    dms = DifferentiableModelScaling(target=0.6, search_epochs=1, arch_lr=0.05, depth=False)
    callbacks = [Snapshot("supernet"), dms, Snapshot("exported")]
    trainer = quiet_trainer(max_epochs=2, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data())
    (export,) = [e for e in event_log(module) if e.kind == "dms_export"]
    kept = export.reason["kept"]
    assert any(kept[n] < export.reason["n"][n] for n in kept if n.endswith(":heads"))  # heads were removed
    net = module.net
    assert [b.attn.layer_idx for b in net.transformer.h] == [0, 1, 2] and len(net.transformer.h) == 3
    ids = tokens(seed=3)
    supernet = store["supernet"]
    set_keep(find_gates(supernet), export.spec["keep"])
    assert torch.allclose(logits(supernet.net, ids), logits(store["exported"].net, ids), atol=1e-5, rtol=0)
    arch = export_architecture(net, event_log(module))
    fresh = gpt2(seed=5)
    build_architecture(fresh, arch)
    fresh.load_state_dict(net.state_dict())
    assert [b.attn.layer_idx for b in fresh.transformer.h] == [0, 1, 2]
    assert torch.equal(logits(fresh, ids), logits(net, ids))
    pickle.dumps(module)
    copy.deepcopy(module)


def test_a_uniform_mlp_export_of_a_scaled_gpt2_reloads_with_from_pretrained(tmp_path):
    net = gpt2()
    gates = attach_gates(net, depth=False)
    keep = {name: list(range(g.n)) for name, g in gates.gates.items()}
    g = torch.Generator().manual_seed(0)
    for name, gate in gates.gates.items():
        if gate.kind == "width":
            keep[name] = sorted(torch.randperm(gate.n, generator=g)[:20].tolist())
    set_keep(gates, keep)
    ids = tokens(seed=4)
    masked = logits(net, ids)
    export_model(net)
    assert net.config.n_inner == 20
    assert torch.allclose(logits(net, ids), masked, atol=1e-5, rtol=0)
    assert torch.equal(logits(reloaded(net, tmp_path), ids), logits(net, ids))
