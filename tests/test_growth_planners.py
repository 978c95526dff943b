"""The Lightning-free planning core: Budget, Schedule, plan_depth, plan_neurons; no Trainer anywhere.

(That ``lightning_depthgrow.growth`` imports with Lightning absent is checked with ``load_grown`` in test_resume.py.)"""

from __future__ import annotations

import math

import pytest
import timm
import torch

from lightning_depthgrow.events import ArchitectureEvent
from lightning_depthgrow.growth import (
    BlockCost,
    Budget,
    Schedule,
    StackLayout,
    plan_depth,
    plan_neurons,
    stack_layouts,
    starting_blocks,
)
from lightning_depthgrow.measure import count_parameters


def layout(path: str, depth: int, original: tuple[bool, ...] | None = None) -> StackLayout:
    positions = tuple(range(depth))
    return StackLayout(path, positions, positions, original or (True,) * depth)


def flat_costs(*stacks: StackLayout, params: int = 10, flops: int = 100) -> dict[str, BlockCost]:
    return {s.block_name(i): BlockCost(params, flops) for s in stacks for i in range(s.depth)}


# ---------------------------------------------------------------- Budget and Schedule


def test_budget_limits_relative_and_absolute():
    relative = Budget(final=2.0, step=0.1, scale_by_lr=True)
    assert relative.final_limit(500) == 1000 and relative.step_limit(500, lr_scale=0.5) == 25
    assert relative.room(500, current=990, lr_scale=1.0) == 10
    absolute = Budget(final=700, step=None, mode="absolute")
    assert absolute.final_limit(500) == 700 and math.isinf(absolute.step_limit(500))
    assert math.isinf(Budget(final=None, step=5, mode="absolute").final_limit(1))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(final="2"), TypeError, "final_budget"),
        (dict(final=float("nan")), ValueError, "final_budget"),
        (dict(final=0.5), ValueError, "final_budget"),
        (dict(step=True), TypeError, "step_budget"),
        (dict(metric="macs"), ValueError, "budget_metric"),
        (dict(mode="percent"), ValueError, "budget_mode"),
        (dict(scale_by_lr="yes", step=0.1), TypeError, "scale_by_lr"),
        (dict(scale_by_lr=True), ValueError, "scale_by_lr"),
    ],
)
def test_budget_rejects_bad_values_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        Budget(**kwargs)


def test_schedule_warmup_every_and_never_in_the_last_epoch():
    assert [e for e in range(6) if Schedule(1, 1).is_due(e, 6, -1)] == [0, 1, 2, 3, 4]
    assert [e for e in range(9) if Schedule(3, 2).is_due(e, 9, -1)] == [2, 4, 6]
    assert Schedule(0, 1).is_due(0, None, -1) and not Schedule(0, 1).is_due(0, None, last_epoch=0)
    with pytest.raises(TypeError, match="warmup_epochs"):
        Schedule(warmup_epochs=True)
    with pytest.raises(ValueError, match="grow_every"):
        Schedule(every=0)


# ---------------------------------------------------------------- plan_depth


def test_curvature_placement_takes_the_highest_score_within_budget():
    stack = layout("blocks", 4)
    costs = flat_costs(stack)
    scores = {"blocks.0": 0.1, "blocks.1": 0.9, "blocks.2": 0.5, "blocks.3": float("nan")}
    plan = plan_depth(
        [stack], costs, Budget(final=2.0), start=40, current=40, scores=scores, blocks_per_step=2, max_per_stack=None
    )
    # Two best, applied deepest first; the NaN block is never chosen.
    assert [p.after for p in plan] == [2, 1]
    assert [r["block"] for r in plan[0].reason["runners_up"]] == ["blocks.0"]
    assert [p.reason["budget_after"] for p in sorted(plan, key=lambda p: p.reason["budget_before"])] == [50, 60]
    event = plan[1].to_event(seed=3, epoch=1, step=8)
    assert isinstance(event, ArchitectureEvent) and event.spec == {
        "stack": "blocks",
        "index": 1,
        "template": 1,
        "seed": 3,
    }
    assert event.cost == {"params": 10, "flops": 100}


def test_budget_final_and_step_limits_and_the_cheap_exit():
    stack = layout("blocks", 3)
    scores = {f"blocks.{i}": float(i) for i in range(3)}
    costs = flat_costs(stack)
    kwargs = dict(scores=scores, blocks_per_step=None, max_per_stack=None)
    # 2.5 blocks of room: two fit.
    assert len(plan_depth([stack], costs, Budget(final=55 / 30), start=30, current=30, **kwargs)) == 2
    # Step limit 15 of 30 (halved by the lr): one block of 10 fits at lr_scale 1, none at 0.5 (7.5 < 10).
    step = Budget(final=None, step=0.5, scale_by_lr=True)
    assert len(plan_depth([stack], costs, step, start=30, current=30, **kwargs)) == 1
    assert plan_depth([stack], costs, step, start=30, current=30, lr_scale=0.5, **kwargs) == []
    # Nothing fits: no scores needed at all (the callback skips the estimate).
    assert plan_depth([stack], costs, Budget(final=1.1), start=30, current=30, scores=None) == []


def test_flops_metric_counts_flops_not_params():
    stack = layout("blocks", 2)
    costs = {"blocks.0": BlockCost(params=1, flops=50), "blocks.1": BlockCost(params=1, flops=10)}
    budget = Budget(final=30, metric="flops", mode="absolute")
    plan = plan_depth([stack], costs, budget, start=0, current=15, scores={"blocks.0": 9.0, "blocks.1": 1.0})
    assert [p.after for p in plan] == [1]  # blocks.0 scores higher but its 50 FLOPs do not fit 15


def test_max_per_stack_spreads_over_stacks():
    a, b = layout("a", 2), layout("b", 2)
    scores = {"a.0": 5.0, "a.1": 4.0, "b.0": 1.0, "b.1": 0.5}
    plan = plan_depth(
        [a, b],
        flat_costs(a, b),
        Budget(final=10.0),
        start=40,
        current=40,
        scores=scores,
        blocks_per_step=2,
        max_per_stack=1,
    )
    assert [p.block for p in plan] == ["a.0", "b.0"]


def test_uniform_and_last_placements():
    # Stack "a" already doubled, "b" untouched: uniform and last both grow "b" first.
    a = StackLayout("a", (0, 1, 2, 3), (0, 1, 2, 3), starting_blocks(4, [0, 2]))
    b = layout("b", 2)
    costs = flat_costs(a, b)
    uniform = plan_depth([a, b], costs, Budget(final=10.0), start=60, current=60, placement="uniform")
    assert [p.block for p in uniform] == ["b.0"]  # the shallower stack; equal segments: module order
    last = plan_depth([a, b], costs, Budget(final=10.0), start=60, current=60, placement="last")
    assert [p.block for p in last] == ["b.1"] and last[0].reason["score_name"] == "depth_ratio"
    # Within one stack, uniform fills the empty segment between starting blocks.
    c = StackLayout("c", (0, 1, 2), (0, 1, 2), starting_blocks(3, [0]))
    plan = plan_depth([c], flat_costs(c), Budget(final=10.0), start=30, current=30, placement="uniform")
    assert [p.block for p in plan] == ["c.2"]


def test_curvature_without_any_finite_score_is_an_error():
    stack = layout("blocks", 2)
    with pytest.raises(ValueError, match="no finite value"):
        plan_depth([stack], flat_costs(stack), Budget(final=2.0), start=20, current=20, scores={})
    with pytest.raises(ValueError, match="placement"):
        plan_depth([stack], flat_costs(stack), Budget(final=2.0), start=20, current=20, placement="middle")


def test_starting_blocks_tolerates_a_history_that_does_not_add_up():
    assert starting_blocks(3, []) == (True, True, True)
    assert starting_blocks(3, [5]) == (True, True, True)


def test_stack_layouts_of_a_real_vit_and_its_event_log():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=(1, 8),
        patch_size=(1, 4),
        in_chans=1,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
    )
    (stack,) = stack_layouts(vit)
    assert stack == StackLayout("blocks", (0, 1), (0, 1), (True, True))
    plan = plan_depth(
        stack_layouts(vit),
        {stack.block_name(i): BlockCost(count_parameters(vit.blocks[i]), 0) for i in range(2)},
        Budget(final=2.0),
        start=count_parameters(vit),
        current=count_parameters(vit),
        scores={"blocks.0": 1.0, "blocks.1": 0.0},
    )
    from lightning_depthgrow.events import apply_event

    event = plan[0].to_event(seed=0)
    apply_event(vit, event)
    (grown,) = stack_layouts(vit, [event])
    assert grown.original == (True, False, True) and len(vit.blocks) == 3


# ---------------------------------------------------------------- plan_neurons


def test_plan_neurons_most_negative_first_within_budget_and_min_neurons():
    eigen = {"l1": [-1.0, -3.0, 0.2, -0.5], "l2": [-2.0, float("nan"), 1.0]}
    costs = {"l1": 4, "l2": 10}
    budget = Budget(final=None, step=20, mode="absolute")
    plan = plan_neurons(eigen, costs, budget, start=100, current=100)
    # -3 (l1, 4) -> -2 (l2, 10) -> -1 (l1, 4): 18; -0.5 would make 22 > 20.
    assert [(b.linear, b.neurons, b.params) for b in plan] == [("l1", [0, 1], 8), ("l2", [0], 10)]
    assert plan[0].reason["threshold"] == -1.0 and plan[0].to_event().kind == "neuron_branch"
    strict = plan_neurons(eigen, costs, budget, start=100, current=100, min_neurons=2)
    assert [b.linear for b in strict] == ["l1"]
    capped = plan_neurons(eigen, costs, Budget(final=1.05, step=1.0), start=100, current=100)
    assert sum(b.params for b in capped) <= 5
