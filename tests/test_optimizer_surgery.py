"""Optimizer surgery without a Trainer: after growth the optimizer looks exactly like the one the user's own
code would build from the grown model (groups, order, schedule), and existing Adam state is kept."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from lightning_depthgrow.events import AppliedChange
from lightning_depthgrow.surgery import insert_identity_block, order_like_model, sync_schedulers, update_optimizer

torch.set_num_threads(1)

TOTAL_STEPS = 12
BASE_LR = 1e-2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
        init_values=1e-5,
    )


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    """The usual user code: weight decay on matrices, none on biases, norms and LayerScale gammas."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=BASE_LR
    )


def _cosine(step: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, TOTAL_STEPS) / TOTAL_STEPS))


def _scheduler(kind: str, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=TOTAL_STEPS)


def _train_step(model, optimizer, scheduler, x, y) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()


def _group_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    matches = [i for i, g in enumerate(optimizer.param_groups) if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


def _state_copy(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["lambda", "cosine_annealing"])
def test_grown_optimizer_equals_what_user_code_builds_from_grown_model(schedule):
    model = _model()
    optimizer = _optimizer(model)
    scheduler = _scheduler(schedule, optimizer)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        _train_step(model, optimizer, scheduler, x, y)
    before = _state_copy(optimizer)
    old_params = list(model.parameters())

    block, change = insert_identity_block(model, "blocks", 0, seed=0)
    update_optimizer(optimizer, change, model)
    sync_schedulers([scheduler], optimizer)

    # Each new parameter sits in its twin's group: decay for matrices, no decay for biases/norms/gammas.
    assert change.added
    for new, twin in change.added:
        assert _group_index(optimizer, new) == _group_index(optimizer, twin) == (0 if new.ndim >= 2 else 1)
        assert new not in optimizer.state
    # Existing Adam state is untouched.
    assert {id(p) for p in optimizer.state} == set(before)
    assert all(_states_equal(optimizer.state[p], before[id(p)]) for p in old_params)
    # Every group follows model.parameters() order, so the state_dict lines up with a fresh optimizer.
    order = {id(p): i for i, p in enumerate(model.parameters())}
    for group in optimizer.param_groups:
        ranks = [order[id(p)] for p in group["params"]]
        assert ranks == sorted(ranks)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    fresh = _optimizer(model)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.05, 0.0]
    for p in model.parameters():
        assert (p in fresh.state) == (p in optimizer.state)
        if p in optimizer.state:
            assert _states_equal(fresh.state[p], optimizer.state[p])

    # Training continues: new parameters get gradients, move, and follow the schedule with everybody else.
    start = {id(p): p.detach().clone() for p in block.parameters()}
    for step in range(4, 8):
        _train_step(model, optimizer, scheduler, x, y)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(BASE_LR * _cosine(step), rel=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    assert all(not torch.equal(p, start[id(p)]) for p in block.parameters())
    assert all(optimizer.state[p]["step"].item() == 4 for p in block.parameters())
    assert all(optimizer.state[p]["step"].item() == 7 for p in old_params)


@pytest.mark.parametrize("schedule", ["lambda", "cosine_annealing"])
def test_group_added_after_the_scheduler_follows_the_schedule(schedule):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    scheduler = _scheduler(schedule, optimizer)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    extra = nn.Parameter(torch.zeros(2))
    update_optimizer(optimizer, AppliedChange(new_group=([extra], {"lr": 2 * BASE_LR, "weight_decay": 0.0})))
    sync_schedulers([scheduler], optimizer)
    for step in range(3, 6):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * _cosine(step), rel=1e-6)
        # The new group is driven too (torch alone would leave it at its constant lr, or crash for LambdaLR).
        assert optimizer.param_groups[1]["lr"] < 2 * BASE_LR


def test_replaced_parameters_take_sliced_adam_moments_and_keep_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    old_w, old_b = model.weight, model.bias
    w_state = {k: v.clone() for k, v in optimizer.state[old_w].items()}
    b_state = {k: v.clone() for k, v in optimizer.state[old_b].items()}
    rows, cols = torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    new_w = nn.Parameter(old_w.detach()[rows][:, cols].clone())
    new_b = nn.Parameter(old_b.detach()[rows].clone())

    update_optimizer(optimizer, AppliedChange(replaced=[(old_w, new_w, (rows, cols)), (old_b, new_b, (rows,))]))

    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(new_w), id(new_b)]
    assert old_w not in optimizer.state and old_b not in optimizer.state
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[new_w][key], w_state[key].index_select(0, rows).index_select(1, cols))
        assert torch.equal(optimizer.state[new_b][key], b_state[key].index_select(0, rows))
    assert torch.equal(optimizer.state[new_w]["step"], w_state["step"])
    assert torch.equal(optimizer.state[new_b]["step"], b_state["step"])
    new_w.grad, new_b.grad = torch.ones_like(new_w), torch.ones_like(new_b)
    optimizer.step()  # the sliced state has the right shapes for Adam to use
    assert optimizer.state[new_w]["step"].item() == 3


def test_invalid_replacement_is_rejected_before_anything_changes():
    model = nn.Linear(4, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    groups = [list(g["params"]) for g in optimizer.param_groups]
    momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    wrong = nn.Parameter(torch.zeros(3, 3))
    extra = nn.Parameter(torch.zeros(6))
    change = AppliedChange(added=[(extra, model.bias)], replaced=[(model.weight, wrong, (torch.tensor([0, 1, 2]),))])
    with pytest.raises(ValueError, match=r"replacement of shape \(3, 3\) does not match kept index \[3, 4\]"):
        update_optimizer(optimizer, change)
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert torch.equal(optimizer.state[model.weight]["momentum_buffer"], momentum)


def test_parameters_the_optimizer_never_held_are_skipped():
    frozen, trained = nn.Linear(2, 2), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    new_frozen, new_trained = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    update_optimizer(optimizer, AppliedChange(added=[(new_frozen, frozen.bias), (new_trained, trained.bias)]))
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(p is new_trained for p in held) and not any(p is new_frozen for p in held)


def test_order_like_model_sorts_groups_and_keeps_unknown_parameters_last():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    stranger = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([model[1].bias, stranger, model[0].weight, model[1].weight, model[0].bias], lr=0.1)
    order_like_model(optimizer, model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in [*model.parameters(), stranger]]
