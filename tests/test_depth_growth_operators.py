"""DepthGrowth with the copy / G_stack operators and residual ramps, inside a real Trainer.fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_depthgrow import load_grown
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.events import event_log
from lightning_depthgrow.measure import count_parameters
from lightning_depthgrow.surgery.ramp import ramped_blocks
from tests._helpers import (
    PROBE,
    Classifier,
    Logits,
    RankRecord,
    make_module,
    make_vit,
    quiet_trainer,
    random_loader,
    rank_records,
    tensor_hash,
)


def _params(depth: int) -> int:
    return count_parameters(make_module(depth=depth))


def _fit(growth: DepthGrowth, epochs: int, **trainer_kwargs: Any) -> tuple[pl.LightningModule, Logits, Logits]:
    module = make_module(depth=2, max_epochs=epochs)
    before, after = Logits(), Logits()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[before, growth, after], **trainer_kwargs)
    trainer.fit(module, random_loader())
    return module, before, after


def test_stack_grows_preserving_the_function_and_folds_when_the_ramp_ends() -> None:
    growth = DepthGrowth(
        factor=2, final_budget=_params(4), budget_mode="absolute", operator="stack", ramp_steps=3, warmup_epochs=1
    )
    module, before, after = _fit(growth, epochs=3)
    log = event_log(module)
    assert [e.kind for e in log] == ["stack_blocks", "fold_ramps"]
    grow, fold = log
    assert grow.step == 4 and grow.spec == {"stack": "model.blocks", "factor": 2, "order": "stack", "ramp_steps": 3}
    # Function preserved at birth: the logits right after the growth step equal those right before it.
    torch.testing.assert_close(after.seen[4], before.seen[4], atol=1e-5, rtol=0)
    assert len(module.model.blocks) == 4
    # Ramp of 3 optimizer steps: folded at step 4 + 3, recorded then, nothing left on the module.
    assert fold.step == 7 and fold.spec["blocks"] == ["model.blocks.2", "model.blocks.3"]
    assert ramped_blocks(module) == {}
    # The stacked blocks began as copies but trained since (in the optimizer).
    assert not torch.equal(module.model.blocks[2].attn.qkv.weight, module.model.blocks[0].attn.qkv.weight)
    # The budget holds 4 blocks, so the second growth step (end of epoch 1) duplicated nothing.
    assert count_parameters(module) == _params(4)


def test_ramps_advance_once_per_optimizer_step_under_gradient_accumulation() -> None:
    growth = DepthGrowth(
        factor=2, final_budget=_params(4), budget_mode="absolute", operator="stack", ramp_steps=3, warmup_epochs=1
    )
    module, _, _ = _fit(growth, epochs=4, accumulate_grad_batches=2)  # 4 batches, 2 optimizer steps per epoch
    grow, fold = event_log(module)
    assert (grow.step, fold.step) == (2, 5)


@pytest.mark.slow
def test_stack_resume_mid_ramp_is_bitwise_and_load_grown_gives_the_same_logits(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, dirpath: Path) -> pl.LightningModule:
        growth = DepthGrowth(
            factor=2, final_budget=_params(4), budget_mode="absolute", operator="stack", ramp_steps=6, warmup_epochs=1
        )
        saver = ModelCheckpoint(dirpath=dirpath, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
        trainer = quiet_trainer(max_epochs=4, callbacks=[growth, saver], enable_checkpointing=True)
        module = make_module(depth=2, max_epochs=4)
        trainer.fit(module, random_loader(), ckpt_path=ckpt_path)
        return module

    full = run(None, tmp_path / "full")
    mid = tmp_path / "full" / "epoch=1.ckpt"  # step 8: the ramp (steps 4..10) is at 4 / 6
    assert torch.load(mid, weights_only=False)["state_dict"]["model.blocks.2.depthgrow_ramp"].tolist() == [4, 6]
    resumed = run(str(mid), tmp_path / "resumed")
    assert [e.kind for e in event_log(resumed)] == ["stack_blocks", "fold_ramps"]
    assert tensor_hash(resumed) == tensor_hash(full)

    fresh = load_grown(make_module(depth=2), tmp_path / "full" / "epoch=3.ckpt").eval()
    full.eval()
    with torch.no_grad():
        assert torch.equal(fresh(PROBE), full(PROBE))
    assert ramped_blocks(fresh) == {}


def test_copy_inserts_ramped_copies_preserving_the_function(tmp_path: Path) -> None:
    growth = DepthGrowth(
        final_budget=_params(3),
        budget_mode="absolute",
        operator="copy",
        ramp_steps=2,
        placement="uniform",
        warmup_epochs=1,
    )
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    module = make_module(depth=2, max_epochs=3)
    before, after = Logits(), Logits()
    trainer = quiet_trainer(max_epochs=3, callbacks=[before, growth, after, saver], enable_checkpointing=True)
    trainer.fit(module, random_loader())
    grow, fold = event_log(module)
    assert grow.kind == "copy_block" and grow.spec["ramp_steps"] == 2 and grow.step == 4
    torch.testing.assert_close(after.seen[4], before.seen[4], atol=1e-5, rtol=0)
    assert fold.kind == "fold_ramps" and fold.step == 6 and len(module.model.blocks) == 3
    fresh = load_grown(make_module(depth=2), tmp_path / "last.ckpt").eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(fresh(PROBE), module(PROBE))


def test_the_paper_preset_is_zero_init_unchanged() -> None:
    growth = DepthGrowth.paper(final_budget=_params(3), budget_mode="absolute", placement="uniform", warmup_epochs=1)
    assert (growth.operator, growth.ramp_steps) == ("zero_init", 0)
    module, before, after = _fit(growth, epochs=2)
    assert [e.kind for e in event_log(module)] == ["insert_block"]
    torch.testing.assert_close(after.seen[4], before.seen[4], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(operator="bogus"), ValueError, "operator"),
        (dict(operator=1), TypeError, "operator"),
        (dict(operator="stack", ramp_steps=-1), ValueError, "ramp_steps"),
        (dict(operator="stack", ramp_steps=True), TypeError, "ramp_steps"),
        (dict(operator="copy", ramp_steps=2.0), ValueError, "ramp_steps.*an int"),
        (dict(operator="copy", ramp_steps=float("nan")), ValueError, "ramp_steps"),
        (dict(operator="zero_init", ramp_steps=3), ValueError, "ramp_steps"),
        (dict(operator="zero_init", ramp_steps=0.1), ValueError, "ramp_steps"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        DepthGrowth(**kwargs)


def test_stack_refuses_a_budget_no_duplication_fits_before_training() -> None:
    growth = DepthGrowth(
        warmup_epochs=1, factor=2, final_budget=_params(3), budget_mode="absolute", operator="stack", ramp_steps=2
    )
    module = make_module(depth=2)
    start = tensor_hash(module)
    with pytest.raises(ValueError, match="duplicating the smallest stack"):
        quiet_trainer(max_epochs=2, callbacks=[growth]).fit(module, random_loader())
    assert tensor_hash(module) == start and len(module.model.blocks) == 2


class CallsItsModel(Classifier):
    """A training_step that calls ``self.model``, never the LightningModule itself: no forward call to record."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)


def test_a_ramp_without_any_input_is_refused_before_the_first_optimizer_step() -> None:
    # Without an input no step can be tried on a copy, so a block the ramp cannot blend (a tuple output) would
    # only fail after the module had grown. No example input, and no call of the module to record one from.
    growth = DepthGrowth(final_budget=2.0, operator="copy", ramp_steps=2, warmup_epochs=1)
    torch.manual_seed(0)
    module = CallsItsModel(make_vit(depth=2))
    module.example_input_array = None
    start = tensor_hash(module)
    trainer = quiet_trainer(max_epochs=2, callbacks=[growth])
    with pytest.raises(ValueError, match=r"found none.*example_input_array.*DepthGrowth\(example_input=\.\.\.\)"):
        trainer.fit(module, random_loader())
    assert tensor_hash(module) == start and len(module.model.blocks) == 2 and trainer.global_step == 0
    assert event_log(module) == [] and module._forward_pre_hooks == {}


@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_operators_keep_hf_config_depth_layer_idx_and_layer_types_in_step(order: str) -> None:
    transformers = pytest.importorskip("transformers")
    from lightning_depthgrow import find_block_stacks
    from lightning_depthgrow.surgery.operators import copy_block, stack_blocks

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
    )
    model = transformers.Qwen2ForCausalLM(config)
    (stack,) = find_block_stacks(model)
    full, sliding = "full_attention", "sliding_attention"
    stack_blocks(model, stack.path, factor=2, order=order)
    expected = [full, sliding, full, sliding] if order == "stack" else [full, full, sliding, sliding]
    assert model.config.num_hidden_layers == len(stack) == 4
    assert model.config.layer_types == expected
    assert [b.self_attn.layer_idx for b in stack.blocks] == [0, 1, 2, 3]
    assert [b.self_attn.layer_type for b in stack.blocks] == expected
    copy_block(model, stack.path, source=3, after_index=0)
    assert model.config.num_hidden_layers == len(stack) == 5
    assert model.config.layer_types == [expected[0], expected[3], *expected[1:]]
    assert [b.self_attn.layer_idx for b in stack.blocks] == [0, 1, 2, 3, 4]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()  # every layer runs with the grown config


@pytest.mark.slow
def test_stack_with_ramp_under_ddp_keeps_ranks_identical_and_survives_the_fold(tmp_path: Path) -> None:
    # timm's ViT has no buffers but the ramps: the fold removes the last ones, and DDP must be re-wrapped or its
    # next forward fails inside torch.
    growth = DepthGrowth(
        factor=2, final_budget=_params(4), budget_mode="absolute", operator="stack", ramp_steps=2, warmup_epochs=1
    )
    trainer = quiet_trainer(max_epochs=3, devices=2, strategy="ddp_spawn", callbacks=[growth, RankRecord(tmp_path)])
    trainer.fit(make_module(depth=2, max_epochs=3), random_loader(n=64, batch_size=8))
    ranks = rank_records(tmp_path)
    assert ranks[0] == ranks[1]
    assert [(e["kind"], e["step"]) for e in ranks[0]["events"]] == [("stack_blocks", 4), ("fold_ramps", 6)]
    assert ranks[0]["ramped"] == {}


def test_operators_keep_key_prefixes_and_transformer_encoder_num_layers() -> None:
    torchvision = pytest.importorskip("torchvision")
    from lightning_depthgrow import find_block_stacks
    from lightning_depthgrow.surgery.operators import insert_random_block, stack_blocks

    vit = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    (stack,) = find_block_stacks(vit)
    x = torch.randn(2, 3, 8, 8)
    before = vit.eval()(x)
    stack_blocks(vit, stack.path, ramp_steps=2)
    assert list(stack.container._modules) == [f"encoder_layer_{i}" for i in range(4)]
    assert torch.equal(vit(x), before)  # ramped copies: the identity at birth
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    (stack,) = find_block_stacks(encoder)
    insert_random_block(encoder, stack.path, 1, seed=0)
    assert encoder.num_layers == len(encoder.layers) == 3


class _TupleBlock(torch.nn.Module):
    """A residual block returning a tuple (like HF decoder layers): a ramp cannot blend it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + self.fc(x),)


class _TupleNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_TupleBlock(), _TupleBlock()])
        self.head = torch.nn.Linear(8, 10)
        self.example_input_array = torch.zeros(2, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)[0]
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x.flatten(1)[:, :8]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_ramp_the_blocks_cannot_take_is_refused_at_setup_with_the_module_untouched() -> None:
    from lightning_depthgrow.adapters.registry import register_block, unregister_block
    from lightning_depthgrow.surgery.growth import FunctionNotPreservedError

    register_block(_TupleBlock, zero_init=["fc"])
    try:
        torch.manual_seed(0)
        module = _TupleNet()
        start = tensor_hash(module)
        growth = DepthGrowth(final_budget=3.0, operator="copy", ramp_steps=2, placement="uniform", warmup_epochs=1)
        trainer = quiet_trainer(max_epochs=2, callbacks=[growth])
        # setup's trial of ramped copies (on a deep copy) finds that the ramp cannot blend a tuple: before training.
        with pytest.raises(FunctionNotPreservedError, match=r"same shape.*tuple"):
            trainer.fit(module, random_loader())
        assert len(module.blocks) == 2 and event_log(module) == []
        assert tensor_hash(module) == start and trainer.global_step == 0
    finally:
        unregister_block(_TupleBlock)
