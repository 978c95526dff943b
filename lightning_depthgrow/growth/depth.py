"""Where to insert identity blocks: a pure planner over block stacks, costs and scores.

:func:`plan_depth` ranks every insertion position by the chosen placement and takes the best ones that fit the
:class:`~lightning_depthgrow.growth.Budget`. Its inputs are plain records (:class:`StackLayout`,
:class:`BlockCost`, a ``{block_name: score}`` dict), so it runs, and is tested, without a model or a Trainer;
:func:`stack_layouts` builds the layouts from a real model and its event log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..adapters.registry import find_block_stacks
from ..events import ArchitectureEvent
from ..validation import check_choice
from .budget import Budget

Placement = Literal["curvature", "uniform", "last"]
PLACEMENTS: tuple[str, ...] = ("curvature", "uniform", "last")
SCORE_NAMES = {"curvature": "trace_per_param", "uniform": "segment_crowding", "last": "depth_ratio"}
INSERT_BLOCK = "insert_block"


@dataclass(frozen=True)
class StackLayout:
    """What the planner knows about one block stack.

    Attributes:
        path: the stack's dotted path (``"blocks"``, ``"model.layer2"``; ``""`` for a bare ``Sequential``).
        growable: positions after which a block may be inserted.
        templates: for each growable position, the index of the block a new one copies (same length).
        original: one flag per current block: a starting block (``True``) or one inserted since.
        key_prefix: what the container's child keys start with before the index (``"encoder_layer_"`` for
            torchvision's ViT, ``""`` for a ``Sequential``/``ModuleList``).
    """

    path: str
    growable: tuple[int, ...]
    templates: tuple[int, ...]
    original: tuple[bool, ...]
    key_prefix: str = ""

    def __post_init__(self) -> None:
        if len(self.growable) != len(self.templates):
            raise ValueError(
                f"StackLayout {self.path!r}: {len(self.growable)} growable positions, "
                f"{len(self.templates)} templates; give one template per position."
            )

    def block_name(self, index: int) -> str:
        """Dotted name of block ``index`` (as in curvature estimates and block costs)."""
        key = f"{self.key_prefix}{index}"
        return f"{self.path}.{key}" if self.path else key

    @property
    def depth(self) -> int:
        return len(self.original)


@dataclass(frozen=True)
class BlockCost:
    """Parameters and forward FLOPs (per sample) of one block."""

    params: int
    flops: int

    def of(self, metric: str) -> int:
        return self.params if metric == "params" else self.flops


@dataclass
class Insertion:
    """One planned block: a copy of block ``template`` of ``stack``, identity-initialised, after block ``after``.

    ``key_prefix`` is what the stack's child keys start with before the index (torchvision ViT's
    ``"encoder_layer_"``), so :attr:`block` is the real dotted name of the block the new one follows.

    Example:
        >>> ins = Insertion("blocks", after=1, template=1, params=10, flops=0, reason={})
        >>> ins.to_event(seed=7).spec
        {'stack': 'blocks', 'index': 1, 'template': 1, 'seed': 7}
    """

    stack: str
    after: int
    template: int
    params: int
    flops: int
    reason: dict[str, Any] = field(default_factory=dict)
    key_prefix: str = ""

    @property
    def block(self) -> str:
        """Dotted name of the block the new one follows (``"blocks.1"``, ``"encoder.layers.encoder_layer_1"``)."""
        key = f"{self.key_prefix}{self.after}"
        return f"{self.stack}.{key}" if self.stack else key

    def to_event(self, seed: int, epoch: int = -1, step: int = -1) -> ArchitectureEvent:
        """The ``insert_block`` event that applies this insertion (``seed`` fixes the new block's init)."""
        spec = {"stack": self.stack, "index": self.after, "template": self.template, "seed": int(seed)}
        cost = {"params": self.params, "flops": self.flops}
        return ArchitectureEvent(INSERT_BLOCK, spec, epoch=epoch, step=step, reason=dict(self.reason), cost=cost)


@dataclass
class _Candidate:
    stack: StackLayout
    after: int
    template: int
    score: float  # reported: trace per parameter, or the depth/crowding a baseline minimises
    key: tuple[float, ...]  # ascending: best first
    cost: BlockCost


def fits_any_insertion(stacks: Sequence[StackLayout], costs: Mapping[str, BlockCost], metric: str, room: float) -> bool:
    """Whether the cheapest insertion (its template block's size in ``metric``) fits in ``room``.

    Callers check this before paying for scores (a curvature estimate costs several training steps).
    """
    templates = {s.block_name(t) for s in stacks for t in s.templates}
    return min((costs[name].of(metric) for name in templates), default=math.inf) <= room


def plan_depth(
    stacks: Sequence[StackLayout],
    costs: Mapping[str, BlockCost],
    budget: Budget,
    *,
    start: float,
    current: float,
    scores: Mapping[str, float] | None = None,
    placement: Placement = "curvature",
    lr_scale: float = 1.0,
    blocks_per_step: int | None = 1,
    max_per_stack: int | None = 1,
) -> list[Insertion]:
    """The insertions of one growth step, in the order to apply them (deepest first inside a stack).

    Args:
        stacks: the stacks that may grow.
        costs: ``{block_name: BlockCost}`` of every block (a new block costs what its template costs).
        budget: the budget; ``start`` and ``current`` are sizes in ``budget.metric``.
        scores: ``{block_name: Hessian trace per parameter}``, needed for ``placement="curvature"`` (the
            highest first); blocks missing or not finite are never chosen.
        placement: ``"curvature"``, ``"uniform"`` (the shallowest stack relative to its start, then the least
            crowded segment between starting blocks) or ``"last"`` (append at the end of each stack).
        lr_scale: current lr / initial lr, used with ``budget.scale_by_lr``.
        blocks_per_step: the most blocks per step (``None``: only the budget limits).
        max_per_stack: the most blocks per stack and step (``None``: no limit).

    Raises:
        ValueError: ``placement="curvature"`` and no growable block has a finite score.
    """
    check_choice("placement", placement, PLACEMENTS)
    limit, step_limit = budget.final_limit(start), budget.step_limit(start, lr_scale)
    if not fits_any_insertion(stacks, costs, budget.metric, min(limit - current, step_limit)):
        return []
    ranked = _ranked(stacks, costs, scores or {}, placement)
    chosen: list[_Candidate] = []
    per_stack: dict[str, int] = {}
    step_used = 0.0
    for cand in ranked:
        if blocks_per_step is not None and len(chosen) >= blocks_per_step:
            break
        if max_per_stack is not None and per_stack.get(cand.stack.path, 0) >= max_per_stack:
            continue
        cost = cand.cost.of(budget.metric)
        if current + step_used + cost > limit or step_used + cost > step_limit:
            continue
        chosen.append(cand)
        per_stack[cand.stack.path] = per_stack.get(cand.stack.path, 0) + 1
        step_used += cost
    # Deepest position first inside a stack: an insertion never shifts the indices before it. The running budget
    # figures follow this apply order, so the log lines of one step show the size rising.
    chosen.sort(key=lambda c: (c.stack.path, -c.after))
    plans, added = [], 0.0
    for cand in chosen:
        cost = cand.cost.of(budget.metric)
        runners_up = [c for c in ranked if all(c is not k for k in chosen)][:3]
        reason = {
            "placement": placement,
            "block": cand.stack.block_name(cand.after),
            "score": cand.score,
            "score_name": SCORE_NAMES[placement],
            "runners_up": [{"block": c.stack.block_name(c.after), "score": c.score} for c in runners_up],
            "budget_metric": budget.metric,
            "budget_before": current + added,
            "budget_after": current + added + cost,
            "budget_limit": limit,
            "budget_left": limit - current - added - cost,
            "step_limit": None if math.isinf(step_limit) else step_limit,
            "lr_scale": budget.lr_factor(lr_scale),
        }
        added += cost
        plans.append(
            Insertion(
                cand.stack.path,
                cand.after,
                cand.template,
                cand.cost.params,
                cand.cost.flops,
                reason,
                key_prefix=cand.stack.key_prefix,
            )
        )
    return plans


def _ranked(
    stacks: Sequence[StackLayout], costs: Mapping[str, BlockCost], scores: Mapping[str, float], placement: str
) -> list[_Candidate]:
    candidates = []
    for stack in stacks:
        depth_ratio = stack.depth / max(1, sum(stack.original))
        for after, template in zip(stack.growable, stack.templates):
            if placement == "curvature":
                score = float(scores.get(stack.block_name(after), math.nan))
                key: tuple[float, ...] = (-score,)
            elif placement == "uniform":
                score = _crowding(stack.original, after)
                key = (depth_ratio, score)
            else:
                score = depth_ratio if after == stack.depth - 1 else math.nan
                key = (depth_ratio,)
            candidates.append(_Candidate(stack, after, template, score, key, costs[stack.block_name(template)]))
    if placement == "curvature" and candidates and not any(math.isfinite(c.score) for c in candidates):
        raise ValueError(
            "placement='curvature': the curvature scores have no finite value for any growable block "
            f"{[c.stack.block_name(c.after) for c in candidates][:8]} (scores given for {sorted(scores)[:8]})."
        )
    # Stable sort: ties keep module order, so the plan is deterministic.
    return sorted((c for c in candidates if math.isfinite(c.score)), key=lambda c: c.key)


def _crowding(original: Sequence[bool], after: int) -> float:
    """How many inserted blocks already follow the starting block that block ``after`` belongs to.

    Inserting into the least crowded segment spreads new depth evenly between the starting blocks;
    ties favour the segment whose insertion point is farthest from the previous inserted block.
    """
    start = after
    while start > 0 and not original[start]:
        start -= 1
    end = start + 1
    while end < len(original) and not original[end]:
        end += 1
    return end - start - 1 + (0.5 if after != end - 1 else 0.0)


def starting_blocks(depth: int, insertions: Iterable[int]) -> tuple[bool, ...]:
    """Per current block, whether it is a starting block, given the ``after`` index of every insertion so far.

    A history that does not add up (the stack was also changed by other events, e.g. a DMS export) counts every
    block as a starting one.

    Example:
        >>> starting_blocks(4, [0, 2])  # two starting blocks, a block inserted after each
        (True, False, True, False)
    """
    inserted = list(insertions)
    row = [True] * (depth - len(inserted))
    for index in inserted:
        if not 0 <= index < len(row):
            return (True,) * depth
        row.insert(index + 1, False)
    return tuple(row) if len(row) == depth else (True,) * depth


#: Event kinds that insert one block after ``spec["index"]`` (``copy_block`` without an index: after its source).
_ONE_BLOCK = (INSERT_BLOCK, "copy_block", "insert_random_block")


def inserted_after(events: Iterable[ArchitectureEvent], path: str, depth: int) -> list[int]:
    """The ``after`` index of every block inserted into stack ``path`` (now ``depth`` blocks deep), in order, from
    its ``insert_block`` / ``copy_block`` / ``insert_random_block`` / ``stack_blocks`` events; ``[-1]`` (a history
    :func:`starting_blocks` rejects) when a stacking does not add up.

    Example:
        >>> from lightning_depthgrow.events import ArchitectureEvent
        >>> stack = ArchitectureEvent("stack_blocks", {"stack": "blocks", "factor": 3, "order": "stack"})
        >>> inserted_after([stack], "blocks", depth=6)  # [b0, b1] -> [b0, b1, b0', b1', b0'', b1'']
        [1, 2, 3, 4]
    """
    mine = [e for e in events if e.spec.get("stack") == path and (e.kind in _ONE_BLOCK or e.kind == "stack_blocks")]
    before = []  # the stack's depth before each event, walking back from the current depth
    for event in reversed(mine):
        if event.kind == "stack_blocks":
            factor, start = int(event.spec.get("factor", 2)), int(event.spec.get("start", 0))
            if depth <= start or (depth - start) % factor:
                return [-1]
            depth = start + (depth - start) // factor
        else:
            depth -= 1
        before.append(depth)
    after: list[int] = []
    for event, d in zip(mine, reversed(before)):
        if event.kind != "stack_blocks":
            index = event.spec.get("index")
            after.append(int(event.spec["source"] if index is None else index))
            continue
        factor, start = int(event.spec.get("factor", 2)), int(event.spec.get("start", 0))
        tail = d - start
        if event.spec.get("order", "stack") == "stack":
            after += [d + k * tail + j - 1 for k in range(factor - 1) for j in range(tail)]
        else:
            after += [start + j * factor + k for j in range(tail) for k in range(factor - 1)]
    return after


def stack_layouts(
    model: nn.Module, events: Iterable[ArchitectureEvent] = (), ramped: bool = False
) -> list[StackLayout]:
    """The layout of every stack of ``model`` that has a growable position; ``events`` is its event log.

    ``ramped=False`` (zero-initialised blocks): the positions the adapters accept
    (:meth:`~lightning_depthgrow.adapters.BlockStack.growable_positions`: a post-LayerNorm block or a ResNet block
    with a non-ReLU activation after its add has none). ``ramped=True`` (copies entering through a residual ramp,
    the identity at birth for any shape-preserving block): the adapters' zero-init refusals do not apply, so every
    block of a stack whose keys are ``0..n-1`` and that has a shape-preserving block to copy is a position. Block
    insertions by any operator in ``events`` mark which blocks are not starting blocks.

    Example:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)  # post-LayerNorm: zero-init refused
        >>> encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> stack_layouts(encoder), [(s.path, s.growable) for s in stack_layouts(encoder, ramped=True)]
        ([], [('layers', (0, 1))])
    """
    events = list(events)
    layouts = []
    for stack in find_block_stacks(model):
        if ramped:
            structural = stack.key_prefix is not None and stack.template_index() is not None
            growable = tuple(range(len(stack))) if structural else ()
        else:
            growable = tuple(stack.growable_positions())
        if not growable:
            continue
        templates = tuple(int(stack.template_index(near=i)) for i in growable)
        original = starting_blocks(len(stack), inserted_after(events, stack.path, len(stack)))
        layouts.append(StackLayout(stack.path, growable, templates, original, stack.key_prefix or ""))
    return layouts
