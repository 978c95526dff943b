"""Growth operators: copies, G_stack stacking and random blocks, with and without ramps; events and resume."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from examples.gpt_blocks import TinyGPT
from lightning_depthgrow.adapters.registry import UnsupportedModelError
from lightning_depthgrow.events import ArchitectureEvent, apply_event, replay_events
from lightning_depthgrow.surgery import update_optimizer
from lightning_depthgrow.surgery.operators import copy_block, copy_optimizer_state, insert_random_block, stack_blocks
from lightning_depthgrow.surgery.ramp import advance_ramps, fold_ramps, ramped_blocks
from tests._helpers import tensor_hash


def _gpt(depth: int = 2, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    model = TinyGPT(vocab_size=16, context=8, dim=16, depth=depth, num_heads=2)
    with torch.no_grad():  # trained-looking weights: the zero-initialised-looking ones would hide differences
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(seed))


def _run_blocks(model: TinyGPT, order: list[int], idx: torch.Tensor) -> torch.Tensor:
    """The model's forward with its (original) blocks applied in ``order``: the duplicated network."""
    x = model.tok_emb(idx) + model.pos_emb[:, : idx.shape[1]]
    blocks = list(model.blocks)
    for i in order:
        x = blocks[i](x)
    return model.head(model.ln_f(x))


def test_copy_without_ramp_equals_the_duplicated_network() -> None:
    model, idx = _gpt(), _tokens()
    duplicated = _run_blocks(model, [0, 1, 1], idx)
    block, change = copy_block(model, "blocks", source=1)
    assert len(model.blocks) == 3 and model.blocks[2] is block
    assert torch.equal(model(idx), duplicated)
    assert all(new is not twin and torch.equal(new, twin) for new, twin in change.added)


def test_copy_with_ramp_is_the_identity_at_birth_and_the_copy_after_the_ramp() -> None:
    model, idx = _gpt(), _tokens()
    before, duplicated = model(idx), _run_blocks(model, [0, 0, 1], idx)
    copy_block(model, "blocks", source=0, ramp_steps=3)
    assert torch.equal(model(idx), before)
    assert ramped_blocks(model) == {"blocks.1": (0, 3)}
    assert advance_ramps(model, steps=3) == ["blocks.1"]
    assert torch.equal(model(idx), duplicated)
    fold_ramps(model)
    assert torch.equal(model(idx), duplicated) and ramped_blocks(model) == {}


@pytest.mark.parametrize(("order", "layout"), [("stack", [0, 1, 0, 1, 0, 1]), ("interleave", [0, 0, 0, 1, 1, 1])])
def test_stack_blocks_layout_and_function(order: str, layout: list[int]) -> None:
    model, idx = _gpt(), _tokens()
    before, duplicated = model(idx), _run_blocks(model, layout, idx)
    originals = list(model.blocks)
    plain = copy.deepcopy(model)
    new, change = stack_blocks(plain, "blocks", factor=3, order=order)
    assert len(plain.blocks) == 6 and len(new) == 4
    assert len(change.added) == 4 * len(list(originals[0].parameters()))
    assert torch.equal(plain(idx), duplicated)
    stack_blocks(model, "blocks", factor=3, order=order, ramp_steps=2)
    kept = [True, True] if order == "stack" else [True, False]
    assert [model.blocks[i] is b for i, b in enumerate(originals)] == kept
    assert torch.equal(model(idx), before)
    advance_ramps(model, steps=2)
    assert torch.equal(model(idx), duplicated)


def test_random_block_with_ramp_is_identity_at_birth_without_ramp_changes_the_function() -> None:
    model, idx = _gpt(), _tokens()
    before = model(idx)
    plain = copy.deepcopy(model)
    insert_random_block(plain, "blocks", after_index=0, seed=7)
    assert not torch.allclose(plain(idx), before)
    state = torch.get_rng_state()
    block, _ = insert_random_block(model, "blocks", after_index=0, seed=7, ramp_steps=5)
    assert torch.equal(torch.get_rng_state(), state)  # forked RNG
    assert torch.equal(model(idx), before)
    assert torch.equal(block.attn.qkv.weight, plain.blocks[1].attn.qkv.weight)  # same seed, same weights


def test_operators_refuse_and_leave_the_model_untouched() -> None:
    model = _gpt()
    before = tensor_hash(model)
    with pytest.raises(UnsupportedModelError, match="No block stack"):
        copy_block(model, "layers", source=0)
    with pytest.raises(IndexError, match="source"):
        copy_block(model, "blocks", source=2)
    with pytest.raises(ValueError, match="ramp_steps"):
        stack_blocks(model, "blocks", ramp_steps=-1)
    with pytest.raises(ValueError, match="factor"):
        stack_blocks(model, "blocks", factor=1)
    with pytest.raises(ValueError, match="order"):
        stack_blocks(model, "blocks", order="zip")
    assert len(model.blocks) == 2 and tensor_hash(model) == before
    copy_block(model, "blocks", source=0, ramp_steps=2)
    with pytest.raises(UnsupportedModelError, match="still ramping"):
        stack_blocks(model, "blocks")
    assert len(model.blocks) == 3


def test_new_parameters_join_their_source_group_and_can_take_its_optimizer_state() -> None:
    model, idx = _gpt(), _tokens()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.0}], lr=1e-2)
    model(idx).sum().backward()
    optimizer.step()
    block, change = copy_block(model, "blocks", source=1, ramp_steps=2)
    update_optimizer(optimizer, change, model)
    groups = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    assert id(block.attn.qkv.weight) in groups[0] and id(block.ln1.weight) in groups[1]
    assert block.attn.qkv.weight not in optimizer.state
    assert copy_optimizer_state(optimizer, change) == len(change.added)
    source_state = optimizer.state[model.blocks[1].mlp.fc.weight]
    copied = optimizer.state[block.mlp.fc.weight]
    assert torch.equal(copied["exp_avg"], source_state["exp_avg"]) and copied["exp_avg"] is not source_state["exp_avg"]


def test_event_log_replays_copies_ramps_and_folds() -> None:
    grown = _gpt()
    log = [
        ArchitectureEvent("stack_blocks", {"stack": "blocks", "factor": 2, "order": "stack", "ramp_steps": 2}),
        ArchitectureEvent("copy_block", {"stack": "blocks", "source": 1, "index": 3, "ramp_steps": 4}),
    ]
    for event in log:
        apply_event(grown, event)
    finished = advance_ramps(grown, steps=2)
    assert finished == ["blocks.2", "blocks.3"]
    log.append(ArchitectureEvent("fold_ramps", {"blocks": fold_ramps(grown, finished)}))
    log.append(ArchitectureEvent("insert_random_block", {"stack": "blocks", "index": 0, "seed": 3, "ramp_steps": 2}))
    apply_event(grown, log[-1])
    fresh = _gpt(seed=9)
    replay_events(fresh, [e.to_dict() for e in log])
    assert list(fresh.state_dict()) == list(grown.state_dict())
    fresh.load_state_dict(grown.state_dict())
    idx = _tokens()
    assert torch.equal(fresh(idx), grown(idx))
    assert ramped_blocks(fresh) == ramped_blocks(grown) == {"blocks.1": (0, 2), "blocks.5": (2, 4)}
    assert torch.equal(pickle.loads(pickle.dumps(grown))(idx), grown(idx))


def _train(model: TinyGPT, optimizer: torch.optim.Optimizer, steps: range, log: list[ArchitectureEvent]) -> None:
    """A training loop that grows by a ramped copy after step 2 and records folds, like a growth callback."""
    for step in steps:
        idx = _tokens(seed=100 + step)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), idx[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        finished = advance_ramps(model)
        if finished:
            log.append(ArchitectureEvent("fold_ramps", {"blocks": finished}))
            apply_event(model, log[-1])
        if step == 2:
            log.append(ArchitectureEvent("stack_blocks", {"stack": "blocks", "factor": 2, "ramp_steps": 4}))
            update_optimizer(optimizer, apply_event(model, log[-1]), model)


@pytest.mark.parametrize("stop", [4, 8])  # mid-ramp, and after the fold
def test_resume_mid_ramp_is_bitwise_equal_to_an_uninterrupted_run(stop: int) -> None:
    model = _gpt().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, range(10), [])

    first = _gpt().train()
    first_optimizer = torch.optim.AdamW(first.parameters(), lr=1e-2)
    log: list[ArchitectureEvent] = []
    _train(first, first_optimizer, range(stop), log)
    checkpoint = pickle.dumps(
        {"model": first.state_dict(), "optimizer": first_optimizer.state_dict(), "log": [e.to_dict() for e in log]}
    )
    del first, first_optimizer

    saved = pickle.loads(checkpoint)
    resumed = _gpt(seed=5).train()  # any starting weights: the checkpoint replaces them
    replay_events(resumed, saved["log"])
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    log = [ArchitectureEvent.from_dict(e) for e in saved["log"]]
    _train(resumed, resumed_optimizer, range(stop, 10), log)
    assert ramped_blocks(resumed) == ramped_blocks(model) == {}
    assert tensor_hash(resumed) == tensor_hash(model)
