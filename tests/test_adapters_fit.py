"""Hugging Face language models grown by DepthGrowth inside a real Trainer.fit, with no register_block: at the
growth step the logits do not move (within 1e-5) and every layer runs, the config depth follows the layer list,
and after training greedy generation with and without the KV cache agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import load_grown
from lightning_depthgrow.callbacks import DepthGrowth
from tests._helpers import ImageClassifier, quiet_trainer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB = 64


def make(name):
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class LanguageModel(LightningModule):
    def __init__(self, name):
        super().__init__()
        self.model = make(name)
        self.example_input_array = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _hf_layers(module):
    return module.model.transformer.h if hasattr(module.model, "transformer") else module.model.model.layers


class GrowthProbe(Callback):
    """Placed before DepthGrowth: logits on a fixed input right before and right after the growth step."""

    def __init__(self, layers=None):
        self.before, self.after, self.after_ran = [], [], []
        self.ran: set[int] = set()
        self.layers = layers or (
            lambda m: m.model.transformer.h if hasattr(m.model, "transformer") else m.model.model.layers
        )

    def _logits(self, module):
        layers = self.layers(module)
        self.ran.clear()
        handles = [b.register_forward_pre_hook(lambda *_, i=i: self.ran.add(i)) for i, b in enumerate(layers)]
        module.eval()
        with torch.no_grad():
            out = module(module.example_input_array)
        module.train()
        for h in handles:
            h.remove()
        return out, len(layers)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            self.before.append(self._logits(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.after.append(self._logits(pl_module))
        self.after_ran.append(set(self.ran))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_depth_growth_on_hf_language_model_preserves_logits_and_generation(name, tmp_path):
    torch.manual_seed(0)
    module = LanguageModel(name)
    data = TensorDataset(torch.randint(0, VOCAB, (16, 9), generator=torch.Generator().manual_seed(0)))
    probe = GrowthProbe()
    growth = DepthGrowth.paper(final_budget=1.45, warmup_epochs=1, grow_every=1, placement="uniform", seed=0)
    trainer = quiet_trainer(max_epochs=2, callbacks=[probe, growth])
    trainer.fit(module, DataLoader(data, batch_size=8))

    grown = [e for e, (b, a) in enumerate(zip(probe.before, probe.after)) if a[1] != b[1]]
    assert len(grown) == 1, "exactly one growth step expected"
    (logits_before, depth_before), (logits_after, depth_after) = probe.before[grown[0]], probe.after[grown[0]]
    assert (depth_before, depth_after) == (2, 3)
    assert (logits_after - logits_before).abs().max() <= 1e-5
    assert probe.after_ran[grown[0]] == {0, 1, 2}
    config = module.model.config
    assert config.num_hidden_layers == 3
    hf = module.model.eval()
    ids = module.example_input_array[:, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(hf.generate(ids, use_cache=True, **kwargs), hf.generate(ids, use_cache=False, **kwargs))

    # load_grown replays the growth on a freshly built bare HF model: same depth, config, layer_idx, logits.
    trainer.save_checkpoint(tmp_path / "grown.ckpt")
    fresh = make(name)
    load_grown(fresh, tmp_path / "grown.ckpt")
    assert fresh.config.num_hidden_layers == 3
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert torch.equal(fresh.generate(ids, use_cache=True, **kwargs), hf.generate(ids, use_cache=True, **kwargs))


def test_depth_growth_with_curvature_placement_on_torchvision_vit():
    # Its encoder.layers children are named encoder_layer_i: found as a stack, then IndexError at the end of
    # the first epoch on the old main. Now the curvature blocks carry those names and the growth keeps them.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    torch.nn.init.normal_(vit.heads.head.weight, std=0.1)
    module = ImageClassifier(vit)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    )
    probe = GrowthProbe(lambda m: m.model.encoder.layers)
    growth = DepthGrowth.paper(final_budget=1.5, warmup_epochs=1, grow_every=1, placement="curvature", seed=0)
    quiet_trainer(max_epochs=2, callbacks=[probe, growth]).fit(module, DataLoader(data, batch_size=8))
    assert list(vit.encoder.layers._modules) == ["encoder_layer_0", "encoder_layer_1", "encoder_layer_2"]
    grown = [e for e, (b, a) in enumerate(zip(probe.before, probe.after)) if a[1] != b[1]]
    assert len(grown) == 1
    (before, _), (after, _) = probe.before[grown[0]], probe.after[grown[0]]
    assert (after - before).abs().max() <= 1e-5
    assert probe.after_ran[grown[0]] == {0, 1, 2}


class PostNormBlock(torch.nn.Module):
    """``LN(x + f(x))``: a zeroed ``f`` leaves ``LN(x)``, not ``x``."""

    def __init__(self, d=8):
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(d, d), torch.nn.LayerNorm(d)
        torch.nn.init.constant_(self.norm.weight, 2.0)  # as trained norms are: LN(x) is then far from x

    def forward(self, x):
        return self.norm(x + self.fc(x))


class PostNormNet(LightningModule):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(PostNormBlock(), PostNormBlock())
        self.head = torch.nn.Linear(8, 2)
        self.example_input_array = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.head(self.blocks(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_depth_growth_refuses_an_insertion_that_changes_the_function_and_leaves_the_module_as_it_was():
    from lightning_depthgrow import register_block
    from lightning_depthgrow.adapters import unregister_block
    from lightning_depthgrow.surgery.growth import FunctionNotPreservedError

    register_block(PostNormBlock, zero_init=["fc"])  # accepted by the registry, but not an identity
    try:
        torch.manual_seed(0)
        module = PostNormNet()
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 8, generator=generator), torch.randint(0, 2, (16,), generator=generator))
        growth = DepthGrowth.paper(final_budget=2.0, warmup_epochs=1, grow_every=1, placement="uniform", seed=0)
        trainer = quiet_trainer(max_epochs=2, callbacks=[growth])
        with pytest.raises(FunctionNotPreservedError, match=r"not an identity.*undone"):
            trainer.fit(module, DataLoader(data, batch_size=8))
        assert len(module.blocks) == 2 and list(module.blocks._modules) == ["0", "1"]
    finally:
        unregister_block(PostNormBlock)
