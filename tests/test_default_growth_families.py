"""``DepthGrowth()`` with its defaults (G_stack: every growable stack 3x deeper after a third of the run, the copies
ramped in over 12% of it, then folded) inside a real ``Trainer.fit``, on the model families a user would add it to:
Hugging Face GPT-2 and Llama (decoders with a KV cache), HF BERT (post-LayerNorm: zero-init is refused, the ramp
must grow it), a torchvision ResNet and a timm Swin, built from tiny configs with random init.

Each run is 18 optimizer steps (2 epochs of 9 batches, ``max_steps=18``): the stacks are made 3x deeper after step
``round(18 / 3) = 6``, the ramp is ``round(0.12 * 18) = 2`` steps and is folded after step 8. Per family:

- at birth the outputs in eval mode on a fixed input equal those right before the step (within
  ``1e-5 x max(1, max |before|)``) and every block of every stack runs, before and after;
- the fold changes nothing: the module whose ramps ended computes bitwise what the folded one computes;
- after ``fit`` no ramp, hook or attribute of ours is left (only the event log on the LightningModule), and the
  module pickles, deep-copies and saves with the same outputs;
- ``load_grown(<freshly built bare model>, ckpt)`` gives the fitted weights and bitwise the fitted outputs;
- Hugging Face: ``save_pretrained`` / ``from_pretrained`` gives bitwise the fitted outputs;
- the decoders: the config depth (and ``layer_types``) and every ``layer_idx`` follow the grown stack, and greedy
  ``generate()`` with the KV cache equals ``generate()`` without it and a manual greedy loop (tokens exactly, every
  step's logits within 1e-5), on the fitted model and on the one ``load_grown`` rebuilt.

Then: GPT-2 resumes mid-ramp bitwise; validation mid-ramp on a post-LN ``nn.TransformerEncoder`` whose padded batch
torch packs into a nested tensor; and the regressions of what this file found: GPT-2 with
``scale_attn_by_inverse_layer_idx=True`` is refused (its copies did not reload as themselves), the copy operators
keep timm's per-block ``feature_info`` in step.

Some modules have an ``example_input_array`` and some not (the step is then verified on the inputs recorded
during ``fit``): both paths users take. ``tests/test_depth_growth_default.py`` covers the defaults' arguments and
the timm ViT; ``tests/test_ramp_any_block.py`` the explicit ``operator="stack", factor=2`` on post-LN families.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_depthgrow import find_block_stacks, load_grown, register_block
from lightning_depthgrow.adapters import UnsupportedModelError, unregister_block
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.events import LOG_ATTRIBUTE, event_log
from lightning_depthgrow.surgery import FunctionNotPreservedError, stack_blocks
from lightning_depthgrow.surgery.ramp import RAMP_BUFFER, advance_ramps, ramp_traces, ramped_blocks
from tests._helpers import HOOK_DICTS, quiet_trainer, tensor_hash

torch.set_num_threads(1)

TOLERANCE = 1e-5
STEPS, BATCHES = 18, 9  # 2 epochs of 9 batches
GROW_AT, RAMP = 6, 2  # round(18 / 3), round(0.12 * 18)
FOLD_AT = GROW_AT + RAMP
VOCAB = 64


# ---------------------------------------------------------------------------------------------- the families


def _transformers() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _gpt2() -> nn.Module:
    t = _transformers()
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32))


def _llama() -> nn.Module:
    t = _transformers()
    config = t.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return t.LlamaForCausalLM(config)


def _bert() -> nn.Module:
    t = _transformers()
    config = t.BertConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return t.BertForMaskedLM(config)


def _tv_resnet() -> nn.Module:
    pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, ResNet

    # ResNet18's widths, 4 classes; layer3 is one downsampling block (no shape-preserving tail to stack).
    return ResNet(BasicBlock, [2, 2, 1, 2], num_classes=4)


def _timm_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2), num_classes=4
    )


@dataclass
class Family:
    """A model family: how to build the bare model, its task, whether the module has an ``example_input_array``,
    and the depth of every block stack after the run (``grown``; the others keep theirs)."""

    build: Callable[[], nn.Module]
    task: str  # "lm" (next token), "mlm" (reconstruct the tokens), "image" (4 classes, 16 x 16)
    example: bool
    grown: dict[str, int]
    kept: dict[str, int] = field(default_factory=dict)


FAMILIES = {
    "hf_gpt2": Family(_gpt2, "lm", example=False, grown={"model.transformer.h": 6}),
    "hf_llama": Family(_llama, "lm", example=True, grown={"model.model.layers": 6}),
    "hf_bert": Family(_bert, "mlm", example=False, grown={"model.bert.encoder.layer": 6}),
    # layer1 keeps the shape in every block: stacked whole (2 -> 6). The first block of layer2 and layer4
    # downsamples: their tail (block 1) is stacked (2 -> 4). layer3 is one downsampling block: not grown, warned.
    "tv_resnet": Family(
        _tv_resnet,
        "image",
        example=True,
        grown={"model.layer1": 6, "model.layer2": 4, "model.layer4": 4},
        kept={"model.layer3": 1},
    ),
    "timm_swin": Family(
        _timm_swin, "image", example=False, grown={"model.layers.0.blocks": 6, "model.layers.1.blocks": 6}
    ),
}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(task: str, seed: int, size: int = 4) -> Any:
    if task == "image":
        g = _seeded(seed)
        return torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 4, (size,), generator=g)
    return torch.randint(0, VOCAB, (size, 9), generator=_seeded(seed))


def _model_input(task: str, seed: int) -> Any:
    """An input of the module's ``forward`` (the probe, the example input)."""
    return _batch(task, seed, 2)[0] if task == "image" else {"input_ids": _batch(task, seed, 2)[:, :8]}


class Lit(pl.LightningModule):
    """The user's model in a LightningModule; ``training_step`` calls the module itself (``self(...)``)."""

    def __init__(self, model: nn.Module, task: str, example: bool) -> None:
        super().__init__()
        self.model, self.task = model, task
        if example:
            self.example_input_array = _model_input(task, 1000)

    def forward(self, x: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x) if self.task == "image" else self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.task == "image":
            x, y = batch
            return F.cross_entropy(self(x), y)
        inputs, targets = (batch[:, :-1], batch[:, 1:]) if self.task == "lm" else (batch, batch)
        logits = self(input_ids=inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _build(name: str) -> Lit:
    family = FAMILIES[name]
    torch.manual_seed(1234)
    return Lit(family.build(), family.task, family.example)


def _call(module: nn.Module, x: Any) -> torch.Tensor:
    return module(**x) if isinstance(x, dict) else module(x)


def _depths(module: nn.Module) -> dict[str, int]:
    return {s.path: len(s) for s in find_block_stacks(module)}


def run_blocks(module: nn.Module, x: Any) -> tuple[torch.Tensor, set[str], set[str]]:
    """Eval-mode output on ``x`` (train mode restored), the blocks that ran and every block of every stack."""
    blocks = {f"{s.path}.{i}": b for s in find_block_stacks(module) for i, b in enumerate(s.blocks)}
    ran: set[str] = set()
    hooks = [b.register_forward_pre_hook(lambda *_, n=n: ran.add(n)) for n, b in blocks.items()]
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = _call(module, x).clone()
    finally:
        module.train(was)
        for hook in hooks:
            hook.remove()
    return out, ran, set(blocks)


class Probe(Callback):
    """At every training batch end: the eval-mode output on ``x`` and whether every block ran; at ``keep`` a copy
    of the module as it is then."""

    def __init__(self, x: Any, keep: int | None = None) -> None:
        self.x, self.keep = x, keep
        self.out: dict[int, torch.Tensor] = {}
        self.missing: dict[int, set[str]] = {}
        self.kept: pl.LightningModule | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self.out[step], ran, blocks = run_blocks(pl_module, self.x)
        self.missing[step] = blocks - ran
        if step == self.keep:
            self.kept = copy.deepcopy(pl_module)


def _moved(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after - before).abs().max()) / max(1.0, float(before.abs().max()))


def _hooks(module: nn.Module) -> tuple[int, ...]:
    return tuple(len(getattr(module, attribute)) for attribute in HOOK_DICTS)


def _hooks_by_type(module: nn.Module) -> dict[type, set[tuple[int, ...]]]:
    seen: dict[type, set[tuple[int, ...]]] = {}
    for sub in module.modules():
        seen.setdefault(type(sub), set()).add(_hooks(sub))
    return seen


# ---------------------------------------------------------------------------------------------- the checks


def _check_generation(hf: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Greedy generation with the KV cache, without it and by a manual loop (full forward, argmax) agree: the tokens
    exactly, and the logits of every step within 1e-5 (a tiny random model's argmax hides a wrong cache slot)."""
    hf.eval()
    hf.generation_config.eos_token_id = None  # no early stop: the manual loop never stops either
    options = dict(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
        output_logits=True,
        return_dict_in_generate=True,
    )
    with_cache, without = hf.generate(ids, use_cache=True, **options), hf.generate(ids, use_cache=False, **options)
    cached = with_cache.sequences
    assert torch.equal(cached, without.sequences), "KV cache changes greedy generation"
    for k, (a, b) in enumerate(zip(with_cache.logits, without.logits, strict=True)):
        assert float((a - b).abs().max()) <= TOLERANCE, f"step {k}: the cached logits differ from the uncached ones"
    manual = ids
    with torch.no_grad():
        for _ in range(6):
            manual = torch.cat([manual, hf(input_ids=manual).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, manual), "generate() differs from a manual greedy loop"
    return cached


def _check_decoder_bookkeeping(hf: nn.Module, stack_path: str) -> None:
    """The config depth, ``layer_types`` and every ``layer_idx`` follow the stack (the KV-cache slots)."""
    stack = hf.get_submodule(stack_path)
    config = hf.config
    assert config.num_hidden_layers == len(stack) == 6
    types = getattr(config, "layer_types", None)
    assert types is None or len(types) == len(stack)
    for position, layer in enumerate(stack):
        indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices == {position}, f"layer {position} carries layer_idx {indices}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_default_grows_the_family_function_preserving_and_leaves_a_plain_model(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    module = _build(name)
    probe_input = _model_input(family.task, 5)
    depth = _depths(module)
    attributes = {"module": set(vars(module)), "model": set(vars(module.model))}
    growth, before, after = DepthGrowth(), Probe(probe_input, keep=FOLD_AT), Probe(probe_input)
    batches = [_batch(family.task, i) for i in range(BATCHES)]
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[before, growth, after], default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(batches, batch_size=None))
    # The stacks stacking cannot grow (a shape-changing first block) are named, not skipped silently.
    skipped = [str(w.message) for w in caught if "they will not grow" in str(w.message)]
    assert bool(skipped) == bool(family.kept), skipped
    assert all(repr(path) in skipped[0] for path in family.kept), skipped

    # The run: 3x deeper after step 6, a 2-step ramp folded after step 8, every growable stack and only those.
    assert trainer.global_step == STEPS and growth.ramp_steps == RAMP
    log = event_log(module)
    assert [(e.kind, e.step) for e in log] == [("stack_blocks", GROW_AT)] * len(family.grown) + [
        ("fold_ramps", FOLD_AT)
    ]
    assert {e.spec["stack"] for e in log[:-1]} == set(family.grown)
    assert all(e.spec["factor"] == 3 and e.spec["ramp_steps"] == RAMP for e in log[:-1])
    assert _depths(module) == {**depth, **family.grown, **family.kept}

    # At birth: the function (eval mode) unchanged; every block runs at every step.
    moved = _moved(after.out[GROW_AT], before.out[GROW_AT])
    assert moved <= TOLERANCE, f"the growth step moved the outputs by {moved:.3g} (relative)"
    assert not torch.equal(after.out[GROW_AT + 1], after.out[GROW_AT])  # and training goes on from there
    for probe in (before, after):
        assert all(not missing for missing in probe.missing.values()), probe.missing
    # The fold: the ended ramps (the module kept before the fold, advanced as DepthGrowth advances it) compute
    # bitwise what the folded module computes; nothing of the ramps is left.
    assert before.kept is not None and sorted(advance_ramps(before.kept)) == sorted(log[-1].spec["blocks"])
    assert torch.equal(run_blocks(before.kept, probe_input)[0], after.out[FOLD_AT])
    assert ramped_blocks(module) == {} and ramp_traces(module) == []
    assert not any(RAMP_BUFFER in key for key in module.state_dict())

    # Nothing of ours is left on the module: no new attribute but the event log, no hook beyond what the family's
    # modules hold after a plain fit (one step, no callback), the same outputs after pickle, deepcopy and torch.save.
    reference = _build(name)
    plain = {"module": set(vars(reference)), "model": set(vars(reference.model))}
    quiet_trainer(max_steps=1, default_root_dir=tmp_path / "plain").fit(reference, DataLoader(batches, batch_size=None))
    lightning_own = set(vars(reference)) - plain["module"]  # what Lightning itself adds (e.g. _hparams)
    assert set(vars(module)) - attributes["module"] == {LOG_ATTRIBUTE} | lightning_own
    assert set(vars(module.model)) - attributes["model"] == set(vars(reference.model)) - plain["model"]
    expected_hooks = _hooks_by_type(reference)
    for sub_name, sub in module.named_modules():
        assert {_hooks(sub)} == expected_hooks.get(type(sub), {(0,) * len(HOOK_DICTS)}), sub_name
    expected = run_blocks(module, probe_input)[0]
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert torch.equal(run_blocks(clone, probe_input)[0], expected)
        assert [e.to_dict() for e in event_log(clone)] == [e.to_dict() for e in log]

    # load_grown replays the growth and the fold on a freshly built bare model: the fitted weights and outputs.
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    torch.manual_seed(0)  # other starting weights: everything must come from the checkpoint
    fresh = load_grown(family.build(), tmp_path / "final.ckpt")
    assert tensor_hash(fresh) == tensor_hash(module.model) and ramp_traces(fresh) == []
    fresh.eval()
    module.model.eval()
    with torch.no_grad():
        if family.task == "image":
            assert torch.equal(fresh(probe_input), module.model(probe_input))
        else:
            assert torch.equal(fresh(**probe_input).logits, module.model(**probe_input).logits)

    if family.task != "image":
        # What Hugging Face users do with a trained model: save_pretrained, from_pretrained (config depth 6).
        module.model.save_pretrained(tmp_path / "hf")
        reloaded = type(module.model).from_pretrained(tmp_path / "hf").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(**probe_input).logits, module.model(**probe_input).logits)

    if family.task == "lm":
        (stack_path,) = [p.removeprefix("model.") for p in family.grown]
        for hf in (module.model, fresh):
            _check_decoder_bookkeeping(hf, stack_path)
        ids = probe_input["input_ids"][:, :5]
        assert torch.equal(_check_generation(module.model, ids), _check_generation(fresh, ids))


# ---------------------------------------------------------------------------------------------- refused, untouched


def _gpt2_inverse_scaled() -> nn.Module:
    t = _transformers()
    config = t.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, scale_attn_by_inverse_layer_idx=True
    )
    return t.GPT2LMHeadModel(config)


def _untouched(module: Lit, start: str) -> None:
    assert tensor_hash(module) == start and event_log(module) == []
    assert module.model.config.num_hidden_layers == len(module.model.transformer.h) == 2
    assert [block.attn.layer_idx for block in module.model.transformer.h] == [0, 1]
    assert ramp_traces(module) == [] and module._forward_pre_hooks == {}


def test_gpt2_scaled_by_inverse_layer_idx_is_refused_by_every_operator_with_the_module_untouched(
    tmp_path: Path,
) -> None:
    # Its attention scale 1 / (layer_idx + 1) is fixed when a layer is built: a copy at another position computes
    # what no layer of a model rebuilt from the grown config computes there. Growing it used to succeed, and the
    # grown model then came back from save_pretrained / from_pretrained computing something else.
    batches = [_batch("lm", i) for i in range(BATCHES)]
    torch.manual_seed(1234)
    module = Lit(_gpt2_inverse_scaled(), "lm", example=False)
    start = tensor_hash(module)
    # The default (ramped stacking): the trial on the input recorded at the first batch refuses, before any update.
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[DepthGrowth()], default_root_dir=tmp_path)
    with pytest.raises(FunctionNotPreservedError, match=r"scale_attn_by_inverse_layer_idx=True"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    assert trainer.global_step == 0
    _untouched(module, start)
    # The paper's zero-init blocks, with an example input: refused in setup.
    module.example_input_array = _model_input("lm", 1000)
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[DepthGrowth.paper()], default_root_dir=tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"scale_attn_by_inverse_layer_idx=True"):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    _untouched(module, start)
    # The surgery itself, for every insertion: all undone.
    with pytest.raises(UnsupportedModelError, match=r"scale_attn_by_inverse_layer_idx=True"):
        stack_blocks(module, "model.transformer.h", factor=3, ramp_steps=4)
    _untouched(module, start)


def test_copies_and_stacking_keep_timm_per_block_feature_info_in_step() -> None:
    # timm ViT/Eva/DeiT list one feature_info entry per block (``blocks.i``). Zero-init insertions kept it in step;
    # the copy operators (the default's stacking) left 2 entries for 6 blocks.
    from timm.models.vision_transformer import VisionTransformer

    from lightning_depthgrow.surgery import copy_block

    def vit() -> nn.Module:
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)

    model = vit()
    entry = {k: v for k, v in model.feature_info[0].items() if k != "module"}
    stack_blocks(model, "blocks", factor=3, ramp_steps=4)
    assert [info["module"] for info in model.feature_info] == [f"blocks.{i}" for i in range(6)]
    assert all({k: v for k, v in info.items() if k != "module"} == entry for info in model.feature_info)
    interleaved = vit()
    stack_blocks(interleaved, "blocks", factor=2, order="interleave")
    copy_block(interleaved, "blocks", source=0, after_index=0, ramp_steps=2)
    assert [info["module"] for info in interleaved.feature_info] == [f"blocks.{i}" for i in range(5)]
    # A stacking refused half-way (a user adapter whose bookkeeping allows at most 4 blocks) is undone whole,
    # feature_info included.
    from timm.models.vision_transformer import Block

    def at_most_four(model: nn.Module, stack: Any, change: Any) -> None:
        if len(stack) > 4:
            raise UnsupportedModelError("at most 4 blocks")

    register_block(Block, zero_init=["attn.proj", "mlp.fc2"], on_depth_change=at_most_four)
    try:
        untouched = vit()
        with pytest.raises(UnsupportedModelError, match="at most 4"):
            stack_blocks(untouched, "blocks", factor=3, ramp_steps=4)
    finally:
        unregister_block(Block)
    assert len(untouched.blocks) == 2
    assert [info["module"] for info in untouched.feature_info] == ["blocks.0", "blocks.1"]


def test_gpt2_resumes_mid_ramp_bitwise_without_an_example_input(tmp_path: Path) -> None:
    # 5 epochs of 5 batches: growth after step round(25 / 3) = 8, a ramp of round(0.12 * 25) = 3 steps folded after
    # step 11; the checkpoint at the end of epoch 1 (step 10) holds the 6 layers with their ramps at 2 / 3. The resumed
    # run replays the stacking on a freshly built GPT-2 (config depth, layer_idx), loads the ramps' state and ends
    # bitwise where the uninterrupted run ended. (Epochs, not max_steps: Lightning resumes an epoch-end checkpoint
    # of a max_steps run one batch index off.)
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = _transformers()
    config = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # Lightning does not restore torch's RNG
    batches = [_batch("lm", i) for i in range(5)]

    def run(directory: Path, seed: int, ckpt_path: Path | None = None) -> Lit:
        torch.manual_seed(seed)
        module = Lit(t.GPT2LMHeadModel(t.GPT2Config(**config, **no_dropout)), "lm", example=False)
        saver = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(
            max_epochs=5, callbacks=[DepthGrowth(), saver], enable_checkpointing=True, deterministic=True
        )
        trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
        return module

    full = run(tmp_path / "full", seed=0)
    assert [(e.kind, e.step) for e in event_log(full)] == [("stack_blocks", 8), ("fold_ramps", 11)]
    mid = tmp_path / "full" / "epoch=1.ckpt"
    state = torch.load(mid, weights_only=False)
    assert state["state_dict"][f"model.transformer.h.5.{RAMP_BUFFER}"].tolist() == [2, 3]
    resumed = run(tmp_path / "resumed", seed=123, ckpt_path=mid)  # other weights: all from the checkpoint
    assert [e.to_dict() for e in event_log(resumed)] == [e.to_dict() for e in event_log(full)]
    assert tensor_hash(resumed) == tensor_hash(full)
    _check_decoder_bookkeeping(resumed.model, "transformer.h")
    assert ramp_traces(resumed) == [] and resumed._forward_pre_hooks == {}


class PaddedEncoder(pl.LightningModule):
    """A post-LayerNorm ``nn.TransformerEncoder`` as torch builds it by default (``enable_nested_tensor=True``) over
    padded batches: in eval mode without gradients it packs each batch into a nested tensor between its layers."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)  # norm_first=False
        self.encoder, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(16, 4)
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=mask))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, mask, y = batch
        return F.cross_entropy(self(x, mask)[:, 0], y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, mask, _ = batch
        nested: list[bool] = []
        hook = self.encoder.layers[-1].register_forward_pre_hook(lambda m, args: nested.append(args[0].is_nested))
        packed = self(x, mask)  # the packed (nested) path
        hook.remove()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            plain = self(x, mask)  # the same batch, padded all the way
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        self.seen[self.trainer.global_step] = (packed, plain, mask, nested[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _padded_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = _seeded(seed)
    batches = []
    for _ in range(n):
        mask = torch.zeros(4, 6, dtype=torch.bool)
        mask[1, -2:], mask[2, -4:] = True, True  # padding at the end of some rows
        batches.append((torch.randn(4, 6, 16, generator=g), mask, torch.randint(0, 4, (4,), generator=g)))
    return batches


def test_validation_mid_ramp_on_a_packed_transformer_encoder_batch(tmp_path: Path) -> None:
    # Validation after step 7, halfway through the ramp (growth after step 6, fold after step 8): the encoder packs
    # the padded batch into a nested tensor, which the ramp used to refuse ("NestedTensorImpl doesn't support
    # sizes"), stopping training. The packed path must compute what the padded path computes.
    torch.manual_seed(0)
    module = PaddedEncoder()
    trainer = quiet_trainer(max_steps=STEPS, val_check_interval=7, callbacks=[DepthGrowth()], default_root_dir=tmp_path)
    train, val = (DataLoader(_padded_batches(n, seed), batch_size=None) for n, seed in ((BATCHES, 0), (2, 1)))
    trainer.fit(module, train, val)
    assert [(e.kind, e.step) for e in event_log(module)] == [("stack_blocks", GROW_AT), ("fold_ramps", FOLD_AT)]
    packed, plain, mask, nested = module.seen[GROW_AT + 1]
    assert nested and len(module.encoder.layers) == 6, "validation mid-ramp should run the packed path"
    assert _moved(packed[~mask], plain[~mask]) <= TOLERANCE
