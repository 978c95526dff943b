"""The support matrix: every model family x CurvatureMonitor / DepthGrowth (zero-init, ramped copies) /
NeuronGrowth / DMS, observed.

Each family is a real model class (timm, Hugging Face transformers, torchvision, ``torch.nn``, a user block
registered with ``register_block``, a model with no known block) built from a tiny config with random init,
wrapped in a plain LightningModule with an example input. For every cell the test runs the library's own code
path, the callbacks' ``setup`` and change step on an unfitted ``Trainer`` (no ``fit``: the per-family
``Trainer.fit`` tests are ``tests/test_adapters_fit.py`` and ``tests/test_dms_fit.py``), and records what it
observed:

- ``CurvatureMonitor``: the blocks it finds (or the warning of its per-child fallback) and a Hutchinson estimate
  on one batch, finite for every block.
- ``DepthGrowth``: its setup check (structural checks, a verified trial insertion), then one growth step; the test
  itself checks that the outputs in eval mode moved by at most ``1e-5 x max(1, max |before|)`` and that every block
  runs. A refusal must leave the module exactly as it was. ``DepthGrowth (ramp)``: the same with
  ``operator="copy", ramp_steps=4`` (a trained copy entering through a residual ramp). ``DepthGrowth()``: the
  defaults (G_stack: every growable stack made 3x deeper at once, ``final_budget=3.0``, the copies ramping in),
  with ``ramp_steps=4`` given as a step count (the default ``0.12`` is a fraction of the run's optimizer steps, and
  an unfitted ``Trainer`` has no run length); the same checks, and every grown stack is exactly 3x deeper.
- ``NeuronGrowth``: the layers it finds by itself (timm ``Mlp.fc1``), else the family's natural MLP layer passed as
  ``layers=``; the splitting eigenvalues are estimated on one batch and one neuron branch (at the most negative
  eigenvalue) is applied as the callback applies it (outputs unchanged), or the refusal is recorded.
- ``DifferentiableModelScaling(target=0.5)``: its setup (gate discovery, resource model, attach), one search step
  (the task loss's backward through the gates, the importance update) and its export; the exported model's FLOPs
  are counted with ``FlopCounterMode`` and compared with the target (within 5%).

The outcomes (``supported``, ``refused`` with the first sentence of the message, ...) must equal the committed
``docs/support_matrix.json``, and the table between ``<!-- support-matrix:start -->`` and
``<!-- support-matrix:end -->`` in ``docs/adapters.md`` must equal the one rendered from that JSON. When a change
of the library changes an outcome, regenerate both (and review the diff) with::

    PYTHONPATH=$PWD python -m tests.test_support_matrix --write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn

from lightning_depthgrow import find_block_stacks, register_block
from lightning_depthgrow.adapters import UnsupportedModelError, unregister_block
from lightning_depthgrow.callbacks import CurvatureMonitor, DepthGrowth, DifferentiableModelScaling, NeuronGrowth
from lightning_depthgrow.callbacks.plumbing import apply_and_sync
from lightning_depthgrow.dms import discover_gates, find_gates, update_importance
from lightning_depthgrow.events import ArchitectureEvent

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MATRIX_JSON = ROOT / "docs" / "support_matrix.json"
ADAPTERS_MD = ROOT / "docs" / "adapters.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
REGENERATE = "PYTHONPATH=$PWD python -m tests.test_support_matrix --write"
COLUMNS = ("CurvatureMonitor", "DepthGrowth", "DepthGrowth (ramp)", "DepthGrowth()", "NeuronGrowth", "DMS")
TOLERANCE = 1e-5  # DepthGrowth's promise: max |after - before| <= TOLERANCE * max(1, max |before|)
DMS_TARGET = 0.5


# ---------------------------------------------------------------------------------------------- the families


@dataclass
class Family:
    """One row: how to build the model (tiny config, random init) and its example input.

    ``neuron_layers``: the family's natural ``{linear: activation}`` pair (relative to the model) for
    ``NeuronGrowth(layers=...)`` when it finds none by itself. ``registered``: a context manager that registers
    the family's block type for the duration of a cell (a user's ``register_block``).
    """

    key: str
    label: str
    build: Callable[[], tuple[nn.Module, Any]]
    neuron_layers: dict[str, str] | None = None
    registered: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def _image(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def _tokens(vocab: int = 64, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(5))


def _timm_vit() -> tuple[nn.Module, Any]:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4), _image(16)


def _timm_deit() -> tuple[nn.Module, Any]:
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)
    return model, _image(16)


def _timm_resnet(act: str) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        from timm.models.resnet import BasicBlock, ResNet

        model = ResNet(
            BasicBlock,
            layers=(2, 2, 2, 2),
            channels=(8, 16, 32, 64),
            stem_width=8,
            num_classes=4,
            act_layer=act,
            zero_init_last=False,  # timm zeroes each block's last norm: every block would start as an identity
        )
        return model, _image(32)

    return build


def _timm_convnext() -> tuple[nn.Module, Any]:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(2, 2, 2, 2), dims=(8, 16, 32, 64), num_classes=4), _image(32)


def _timm_eva(post_norm: bool) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        from timm.models.eva import Eva

        model = Eva(
            img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4, use_post_norm=post_norm
        )
        return model, _image(16)

    return build


def _timm_swin() -> tuple[nn.Module, Any]:
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 2), num_classes=4
    )
    return model, _image(16)


def _timm_efficientnet() -> tuple[nn.Module, Any]:
    model = timm.create_model("tinynet_e", pretrained=False, num_classes=4)  # an EfficientNet, 0.35 wide
    return model, _image(32)


def _timm_mobilenetv3() -> tuple[nn.Module, Any]:
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4)
    return model, _image(32)


def _hf() -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


_DECODER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)


def _hf_gpt2() -> tuple[nn.Module, Any]:
    t = _hf()
    config = t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return t.GPT2LMHeadModel(config), {"input_ids": _tokens()}


def _hf_decoder(name: str) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        t = _hf()
        config = getattr(t, f"{name}Config")(num_key_value_heads=1, **_DECODER)
        return getattr(t, f"{name}ForCausalLM")(config), {"input_ids": _tokens()}

    return build


def _hf_vit() -> tuple[nn.Module, Any]:
    t = _hf()
    config = t.ViTConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        num_labels=4,
    )
    return t.ViTForImageClassification(config), {"pixel_values": _image(16)}


def _hf_bert() -> tuple[nn.Module, Any]:
    t = _hf()
    config = t.BertConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return t.BertModel(config), {"input_ids": _tokens()}


def _tv() -> Any:
    return pytest.importorskip("torchvision")


def _tv_resnet() -> tuple[nn.Module, Any]:
    from torchvision.models.resnet import BasicBlock, ResNet

    _tv()
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=4), _image(32)


def _tv_vit() -> tuple[nn.Module, Any]:
    tv = _tv()
    model = tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: the outputs would not see the blocks
    return model, _image(16)


def _torch_encoder(norm_first: bool) -> Callable[[], tuple[nn.Module, Any]]:
    def build() -> tuple[nn.Module, Any]:
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return model, torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5))

    return build


def _torch_decoder() -> tuple[nn.Module, Any]:
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerDecoder(layer, 2)
    g = torch.Generator().manual_seed(5)
    return model, (torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g))


class UserBlock(nn.Module):
    """A user's pre-norm block: ``x + mlp(norm(x))`` with a GELU MLP (``fc``, ``act``, ``proj``)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm, self.fc, self.act, self.proj = (
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.act(self.fc(self.norm(x))))


class UserNet(nn.Module):
    """An embedding, a ``blocks`` Sequential of :class:`UserBlock`, a head."""

    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.Sequential(*(UserBlock(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


@contextlib.contextmanager
def _user_block_registered() -> Iterator[None]:
    register_block(UserBlock, zero_init=["proj"], name="UserBlock")
    try:
        yield
    finally:
        unregister_block(UserBlock)


def _user_net() -> tuple[nn.Module, Any]:
    return UserNet(), torch.randn(4, 8, generator=torch.Generator().manual_seed(5))


def _plain_mlp() -> tuple[nn.Module, Any]:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.randn(4, 8, generator=torch.Generator().manual_seed(5))


FAMILIES = [
    Family("timm_vit", "timm ViT", _timm_vit),
    Family("timm_deit", "timm DeiT (distilled)", _timm_deit),
    Family("timm_resnet_relu", "timm ResNet (ReLU)", _timm_resnet("relu")),
    Family("timm_resnet_silu", "timm ResNet (SiLU)", _timm_resnet("silu")),
    Family("timm_convnext", "timm ConvNeXt", _timm_convnext),
    Family("timm_eva", "timm Eva", _timm_eva(False)),
    Family("timm_eva_post_norm", "timm Eva (`use_post_norm=True`)", _timm_eva(True)),
    Family("timm_swin", "timm Swin", _timm_swin),
    Family("timm_efficientnet", "timm EfficientNet", _timm_efficientnet),
    Family("timm_mobilenetv3", "timm MobileNetV3", _timm_mobilenetv3),
    Family("hf_gpt2", "HF GPT-2", _hf_gpt2, {"transformer.h.0.mlp.c_fc": "transformer.h.0.mlp.act"}),
    Family("hf_llama", "HF Llama", _hf_decoder("Llama"), {"model.layers.0.mlp.gate_proj": "model.layers.0.mlp.act_fn"}),
    Family(
        "hf_mistral",
        "HF Mistral",
        _hf_decoder("Mistral"),
        {"model.layers.0.mlp.gate_proj": "model.layers.0.mlp.act_fn"},
    ),
    Family("hf_qwen2", "HF Qwen2", _hf_decoder("Qwen2"), {"model.layers.0.mlp.gate_proj": "model.layers.0.mlp.act_fn"}),
    Family(
        "hf_vit",
        "HF ViT",
        _hf_vit,
        {"vit.layers.0.mlp.fc1": "vit.layers.0.mlp.activation_fn"},
    ),
    Family(
        "hf_bert",
        "HF BERT",
        _hf_bert,
        {"encoder.layer.0.intermediate.dense": "encoder.layer.0.intermediate.intermediate_act_fn"},
    ),
    Family("tv_resnet", "torchvision ResNet", _tv_resnet),
    Family(
        "tv_vit",
        "torchvision ViT",
        _tv_vit,
        {"encoder.layers.encoder_layer_0.mlp.0": "encoder.layers.encoder_layer_0.mlp.1"},
    ),
    Family("torch_encoder_pre_ln", "`nn.TransformerEncoder` (`norm_first=True`)", _torch_encoder(True)),
    Family("torch_encoder_post_ln", "`nn.TransformerEncoder` (`norm_first=False`)", _torch_encoder(False)),
    Family("torch_decoder", "`nn.TransformerDecoder` (`norm_first=True`)", _torch_decoder),
    Family(
        "user_block",
        "your block, `register_block(UserBlock, zero_init=['proj'])`",
        _user_net,
        {"blocks.0.fc": "blocks.0.act"},
        registered=_user_block_registered,
    ),
    Family("no_known_block", "no known block (an `nn.Sequential` MLP)", _plain_mlp, {"0": "1"}),
]


# ---------------------------------------------------------------------------------------------- the module


class LitModel(pl.LightningModule):
    """The user's model as a LightningModule: ``forward`` calls it, the loss is the mean square of its main output."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = example

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return _tensors(_call(self, batch))[0].float().pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _call(module: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, (tuple, list)):
        return module(*x)
    return module(x)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The top-level floating-point tensors of a model output (a tensor, a tuple, a Hugging Face ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def _eval_run(module: nn.Module, example: Any) -> tuple[list[torch.Tensor], set[str], set[str]]:
    """Outputs in eval mode without gradients, the block names that ran and all block names (modes restored)."""
    blocks = {s.block_name(i): b for s in find_block_stacks(module) for i, b in enumerate(s.blocks)}
    ran: set[str] = set()
    handles = [b.register_forward_pre_hook(lambda *_, n=n: ran.add(n)) for n, b in blocks.items()]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            torch.manual_seed(0)
            out = [t.clone() for t in _tensors(_call(module, example))]
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return out, ran, set(blocks)


def _moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """``max |after - before| / max(1, max |before|)`` over the outputs (inf if their shapes differ)."""
    if [t.shape for t in before] != [t.shape for t in after]:
        return float("inf")
    scale = max([1.0, *(float(b.abs().max()) for b in before)])
    return max(float((a - b).abs().max()) for a, b in zip(after, before)) / scale


def _fingerprint(module: nn.Module) -> tuple[list[str], list[tuple[str, bytes]]]:
    return [n for n, _ in module.named_modules()], [(k, v.numpy().tobytes()) for k, v in module.state_dict().items()]


def first_sentence(message: str) -> str:
    """The first sentence of a message (up to a full stop and a space that do not end "e.g." or "i.e.")."""
    return re.split(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+", " ".join(str(message).split()), maxsplit=1)[0]


def _strip(path: str) -> str:
    return path.removeprefix("model.")


def _outcome(status: str, detail: str = "", message: str = "") -> dict[str, str]:
    return {"status": status, "detail": detail, "message": first_sentence(message) if message else ""}


def _refused(
    module: LitModel,
    callback: pl.Callback,
    trainer: pl.Trainer,
    err: BaseException,
    before: Any,
    status: str = "refused",
) -> dict[str, str]:
    """What Lightning does when setup raises, then check that the refusal left the module as it was."""
    callback.on_exception(trainer, module, err)
    callback.teardown(trainer, module, "fit")
    assert _fingerprint(module) == before, f"{type(callback).__name__} refused but changed the module: {err}"
    assert not module._load_state_dict_pre_hooks, "a refused callback left a hook on the module"
    return _outcome(status, message=str(err))


def _check_nothing_left(module: LitModel) -> None:
    assert not module._load_state_dict_pre_hooks, "a callback left a load_state_dict hook on the module after fit"


REFUSALS = (UnsupportedModelError, ValueError, RuntimeError)


# ---------------------------------------------------------------------------------------------- the columns


def observe_curvature(module: LitModel, family: Family) -> dict[str, str]:
    """CurvatureMonitor: the blocks it finds (or its per-child fallback and warning), one estimate on one batch."""
    trainer, monitor = _trainer(), CurvatureMonitor(num_probes=2, log=False)
    stacks = find_block_stacks(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            monitor.setup(trainer, module, "fit")
        except REFUSALS as err:
            return _outcome("refused", message=str(err))
    monitor.on_train_batch_end(trainer, module, None, module.example_input_array, 0)
    estimate = monitor.estimate_now(trainer, module)
    monitor.teardown(trainer, module, "fit")
    if not estimate.valid:
        return _outcome("no estimate", message=str(estimate.invalid_reason))
    blocks = [name for name in estimate.trace_per_param if name not in ("stem", "head", "other")]
    assert all(torch.isfinite(torch.tensor(float(estimate.trace_per_param[b]))) for b in blocks)
    if stacks:
        paths = ", ".join(f"`{_strip(s.path)}`" for s in stacks)
        assert len(blocks) == sum(len(s) for s in stacks)
        return _outcome("supported", f"{len(blocks)} blocks in {paths}")
    fallback = [w for w in caught if issubclass(w.category, UserWarning) and "block" in str(w.message)]
    assert fallback, "a model without registered blocks must be reported per child *with a warning*"
    return _outcome("fallback", ", ".join(f"`{_strip(b)}`" for b in blocks), str(fallback[0].message))


def observe_depth_growth(
    module: LitModel, family: Family, growth: DepthGrowth | None = None, **operator: Any
) -> dict[str, str]:
    """DepthGrowth: setup's check (structure, a verified trial insertion), then one growth step, checked here."""
    trainer = _trainer()
    # One block per stack (max_per_stack=1), as many stacks as fit: no count limit per step, only the size limit.
    growth = growth or DepthGrowth(
        final_budget=8.0,
        placement="uniform",
        blocks_per_step=None,
        step_budget=7.0,
        max_per_stack=1,
        warmup_epochs=1,
        **{"operator": "zero_init", **operator},  # the paper's zero-init blocks unless the caller names another
    )
    before_state = _fingerprint(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            growth.setup(trainer, module, "fit")
        except REFUSALS as err:
            return _refused(module, growth, trainer, err, before_state)
    left_out = [str(w.message) for w in caught if "not growing block stack" in str(w.message)]
    depth = {s.path: len(s) for s in find_block_stacks(module)}
    before, ran, blocks = _eval_run(module, module.example_input_array)
    assert ran == blocks, f"blocks {sorted(blocks - ran)} do not run before growth"
    try:
        events = growth.change_now(trainer, module)
    except REFUSALS as err:  # a step refused by its verification: the module must be as it was
        return _refused(module, growth, trainer, err, before_state)
    growth.teardown(trainer, module, "fit")
    _check_nothing_left(module)
    after, ran, blocks = _eval_run(module, module.example_input_array)
    grown = [path for path, n in ((s.path, len(s)) for s in find_block_stacks(module)) if n > depth.get(path, n)]
    assert events and grown, "DepthGrowth accepted the model but did not grow it"
    assert ran == blocks, f"blocks {sorted(blocks - ran)} do not run after growth"
    moved = _moved(before, after)
    assert moved <= TOLERANCE, f"growth moved the outputs by {moved:.3g} (relative), more than {TOLERANCE}"
    detail = f"grew {len(grown)} of {len(depth)} stacks ({', '.join(f'`{_strip(p)}`' for p in grown)})"
    if growth.operator == "stack":
        now = {s.path: len(s) for s in find_block_stacks(module)}
        starts = {e.spec["stack"]: e.spec.get("start", 0) for e in events if e.kind == "stack_blocks"}
        assert set(starts) == set(grown), f"stack events {sorted(starts)}, grown stacks {grown}"
        assert all(now[p] == starts[p] + growth.factor * (depth[p] - starts[p]) for p in grown), (
            f"stacked {depth} -> {now} (tails from {starts})"
        )
        tails = [_strip(p) for p in grown if starts[p]]
        detail = detail.replace(" stacks (", f" stacks {growth.factor}x deeper (", 1)
        if tails:
            detail += f"; of {', '.join(f'`{t}`' for t in tails)} the shape-preserving tail"
    return _outcome("supported", detail, left_out[0] if left_out else "")


def observe_ramped_copy(module: LitModel, family: Family) -> dict[str, str]:
    """DepthGrowth(operator="copy", ramp_steps=4): a trained copy entering through a residual ramp (``a = 0`` at
    birth), the growth step verified on a trial copy of the module; the same checks as :func:`observe_depth_growth`."""
    return observe_depth_growth(module, family, operator="copy", ramp_steps=4)


def observe_default(module: LitModel, family: Family) -> dict[str, str]:
    """``DepthGrowth()``, the defaults (G_stack, 3x deeper, ramped copies) with the ramp given in steps (an unfitted
    Trainer has no run length to take 12% of); the same checks as :func:`observe_depth_growth`."""
    growth = DepthGrowth(ramp_steps=4)
    assert (growth.operator, growth.factor, growth.final_budget, growth.placement) == ("stack", 3, 3.0, "uniform")
    return observe_depth_growth(module, family, growth)


def observe_neuron_growth(module: LitModel, family: Family) -> dict[str, str]:
    """NeuronGrowth: the layers it finds (else the family's MLP as ``layers=``), an estimate and one branch."""
    trainer, before_state = _trainer(), _fingerprint(module)
    growth = NeuronGrowth(step_budget=0.5, warmup_epochs=1)
    how = "found"
    try:
        growth.setup(trainer, module, "fit")
    except REFUSALS as err:
        _refused(module, growth, trainer, err, before_state)
        if family.neuron_layers is None:
            return _outcome("refused", message=str(err))
        layers = {f"model.{k}": f"model.{v}" for k, v in family.neuron_layers.items()}
        growth, how = NeuronGrowth(step_budget=0.5, warmup_epochs=1, layers=layers), "layers"
        try:
            growth.setup(trainer, module, "fit")
        except REFUSALS as err:
            return _refused(module, growth, trainer, err, before_state)
    growth.observe_batch(trainer, module, None, module.example_input_array, 0)
    eigenvalues = growth.estimate(trainer, module)
    assert eigenvalues and all(torch.isfinite(torch.tensor(v)).all() for v in eigenvalues.values())
    layer = next(iter(eigenvalues))
    neuron = int(torch.tensor(eigenvalues[layer]).argmin())
    before, _, _ = _eval_run(module, module.example_input_array)
    apply_and_sync(trainer, module, ArchitectureEvent("neuron_branch", {"linear": layer, "neurons": [neuron]}))
    growth.teardown(trainer, module, "fit")
    _check_nothing_left(module)
    after, _, _ = _eval_run(module, module.example_input_array)
    assert _moved(before, after) <= TOLERANCE, "a neuron branch changed the outputs"
    if how == "found":
        return _outcome("supported", f"{len(eigenvalues)} timm `Mlp.fc1` layers found")
    pairs = ", ".join(f"'{k}': '{v}'" for k, v in family.neuron_layers.items())
    return _outcome("with layers=", f"`{{{pairs}}}`")


def flops(module: nn.Module, example: Any) -> int:
    """Forward FLOPs by torch's ``FlopCounterMode`` (math attention kernel, eval mode), independent of DMS's own count.

    Gradients stay enabled: under ``no_grad`` ``nn.TransformerEncoderLayer`` takes its fused fast path, which the
    counter does not see.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            _call(module, example)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return int(counter.get_total_flops())


def observe_dms(module: LitModel, family: Family) -> dict[str, str]:
    """DifferentiableModelScaling(target=0.5): setup (discovery, resource model, attach), one search step, export.

    The search step is what the callback does at every training step, without the optimizer: the task loss's
    backward through the gates and :func:`~lightning_depthgrow.dms.update_importance` (the importances rank the
    elements; untouched gates keep everything). The export then fits depth and widths to the target.
    """
    trainer, before_state = _trainer(), _fingerprint(module)
    dms = DifferentiableModelScaling(target=DMS_TARGET, search_epochs=1)
    example = module.example_input_array
    full = flops(module, example)
    try:
        dms.setup(trainer, module, "fit")
    except REFUSALS as err:
        # A ValueError that is not an UnsupportedModelError: the gates attach, but the target is below their reach.
        if isinstance(err, ValueError) and not isinstance(err, UnsupportedModelError):
            outcome = _refused(module, dms, trainer, err, before_state, "out of reach")
            kinds = sorted({spec["kind"] for spec in discover_gates(module, True, True, True)})
            return {**outcome, "detail": f"{', '.join(kinds)} gates"}
        return _refused(module, dms, trainer, err, before_state)
    gates = find_gates(module)
    kinds = sorted({spec["kind"] for spec in gates.specs})
    module.train()
    module.training_step(example, 0).backward()
    assert update_importance(gates.bank), "the search step's gradients did not reach the gates"
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = dms.change_now(trainer, module)
    dms.teardown(trainer, module, "fit")
    _check_nothing_left(module)
    assert events and find_gates(module) is None, "DMS attached its gates but did not export"
    out, _, _ = _eval_run(module, example)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    ratio = flops(module, example) / full
    gates_text = f"{', '.join(kinds)} gates"
    if abs(ratio / DMS_TARGET - 1) <= 0.05:
        return _outcome("supported", f"{gates_text}; exported within 5% of the FLOPs target")
    missed = [str(w.message) for w in caught]
    return _outcome("target missed", f"{gates_text}; exported {ratio:.2f} of the FLOPs", missed[0] if missed else "")


OBSERVERS = {
    "CurvatureMonitor": observe_curvature,
    "DepthGrowth": observe_depth_growth,
    "DepthGrowth (ramp)": observe_ramped_copy,
    "DepthGrowth()": observe_default,
    "NeuronGrowth": observe_neuron_growth,
    "DMS": observe_dms,
}


def observe(family: Family, column: str) -> dict[str, str]:
    """Build the family's model afresh and observe one cell.

    The construction seed differs from the insertion's (``seed=0``): a block re-initialised from the seed the model
    was built with would get its template's very weights (and the library would warn that they were copied).
    """
    with family.registered():
        torch.manual_seed(1234)
        model, example = family.build()
        return OBSERVERS[column](LitModel(model, example), family)


def observe_family(family: Family) -> dict[str, dict[str, str]]:
    return {column: observe(family, column) for column in COLUMNS}


# ---------------------------------------------------------------------------------------------- JSON and table

STATUS_TEXT = {
    "supported": "yes",
    "fallback": "per child module, with a warning",
    "no estimate": "**no estimate**",
    "with layers=": "yes, with `layers=`",
    "refused": "**refused**",
    "out of reach": f"**target {DMS_TARGET:g} out of reach**",
    "target missed": f"**target {DMS_TARGET:g} missed**",
}
HEADERS = {
    "CurvatureMonitor": "CurvatureMonitor",
    "DepthGrowth": "DepthGrowth",
    "DepthGrowth (ramp)": 'DepthGrowth, ramped copies (`operator="copy"`)',
    "DepthGrowth()": "`DepthGrowth()` (default: 3x stacking, ramped)",
    "NeuronGrowth": "NeuronGrowth",
    "DMS": f"DMS (`target={DMS_TARGET:g}`)",
}


def observe_all(families: list[Family] = FAMILIES) -> dict[str, Any]:
    """Observe every cell; the JSON document ``docs/support_matrix.json`` holds."""
    rows = [{"key": f.key, "family": f.label, **observe_family(f)} for f in families]
    return {"regenerate": REGENERATE, "columns": list(COLUMNS), "families": rows}


def render(matrix: dict[str, Any]) -> str:
    """The markdown table (and its numbered messages) for ``docs/adapters.md``, from the JSON document."""
    columns = matrix["columns"]
    lines = [
        f"<!-- generated from docs/support_matrix.json by tests/test_support_matrix.py; do not edit: {REGENERATE} -->",
        "",
        "| family | " + " | ".join(HEADERS[c] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    notes: list[str] = []  # each distinct message once, numbered in order of first use
    for row in matrix["families"]:
        cells = []
        for column in columns:
            cell = row[column]
            text = STATUS_TEXT[cell["status"]]
            if cell["detail"]:
                text += f": {cell['detail']}"
            if cell["message"]:
                if cell["message"] not in notes:
                    notes.append(cell["message"])
                text += f" [{notes.index(cell['message']) + 1}]"
            cells.append(text.replace("|", "\\|"))
        lines.append(f"| {row['family']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"{i}. {note}" for i, note in enumerate(notes, 1))
    return "\n".join(lines)


def docs_section(text: str) -> str:
    """What ``docs/adapters.md`` holds between the markers (stripped)."""
    if START not in text or END not in text:
        raise AssertionError(f"docs/adapters.md lacks the markers {START} ... {END}")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def write(matrix: dict[str, Any]) -> None:
    """Write ``docs/support_matrix.json`` and the table in ``docs/adapters.md``."""
    MATRIX_JSON.write_text(json.dumps(matrix, indent=2, ensure_ascii=False) + "\n")
    text = ADAPTERS_MD.read_text()
    old = text.split(START, 1)[1].split(END, 1)[0] if START in text and END in text else None
    if old is None:
        raise SystemExit(f"docs/adapters.md lacks the markers {START} ... {END}: add them where the table goes.")
    ADAPTERS_MD.write_text(text.replace(START + old + END, f"{START}\n{render(matrix)}\n{END}"))


def committed() -> dict[str, Any]:
    return json.loads(MATRIX_JSON.read_text())


# ---------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def matrix() -> dict[str, Any]:
    return committed()


def _committed_cell(matrix: dict[str, Any], family: Family, column: str) -> dict[str, str] | None:
    row = next((r for r in matrix["families"] if r["key"] == family.key), None)
    return None if row is None else row.get(column)


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("family", FAMILIES, ids=[f.key for f in FAMILIES])
def test_cell(family: Family, column: str, matrix: dict[str, Any]) -> None:
    observed = observe(family, column)
    expected = _committed_cell(matrix, family, column)
    assert observed == expected, (
        f"support matrix cell {family.key} x {column} changed.\n  committed: {expected}\n  observed:  {observed}\n"
        f"If the change is intended, regenerate docs/support_matrix.json and the table in docs/adapters.md with\n"
        f"  {REGENERATE}\nand review the diff."
    )


def test_json_lists_exactly_these_families_and_columns(matrix: dict[str, Any]) -> None:
    assert matrix["columns"] == list(COLUMNS)
    assert [(r["key"], r["family"]) for r in matrix["families"]] == [(f.key, f.label) for f in FAMILIES], (
        f"the families of docs/support_matrix.json differ from FAMILIES; regenerate: {REGENERATE}"
    )


def test_the_table_in_the_docs_is_rendered_from_the_json(matrix: dict[str, Any]) -> None:
    assert docs_section(ADAPTERS_MD.read_text()) == render(matrix).strip(), (
        f"the support matrix in docs/adapters.md is not the one rendered from docs/support_matrix.json; "
        f"regenerate: {REGENERATE}"
    )


def test_first_sentence_keeps_abbreviations_and_paths() -> None:
    message = "Cannot insert model.blocks.0 (e.g. a post-LN block, i.e. LN(x + f(x))). stack 'b': same. Use a ramp."
    assert first_sentence(message) == "Cannot insert model.blocks.0 (e.g. a post-LN block, i.e. LN(x + f(x)))."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Observe the support matrix; --write updates the docs.")
    parser.add_argument("--write", action="store_true", help="write docs/support_matrix.json and docs/adapters.md")
    args = parser.parse_args(argv)
    matrix = observe_all()
    if args.write:
        write(matrix)
        print(f"wrote {MATRIX_JSON.relative_to(ROOT)} and the table in {ADAPTERS_MD.relative_to(ROOT)}")
    else:
        print(render(matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
