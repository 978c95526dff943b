"""DepthGrowth with ramped copies grows the blocks zero-init refuses, inside a real ``Trainer.fit``.

A residual ramp ``x + a * (block(x) - x)`` is the identity at ``a = 0`` for any shape-preserving block, so
``DepthGrowth(operator="copy" | "stack", ramp_steps >= 1)`` grows post-LayerNorm blocks (HF BERT,
``nn.TransformerEncoder`` with ``norm_first=False``, timm Eva ``use_post_norm``) and ResNet blocks with an activation
other than ReLU after the add (timm ResNet with SiLU), which the zero-init operator refuses. Per family and operator:
the outputs (eval mode, the example input) right after the growth step equal those right before it within
``1e-5 x max(1, max |before|)``; every block runs; when the ramp ends it is folded by a ``fold_ramps`` event, the
fold leaves the logits bitwise what the ended ramp computed, and no ramp buffer or hook is left; ``load_grown`` of
the final checkpoint gives the trained model's outputs. One family resumes mid-ramp bitwise. What a ramp cannot fix
(a block that changes the shape, one that modifies its input in place) is still refused at setup, with the module
untouched, and the zero-init operator keeps its refusals.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_depthgrow import find_block_stacks, load_grown, register_block
from lightning_depthgrow.adapters import UnsupportedModelError, unregister_block
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.events import event_log
from lightning_depthgrow.surgery import check_growable
from lightning_depthgrow.surgery.growth import FunctionNotPreservedError
from lightning_depthgrow.surgery.ramp import RAMP_BUFFER, advance_ramps, ramp_traces, ramped_blocks
from tests._helpers import quiet_trainer, tensor_hash

TOLERANCE = 1e-5
BATCHES = 6  # one epoch of 6 optimizer steps: growth after step 2 (at=[1/3]), a ramp of 2 folds after step 4
GROW_AT, RAMP = 2, 2


# ---------------------------------------------------------------------------------------------- the families


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bert() -> tuple[nn.Module, Callable[[int], Any]]:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config), lambda seed: {
        "input_ids": torch.randint(0, 64, (4, 8), generator=_seeded(seed))
    }


def _post_ln_encoder() -> tuple[nn.Module, Callable[[int], Any]]:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return model, lambda seed: torch.randn(4, 5, 16, generator=_seeded(seed))


def _silu_resnet() -> tuple[nn.Module, Callable[[int], Any]]:
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(
        BasicBlock,
        layers=(2, 2, 2, 2),
        channels=(8, 16, 32, 64),
        stem_width=4,
        stem_type="deep",  # 8 channels out of the stem: layer1 keeps the shape throughout, so it can be stacked
        num_classes=4,
        act_layer="silu",
        zero_init_last=False,  # timm zeroes each block's last norm: the blocks would start as identities
    )
    return model, lambda seed: torch.randn(4, 3, 16, 16, generator=_seeded(seed))


def _post_norm_eva() -> tuple[nn.Module, Callable[[int], Any]]:
    from timm.models.eva import Eva

    model = Eva(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4, use_post_norm=True)
    return model, lambda seed: torch.randn(4, 3, 16, 16, generator=_seeded(seed))


FAMILIES = {
    "hf_bert": _bert,
    "torch_post_ln": _post_ln_encoder,
    "timm_resnet_silu": _silu_resnet,
    "timm_eva_post_norm": _post_norm_eva,
}


class LitModel(pl.LightningModule):
    """The user's model in a LightningModule: the main output's mean square as the loss, SGD."""

    def __init__(self, model: nn.Module, batch: Callable[[int], Any]) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = batch(1000)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]  # HF: last_hidden_state

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return _call(self, batch).float().pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _call(module: nn.Module, x: Any) -> torch.Tensor:
    return module(**x) if isinstance(x, dict) else module(x)


def _build(family: str) -> tuple[LitModel, DataLoader]:
    torch.manual_seed(1234)
    model, batch = FAMILIES[family]()
    batches = [batch(i) for i in range(BATCHES)]
    # Each item is already a batch: batch_size=None hands it over as it is, in a fixed order.
    return LitModel(model, batch), DataLoader(batches, batch_size=None)


class Probe(Callback):
    """At every training batch end: the module's eval-mode output on its example input, the blocks that ran, and
    (``keep``) a copy of the module as it is then."""

    def __init__(self, keep: tuple[int, ...] = ()) -> None:
        self.out: dict[int, torch.Tensor] = {}
        self.ran: dict[int, tuple[set[str], set[str]]] = {}
        self.kept: dict[int, pl.LightningModule] = {}
        self.keep = keep

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self.out[step], self.ran[step] = run_blocks(pl_module)
        if step in self.keep:
            self.kept[step] = copy.deepcopy(pl_module)


def run_blocks(module: pl.LightningModule) -> tuple[torch.Tensor, tuple[set[str], set[str]]]:
    """The eval-mode output on the example input, and (blocks that ran, every block of every stack)."""
    ran: set[str] = set()
    blocks = {f"{s.path}.{i}": b for s in find_block_stacks(module) for i, b in enumerate(s.blocks)}
    hooks = [b.register_forward_pre_hook(lambda *_, n=n: ran.add(n)) for n, b in blocks.items()]
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = _call(module, module.example_input_array).clone()
    finally:
        module.train(was)
        for hook in hooks:
            hook.remove()
    return out, (ran, set(blocks))


def _moved(after: torch.Tensor, before: torch.Tensor) -> float:
    return float((after - before).abs().max()) / max(1.0, float(before.abs().max()))


def _growth(operator: str, ramp_steps: int = RAMP) -> DepthGrowth:
    return DepthGrowth(
        final_budget=8.0,
        operator=operator,
        ramp_steps=ramp_steps,
        at=[GROW_AT / BATCHES],
        placement="uniform",
        factor=2 if operator == "stack" else None,
    )


# ---------------------------------------------------------------------------------------------- inside fit


@pytest.mark.parametrize("operator", ["copy", "stack"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ramped_copies_grow_blocks_zero_init_refuses(family: str, operator: str, tmp_path: Path) -> None:
    module, loader = _build(family)
    depth = {s.path: len(s) for s in find_block_stacks(module)}
    fold_at = GROW_AT + RAMP
    before, after = Probe(keep=(fold_at,)), Probe()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = quiet_trainer(
        max_epochs=1, callbacks=[before, _growth(operator), after, saver], enable_checkpointing=True
    )
    trainer.fit(module, loader)

    *grows, fold = event_log(module)  # one stacking per stack (a ResNet stage that downsamples: its tail)
    kind = {"copy": "copy_block", "stack": "stack_blocks"}[operator]
    assert grows and all((grow.kind, grow.step) == (kind, GROW_AT) for grow in grows)
    grown = {s.path: len(s) for s in find_block_stacks(module)}
    assert any(grown[p] > depth[p] for p in depth), f"nothing grew: {depth} -> {grown}"
    # At birth, eval mode: the outputs right after the growth step equal those right before it; every block runs.
    assert _moved(after.out[GROW_AT], before.out[GROW_AT]) <= TOLERANCE
    for probe in (before, after):
        for step, (ran, blocks) in probe.ran.items():
            assert ran == blocks, f"step {step}: blocks {sorted(blocks - ran)} did not run"
    assert len(after.ran[GROW_AT][1]) > len(before.ran[GROW_AT][1])
    # The ramp ends after ramp_steps optimizer steps and is folded by an event at that step...
    assert (fold.kind, fold.step) == ("fold_ramps", fold_at) and fold.spec["blocks"]
    # ...which changes no output: the ended, unfolded ramp (the module kept just before the fold, its ramps moved to
    # their end as DepthGrowth moves them) computes bitwise what the folded module computes.
    unfolded = before.kept[fold_at]
    assert advance_ramps(unfolded) == fold.spec["blocks"]
    assert torch.equal(run_blocks(unfolded)[0], after.out[fold_at])
    # Nothing of the ramps is left: no buffer, no hook, plain state_dict keys.
    assert ramped_blocks(module) == {} and ramp_traces(module) == []
    assert not any(RAMP_BUFFER in key for key in module.state_dict())
    # load_grown of the final checkpoint replays the growth and the fold on a fresh starting model.
    fresh, _ = _build(family)
    load_grown(fresh, tmp_path / "last.ckpt")
    assert ramp_traces(fresh) == [] and tensor_hash(fresh) == tensor_hash(module)
    assert torch.equal(run_blocks(fresh)[0], run_blocks(module)[0])


@pytest.mark.slow
def test_resume_mid_ramp_is_bitwise_and_load_grown_of_the_mid_ramp_checkpoint(tmp_path: Path) -> None:
    # 3 epochs of 6 steps: growth after step 6 (end of epoch 0, at=[1/3]), a ramp of 9 steps across epoch 1's
    # checkpoint (step 12, ramp at 6/9), folded at step 15.
    def run(ckpt_path: str | None, dirpath: Path) -> tuple[LitModel, Probe]:
        module, loader = _build("torch_post_ln")
        growth = DepthGrowth(factor=2, final_budget=8.0, operator="stack", ramp_steps=9, at=[1 / 3])
        saver = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        probe = Probe()
        trainer = quiet_trainer(max_epochs=3, callbacks=[growth, probe, saver], enable_checkpointing=True)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, probe

    full, probe = run(None, tmp_path / "full")
    mid = tmp_path / "full" / "epoch=1.ckpt"
    assert torch.load(mid, weights_only=False)["state_dict"]["model.layers.2.depthgrow_ramp"].tolist() == [6, 9]
    resumed, _ = run(str(mid), tmp_path / "resumed")
    assert [(e.kind, e.step) for e in event_log(resumed)] == [("stack_blocks", 6), ("fold_ramps", 15)]
    assert tensor_hash(resumed) == tensor_hash(full) and ramp_traces(resumed) == []

    # load_grown of the mid-ramp checkpoint: the stacked blocks ramping at 6/9, the outputs of the run at step 12.
    fresh, _ = _build("torch_post_ln")
    load_grown(fresh, mid)
    assert ramped_blocks(fresh) == {"model.layers.2": (6, 9), "model.layers.3": (6, 9)}
    assert torch.equal(run_blocks(fresh)[0], probe.out[12])


# ---------------------------------------------------------------------------------------------- refusals


def test_zero_init_keeps_its_refusal_of_post_layernorm_blocks() -> None:
    module, loader = _build("torch_post_ln")
    start = tensor_hash(module)
    with pytest.raises(UnsupportedModelError, match=r"post-LayerNorm.*ramp_steps >= 1"):
        quiet_trainer(max_epochs=1, callbacks=[DepthGrowth.paper(final_budget=8.0, placement="uniform")]).fit(
            module, loader
        )
    assert tensor_hash(module) == start


class Widen(nn.Module):
    """A residual block that doubles the channels: ``cat([x, x + fc(x)])``. No copy of it can follow it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x + self.fc(x)], dim=-1)


class InPlace(nn.Module):
    """A residual block that scales its *input* in place before using it: a ramp returns that input, changed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return x + self.fc(x)


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(block(4), block(4)) if block is InPlace else nn.Sequential(block(4), block(8))
        self.head = nn.Linear(4 if block is InPlace else 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


@pytest.mark.parametrize(
    ("block", "error", "match"),
    [
        (Widen, UnsupportedModelError, "no shape-preserving block to copy"),
        (InPlace, FunctionNotPreservedError, r"not an identity.*modifies its input in place"),
    ],
)
def test_what_a_ramp_cannot_fix_is_refused_at_setup_with_the_module_untouched(
    block: type[nn.Module], error: type[Exception], match: str
) -> None:
    register_block(block, zero_init=["fc"], is_shape_preserving=lambda b: not isinstance(b, Widen))
    try:
        torch.manual_seed(0)
        net = Net(block)
        x = torch.randn(2, 4)
        with pytest.raises(UnsupportedModelError, match=match):
            check_growable(net, x, ramp_steps=2)
        module = LitModel(net, lambda seed: x)
        start = tensor_hash(module)
        loader = DataLoader([torch.randn(2, 4) for _ in range(2)], batch_size=None)
        trainer = quiet_trainer(max_epochs=1, callbacks=[_growth("copy")])
        with pytest.raises(error, match=match):
            trainer.fit(module, loader)
        assert tensor_hash(module) == start and trainer.global_step == 0 and event_log(module) == []
        assert len(net.blocks) == 2 and ramp_traces(module) == []
    finally:
        unregister_block(block)


class PostNorm(nn.Module):
    """A user's post-LayerNorm block ``LN(x + fc(x))``."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc(x))


def test_a_user_refuse_reason_bars_zero_init_but_not_ramped_copies() -> None:
    from lightning_depthgrow.growth import stack_layouts

    register_block(PostNorm, zero_init=["fc"], refuse=lambda block: "a zeroed copy computes LN(x), not x.")
    try:
        torch.manual_seed(0)
        net = nn.Sequential(PostNorm(), PostNorm())
        x = torch.randn(2, 4)
        with pytest.raises(UnsupportedModelError, match=r"computes LN\(x\), not x"):
            check_growable(net, x)
        assert stack_layouts(net) == []
        start = tensor_hash(net)
        assert check_growable(net, x, ramp_steps=3) == {"": None}
        assert tensor_hash(net) == start and len(net) == 2 and ramp_traces(net) == []  # tried on a deep copy
        (layout,) = stack_layouts(net, ramped=True)
        assert (layout.growable, layout.templates) == ((0, 1), (0, 1))
    finally:
        unregister_block(PostNorm)
