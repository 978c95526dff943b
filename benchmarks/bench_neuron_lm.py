"""Benchmark: does per-neuron growth (``NeuronGrowth``) pay on the byte-level LM? Issue 14's NeuronGrowth target.

Target (the seed paper's claim shape, Guna, Chavan & Gupta 2024): the grown model is at least as good as both the
un-grown start model and a width-matched uniform model of equal parameters, 3 seeds.

The task (:mod:`benchmarks.tasks`): a byte-level TinyGPT (dim 32, 4 heads, context 128) on the Python stdlib,
``--steps`` AdamW steps (batch 32, warm-up + cosine), validated on held-out stdlib files. Variants, per seed, all
with the same data order and number of steps (``start``, ``grown`` and ``grown_arch_scratch`` also share their
initial weights; the wider models draw theirs from the same seed):

- ``start``: the un-grown start model, ``--depth`` blocks with a narrow MLP (``--start-ratio`` x dim hidden units);
- ``grown``: the same start model with ``NeuronGrowth`` (default splitting criterion: the most negative
  splitting-matrix eigenvalue per ``mlp.fc`` neuron, nested branches watched) growing at fractions ``--at`` of
  training (the paper's 50-of-300-epoch warm-up, then every 30 epochs), ``--step-budget`` of the start's
  parameters per step scaled by the learning rate (the paper's rule), capped at ``--final-budget`` x the start;
- ``uniform``: a fixed model whose MLPs are all wider by the same number of hidden units, chosen per seed so its
  parameter count matches that seed's grown model (the width-matched uniform model), trained from scratch;
- ``grown_arch_scratch``: the grown run's final architecture (its event log replayed on the start model's initial
  weights: branches zero at step 0) trained from scratch, i.e. the grown shape without growth during training;
- ``wide``: a fixed model with ``--wide-ratio`` x dim hidden units (TinyGPT's default 4), optional;
- ``uniform_flops``: a fixed uniform model whose width is chosen per seed so that its training FLOPs (all steps at
  the final width) equal that seed's grown run's (whose parameters arrive during training): the uniform model of
  equal *training compute*, narrower than the width-matched one. Optional.

Levers (on the ``grown`` variants): ``--layers`` (which Linears get branches: the MLP's ``fc``, ``fc`` and its
output ``proj``, or the paper's four kinds with the attention projections), ``--selection`` (splitting criterion,
random neurons, or the per-parameter squared gradient of each neuron's weight row, which also ranks layers with no
activation after them), ``--kind-split`` (rank within each layer kind: the budget split across kinds),
``--branch-scale``, ``--at``, ``--no-nest``.

Compute: training FLOPs are counted per optimizer step for the architecture the step ran with
(``FlopCounterMode`` on one forward + backward of a copy of the current model, math attention kernel, matrix
products only). NeuronGrowth's splitting pass cannot run under ``FlopCounterMode`` (double autograd through the
activation), so its cost is reported separately: measured wall/CPU seconds of every estimate, and an estimate in
FLOPs (one forward + backward of the current model, counted, plus ``2 * tokens * out * in^2`` per watched layer for
forming the explicit splitting matrices; the ``in x in`` eigendecompositions are negligible).

    OMP_NUM_THREADS=1 python benchmarks/bench_neuron_lm.py --seeds 0 1 2

Writes ``benchmarks/results/neuron_lm.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import LMConfig, lm_loss, lm_setup, make_gpt, mean_std, stdlib_corpus, train_lm, val_batch
from lightning_depthgrow.callbacks.neuron_growth import NeuronGrowth
from lightning_depthgrow.events import ArchitectureEvent, apply_event, event_log

VARIANTS = ("start", "grown", "uniform", "grown_arch_scratch", "grown_early", "wide", "uniform_flops")
GROWN = ("grown", "grown_early")
#: The paper's schedule as fractions of training: warm-up 50 of 300 epochs, then every 30 epochs (last at 290).
PAPER_AT = tuple(round((50 + 30 * k) / 300, 4) for k in range(9))


@dataclass(frozen=True)
class WidthConfig(LMConfig):
    """An :class:`~benchmarks.tasks.LMConfig` with the MLP width: ``int(dim * mlp_ratio)`` hidden units per block."""

    mlp_ratio: float = 4.0


def hidden_units(config: WidthConfig) -> int:
    return int(config.dim * config.mlp_ratio)


def with_hidden(config: WidthConfig, hidden: int) -> WidthConfig:
    """``config`` with exactly ``hidden`` MLP units (``mlp_ratio = hidden / dim``, checked to round back)."""
    out = replace(config, mlp_ratio=hidden / config.dim)
    if hidden_units(out) != hidden:
        raise ValueError(f"mlp_ratio {hidden}/{config.dim} does not give {hidden} hidden units")
    return out


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#: Which Linears of every block get branches (``--layers``): the MLP's ``fc`` (default), ``fc`` and the MLP's
#: output ``proj`` (fc2), or the paper's four layer kinds (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj``).
LAYER_SETS = {
    "fc": ("mlp.fc",),
    "fc+proj": ("mlp.fc", "mlp.proj"),
    "paper": ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"),
}


def growth_layers(depth: int, kinds: str) -> dict[str, str]:
    """``layers`` for NeuronGrowth over the ``LAYER_SETS[kinds]`` Linears of every block. Only ``mlp.fc`` feeds an
    activation; the others are paired with themselves as a placeholder (the splitting criterion does not apply to
    them: ``--selection gradient`` or ``random`` ranks them)."""
    layers = {}
    for i in range(depth):
        for kind in LAYER_SETS[kinds]:
            path = f"model.blocks.{i}.{kind}"
            layers[path] = f"model.blocks.{i}.mlp.act" if kind == "mlp.fc" else path
    return layers


def count_step_flops(model: nn.Module, config: LMConfig) -> int:
    """FLOPs of one training step (forward + backward on one batch) of ``model`` as it is now (on a copy)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model).train()
    idx = torch.zeros(config.batch_size, config.context + 1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(), sdpa_kernel(SDPBackend.MATH), counter:
        logits = net(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
    return int(counter.get_total_flops())


def flops_matched_hidden(config: WidthConfig, total_flops: int) -> int:
    """The MLP width whose fixed model trains ``config.steps`` steps in ``total_flops`` (nearest unit): the
    uniform model of equal *training* compute to a grown run (a step's FLOPs are linear in the width)."""
    base = hidden_units(config)
    f0 = count_step_flops(make_gpt(config), config)
    per_unit = count_step_flops(make_gpt(with_hidden(config, base + 1)), config) - f0
    return base + max(0, round((total_flops / config.steps - f0) / per_unit))


class ArchFlops(Callback):
    """Counts each optimizer step's FLOPs for the architecture it ran with (cached per parameter count); keeps
    the LightningModule for the event log and diagnostics after fit."""

    def __init__(self, config: LMConfig) -> None:
        self.config = config
        self.per_arch: dict[int, int] = {}
        self.cumulative: list[int] = []
        #: training loss of every optimizer step (the loss of the batch before the step), for birth effects
        self.train_loss: list[float] = []
        self.module: pl.LightningModule | None = None

    def step_flops(self, model: nn.Module) -> int:
        key = param_count(model)
        if key not in self.per_arch:
            self.per_arch[key] = count_step_flops(model, self.config)
        return self.per_arch[key]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        total = self.cumulative[-1] if self.cumulative else 0
        self.cumulative.append(total + self.step_flops(pl_module.model))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.train_loss.append(float(outputs["loss"]))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = pl_module


class TimedNeuronGrowth(NeuronGrowth):
    """``NeuronGrowth`` that records the time of each splitting pass and an estimate of its FLOPs.

    ``selection="random"`` replaces the splitting eigenvalues by independent draws from ``-U(0, 1)`` per watched
    neuron (seeded by the run's seed and the growth step): the same budget, ``min_neurons`` and nesting rules then
    pick random neurons, the control for "does the splitting criterion choose better than chance at equal growth".

    ``selection="gradient"`` ranks neurons by ``-||dL/dw_i||^2 / cost`` (the squared gradient of neuron ``i``'s
    weight row and bias, on the captured batches, per parameter a branch neuron costs): a zero-initialised branch
    on neuron ``i`` starts with gradient ``1.5 dL/dw_i``, so this is the first-order rate at which the new branch
    can lower the loss, per parameter. The authors' released code ranks by a rank-one matrix of the gradient row,
    the same ordering; unlike the splitting matrix it needs no activation after the Linear, so it ranks every
    layer kind (attention projections, the MLP's output projection).
    """

    def __init__(
        self, *args: Any, flops: ArchFlops, selection: str = "splitting", kind_split: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.flops = flops
        self.selection = selection
        self.kind_split = kind_split
        self.passes: list[dict[str, float]] = []

    def estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, list[float]]:
        watched = self.watched_layers(pl_module)
        if self.selection == "random":
            generator = torch.Generator().manual_seed(1000 * self.seed + self.growth_steps)
            self.latest = {
                path: (-torch.rand(pl_module.get_submodule(path).out_features, generator=generator)).tolist()
                for path in watched
            }
            return self.latest
        if self.selection == "gradient":
            scores = self.gradient_scores(pl_module, watched)
            self.latest = split_by_kind(scores) if self.kind_split else scores
            return self.latest
        config = self.flops.config
        tokens = config.batch_size * config.context * self.num_batches
        matrices = sum(
            2 * tokens * pl_module.get_submodule(p).out_features * pl_module.get_submodule(p).in_features ** 2
            for p in watched
        )
        forward_backward = self.num_batches * self.flops.step_flops(pl_module.model)
        wall, cpu = time.perf_counter(), time.process_time()
        result = super().estimate(trainer, pl_module)
        self.passes.append(
            {
                "step": trainer.global_step,
                "watched_layers": len(watched),
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "flops_estimate": forward_backward + matrices,
                "negative": sum(v < 0 for values in result.values() for v in values),
                "neurons": sum(len(values) for values in result.values()),
            }
        )
        return result

    def gradient_scores(self, pl_module: pl.LightningModule, watched: dict[str, str]) -> dict[str, list[float]]:
        from lightning_depthgrow.callbacks.curvature_monitor import _training_step_loss

        linears = {path: pl_module.get_submodule(path) for path in watched}
        params = [t for m in linears.values() for t in (m.weight, m.bias) if t is not None]
        totals = [torch.zeros_like(t) for t in params]
        loss_fn = _training_step_loss(pl_module)
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.enable_grad():
            for item in self._batches:
                for total, grad in zip(totals, torch.autograd.grad(loss_fn(pl_module, item), params)):
                    total += grad / len(self._batches)
        grads = dict(zip(map(id, params), totals))
        scores = {}
        for path, m in linears.items():
            sq = grads[id(m.weight)].pow(2).sum(1)
            if m.bias is not None:
                sq = sq + grads[id(m.bias)].pow(2)
            scores[path] = (-sq / (m.in_features + (m.bias is not None))).tolist()
        self.passes.append(
            {
                "step": -1,
                "watched_layers": len(watched),
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "flops_estimate": self.num_batches * self.flops.step_flops(pl_module.model),
                "negative": sum(v < 0 for values in scores.values() for v in values),
                "neurons": sum(len(values) for values in scores.values()),
            }
        )
        return scores


def layer_kind(path: str) -> str:
    """``"mlp.fc"`` for ``model.blocks.1.mlp.fc`` and for its nested ``...mlp.fc.branches.0.proj``."""
    return ".".join(path.split(".branches.")[0].split(".")[3:])


def split_by_kind(scores: dict[str, list[float]]) -> dict[str, list[float]]:
    """Scores replaced by their rank within their layer kind, ``-1`` (best) .. ``-1/n`` (worst of ``n``), so the
    greedy selection takes the same top fraction of every kind's neurons: the budget is split across layer kinds
    (as in the paper) in proportion to each kind's total branch cost, instead of going to the kind with the
    largest raw scores."""
    by_kind: dict[str, list[tuple[float, str, int]]] = {}
    for path, values in scores.items():
        by_kind.setdefault(layer_kind(path), []).extend((v, path, i) for i, v in enumerate(values))
    out = {path: [0.0] * len(values) for path, values in scores.items()}
    for entries in by_kind.values():
        for rank, (_, path, i) in enumerate(sorted(entries)):
            out[path][i] = -(len(entries) - rank) / len(entries)
    return out


class BranchScale(Callback):
    """Multiplies every neuron branch's output by ``scale`` (a forward hook added before the first step the branch
    runs in). Under Adam this is the branch's learning rate times ``scale``: the update of ``W_A`` is normalised,
    its effect on the neuron's pre-activation is scaled. A benchmark lever, not a library feature."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        from lightning_depthgrow.surgery.neuron_branch import NeuronBranch

        for module in pl_module.modules():
            if type(module) is NeuronBranch and not getattr(module, "_bench_scaled", False):
                module.register_forward_hook(lambda m, args, out, s=self.scale: out * s)
                module._bench_scaled = True


class _Holder(nn.Module):
    """``model`` under the name the LightningModule gives it, so event paths (``model.blocks...``) resolve."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def replayed_start_model(config: WidthConfig, seed: int, events: list[dict[str, Any]]) -> nn.Module:
    """The start model's initial weights (as ``train_lm`` draws them for ``seed``) with ``events`` applied."""
    pl.seed_everything(seed, verbose=False)
    holder = _Holder(make_gpt(config))
    for event in events:
        apply_event(holder, ArchitectureEvent(event["kind"], event["spec"]))
    return holder.model


def run_variant(name: str, config: WidthConfig, seed: int, args: argparse.Namespace, runs: dict) -> dict[str, Any]:
    flops = ArchFlops(config)
    callbacks: list[Callback] = [flops]
    model = None
    growth: TimedNeuronGrowth | None = None
    run_config = config
    if name in GROWN:
        growth = TimedNeuronGrowth(
            step_budget=args.step_budget,
            final_budget=args.final_budget,
            scale_by_lr=True,
            min_neurons=args.min_neurons,
            layers=growth_layers(config.depth, args.layers),
            at=args.at if name == "grown" else args.early_at,
            nest=args.nest,
            seed=seed,
            flops=flops,
            selection=args.selection,
            kind_split=args.kind_split,
        )
        callbacks.insert(0, growth)
        if args.branch_scale != 1.0:
            callbacks.insert(1, BranchScale(args.branch_scale))
    elif name in ("uniform", "grown_arch_scratch", "uniform_flops"):
        grown = next((r for r in runs.get("grown", []) if r["seed"] == seed), None)
        if grown is None:
            raise ValueError(f"{name} needs the grown run of seed {seed} first")
        if name == "uniform":
            per_unit = config.depth * (2 * config.dim + 1)  # fc row + bias, proj column
            extra = round((grown["params"] - grown["start_params"]) / per_unit)
            run_config = with_hidden(config, hidden_units(config) + extra)
        elif name == "uniform_flops":
            run_config = with_hidden(config, flops_matched_hidden(config, grown["flops"]))
        else:
            model = replayed_start_model(config, seed, grown["events"])
    elif name == "wide":
        run_config = replace(config, mlp_ratio=args.wide_ratio)
    start_params = param_count(make_gpt(config))
    result = train_lm(run_config, seed, callbacks=callbacks, model=model)
    for row in result["curve"]:
        row["flops"] = flops.cumulative[row["step"] - 1]
    result.update(
        variant=name,
        mlp_hidden=hidden_units(run_config),
        start_params=start_params,
        flops=flops.cumulative[-1],
        flops_per_arch=flops.per_arch,
        train_loss=[round(v, 5) for v in flops.train_loss],
    )
    del result["block_steps"], result["depth_per_step"]
    if growth is not None:
        log = event_log(flops.module)
        result["events"] = [
            {
                "kind": e.kind,
                "spec": e.spec,
                "step": e.step,
                "params": e.cost["params"],
                "min_eigenvalue": min(e.reason["eigenvalues"]),
            }
            for e in log
        ]
        result["splitting_passes"] = growth.passes
        result["splitting_wall_s"] = sum(p["wall_s"] for p in growth.passes)
        result["splitting_cpu_s"] = sum(p["cpu_s"] for p in growth.passes)
        result["splitting_flops_estimate"] = sum(p["flops_estimate"] for p in growth.passes)
        result["branch_usage"] = branch_usage(flops.module.model, config)
    return result


@torch.no_grad()
def branch_usage(model: nn.Module, config: LMConfig) -> dict[str, Any]:
    """How much the grown branches do at the end, on the fixed validation windows: the loss rise when every
    branch is switched off, and per grown ``mlp.fc`` the norm of the branches' contribution relative to the
    Linear's own output."""
    from lightning_depthgrow.surgery.neuron_branch import BranchedLinear, ResidualGELU

    batch = val_batch(config)
    was_training = model.training
    model.eval()

    def loss() -> float:
        return float(lm_loss(model, batch))

    layers = {n: m for n, m in model.named_modules() if type(m) is BranchedLinear}
    outer = {n: m for n, m in layers.items() if ".branches." not in n}
    ratios: dict[str, float] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            base = F.linear(args[0], module.weight, module.bias)
            ratios[name] = float((output - base).norm() / base.norm())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in outer.items()]
    with_branches = loss()
    for handle in handles:
        handle.remove()
    saved = {n: m.branches for n, m in outer.items()}
    for m in outer.values():
        m.branches = nn.ModuleList()
    without = loss()
    for n, m in outer.items():
        m.branches = saved[n]
    # Linearised: every branch activation u + gelu(u) replaced by its tangent at birth, 1.5 u. A branch whose
    # u stays small is (nearly) linear: W x + 1.5 W_A x, a reparametrisation of the Linear's own rows that adds
    # no function; the loss rise measures how much of what the branches do needs their nonlinearity.
    acts = [m for m in model.modules() if type(m) is ResidualGELU]
    u_sq, u_count = 0.0, 0

    def pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal u_sq, u_count
        u_sq += float(args[0].double().pow(2).sum())
        u_count += args[0].numel()

    handles = [m.register_forward_pre_hook(pre) for m in acts]
    loss()
    for handle in handles:
        handle.remove()
    for m in acts:
        m.forward = lambda u: 1.5 * u
    linearised = loss()
    for m in acts:
        del m.forward
    model.train(was_training)
    return {
        "val_loss": with_branches,
        "val_loss_without_branches": without,
        "loss_rise_without_branches": without - with_branches,
        "val_loss_linearised": linearised,
        "loss_rise_linearised": linearised - with_branches,
        "branch_u_rms": math.sqrt(u_sq / max(u_count, 1)),
        "branch_output_ratio": ratios,
    }


def birth_effects(run: dict[str, Any], start: dict[str, Any] | None, window: int = 25) -> list[dict[str, float]]:
    """Per growth step ``g`` of a grown run: the mean training loss of the ``window`` steps after growth minus
    the ``window`` steps before, as a difference to the start model on the same batches when its trace is
    there (same seed: same data order, so batch-to-batch noise cancels), else raw."""
    loss = run.get("train_loss")
    if not loss:
        return []
    base = start.get("train_loss") if start else None
    diff = [a - b for a, b in zip(loss, base)] if base else loss
    out = []
    for g in sorted({e["step"] for e in run["events"]}):
        if g - window < 0 or g + window > len(diff):
            continue
        before = sum(diff[g - window : g]) / window
        after = sum(diff[g : g + window]) / window
        out.append({"step": g, "jump": after - before, "paired_with_start": bool(base)})
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    start = {r["seed"]: r for r in runs.get("start", [])}
    summary = {}
    for name, results in runs.items():
        loss, std = mean_std([r["val_loss"] for r in results])
        row: dict[str, Any] = {
            "seeds": [r["seed"] for r in results],
            "val_loss_mean": loss,
            "val_loss_std": std,
            "val_bpb_mean": loss / math.log(2),
            "val_loss_per_seed": [r["val_loss"] for r in results],
            "params": [r["params"] for r in results],
            "mlp_hidden": [r["mlp_hidden"] for r in results],
            "flops_mean": mean_std([r["flops"] for r in results])[0],
            "cpu_s_mean": mean_std([r["cpu_s"] for r in results])[0],
        }
        if start and all(r["seed"] in start for r in results):
            row["flops_vs_start"] = row["flops_mean"] / mean_std([start[r["seed"]]["flops"] for r in results])[0]
        for other in ("start", "uniform", "grown"):
            peer = {r["seed"]: r for r in runs.get(other, [])}
            if other != name and peer and all(r["seed"] in peer for r in results):
                diffs = [r["val_loss"] - peer[r["seed"]]["val_loss"] for r in results]
                row[f"paired_vs_{other}"] = diffs
                row[f"paired_vs_{other}_mean"], row[f"paired_vs_{other}_std"] = mean_std(diffs)
        if name in GROWN:
            row["splitting_cpu_s_mean"] = mean_std([r["splitting_cpu_s"] for r in results])[0]
            row["splitting_flops_vs_training"] = mean_std(
                [r["splitting_flops_estimate"] / r["flops"] for r in results]
            )[0]
            row["growth_steps"] = [sorted({e["step"] for e in r["events"]}) for r in results]
            row["loss_rise_without_branches"] = [r["branch_usage"]["loss_rise_without_branches"] for r in results]
            row["loss_rise_linearised"] = [r["branch_usage"].get("loss_rise_linearised") for r in results]
            row["branch_u_rms"] = [r["branch_usage"].get("branch_u_rms") for r in results]
            row["birth_jumps"] = [birth_effects(r, start.get(r["seed"])) for r in results]
        summary[name] = row
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| variant | seeds | params | MLP hidden | val loss (nats/byte) | paired vs start | paired vs uniform "
        "| FLOPs / start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():

        def paired(other: str, row: dict[str, Any] = row) -> str:
            key = f"paired_vs_{other}_mean"
            if key not in row:
                return ""
            per_seed = ", ".join(f"{d:+.4f}" for d in row[f"paired_vs_{other}"])
            return f"{row[key]:+.4f} ± {row[f'paired_vs_{other}_std']:.4f} ({per_seed})"

        params = sorted(set(row["params"]))
        hidden = sorted(set(row["mlp_hidden"]))
        lines.append(
            f"| {name} | {','.join(map(str, row['seeds']))} | {'/'.join(f'{p:,}' for p in params)} | "
            f"{'/'.join(map(str, hidden))} "
            f"{'(+ branches)' if name in (*GROWN, 'grown_arch_scratch') else ''} | "
            f"{row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f} | {paired('start')} | {paired('uniform')} | "
            f"{row.get('flops_vs_start', float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--start-ratio", type=float, default=2.0)
    parser.add_argument("--wide-ratio", type=float, default=4.0)
    parser.add_argument("--step-budget", type=float, default=0.0625)
    parser.add_argument("--final-budget", type=float, default=1.25)
    parser.add_argument("--min-neurons", type=int, default=4)
    parser.add_argument("--at", type=float, nargs="+", default=list(PAPER_AT))
    parser.add_argument(
        "--early-at", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2, 0.25], help="grown_early's fractions"
    )
    parser.add_argument(
        "--selection",
        choices=("splitting", "random", "gradient"),
        default="splitting",
        help="which neurons the grown variants branch: the splitting criterion, random ones (control) or the "
        "squared gradient of each neuron's weight row per parameter (any layer kind)",
    )
    parser.add_argument(
        "--layers",
        choices=tuple(LAYER_SETS),
        default="fc",
        help="which Linears of every block get branches (not 'fc': with --selection gradient or random)",
    )
    parser.add_argument(
        "--kind-split",
        action="store_true",
        help="with --selection gradient: rank neurons within each layer kind (the budget split across kinds)",
    )
    parser.add_argument("--branch-scale", type=float, default=1.0, help="scale of every branch's output (lever)")
    parser.add_argument("--nest", action=argparse.BooleanOptionalAction, default=True, help="NeuronGrowth(nest=)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:4]))
    parser.add_argument("--reuse", type=Path, nargs="+", default=[], help="result files of the same setup to merge")
    parser.add_argument(
        "--reuse-variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="take only these variants from --reuse (e.g. start uniform, to compare a new growth setting)",
    )
    parser.add_argument("--train-bytes", type=int, default=None, help="smaller corpus (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "neuron_lm.json")
    parser.add_argument(
        "--levers",
        action="store_true",
        help="only tabulate the levers (LEVERS) from the result files next to --out, paired per seed",
    )
    args = parser.parse_args(argv)
    if args.levers:
        return lever_table(args.out.parent)
    if args.layers != "fc" and args.selection == "splitting":
        parser.error("--layers other than 'fc' needs --selection gradient or random (no activation to split on)")
    torch.set_num_threads(1)
    config = WidthConfig(steps=args.steps, depth=args.depth, mlp_ratio=args.start_ratio)
    if args.train_bytes is not None:
        config = replace(
            config, corpus=replace(config.corpus, train_bytes=args.train_bytes, val_bytes=args.train_bytes // 10)
        )
    setup = {
        "lm": lm_setup(config),
        "step_budget": args.step_budget,
        "final_budget": args.final_budget,
        "scale_by_lr": True,
        "min_neurons": args.min_neurons,
        "at": args.at,
        "at_steps": [round(f * args.steps) for f in args.at],
        "early_at": args.early_at,
        "selection": args.selection,
        "layers": args.layers,
        "kind_split": args.kind_split,
        "nest": args.nest,
        "branch_scale": args.branch_scale,
        "wide_ratio": args.wide_ratio,
        "start_params": param_count(make_gpt(config)),
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    for source in args.reuse:
        previous = json.loads(source.read_text())
        if previous["setup"]["lm"] != json.loads(json.dumps(setup["lm"])):
            raise ValueError(f"{source} was made with another LM configuration: {previous['setup']['lm']}")
        for name, results in previous["runs"].items():
            if args.reuse_variants is not None and name not in args.reuse_variants:
                continue
            runs.setdefault(name, []).extend(r for r in results if r["seed"] in args.seeds)
        setup.setdefault("merged_setups", []).append(previous["setup"])
    order = [v for v in VARIANTS if v in args.variants]
    for seed in args.seeds:
        for name in order:
            if any(r["seed"] == seed for r in runs.get(name, [])):
                continue
            result = run_variant(name, config, seed, args, runs)
            runs.setdefault(name, []).append(result)
            _write(args.out, {"setup": setup, "runs": runs})  # partial results survive a stop
            extra = ""
            if name in GROWN:
                usage = result["branch_usage"]
                extra = (
                    f" growth steps {sorted({e['step'] for e in result['events']})} splitting "
                    f"{result['splitting_cpu_s']:.1f} cpu s; loss rise without branches "
                    f"{usage['loss_rise_without_branches']:+.4f}, linearised {usage['loss_rise_linearised']:+.4f} "
                    f"(u rms {usage['branch_u_rms']:.3f})"
                )
            print(
                f"seed {seed} {name:20s} params {result['params']:,} hidden {result['mlp_hidden']} val_loss "
                f"{result['val_loss']:.4f} flops {result['flops'] / 1e12:.3f}T cpu {result['cpu_s']:.1f}s "
                f"wall {result['wall_s']:.1f}s{extra}",
                flush=True,
            )
    for results in runs.values():
        results.sort(key=lambda r: r["seed"])
    summary = summarise(runs)
    _, _, corpus = stdlib_corpus(config.corpus)
    record = {
        "setup": setup,
        "corpus": corpus,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "summary": summary,
        "runs": runs,
    }
    _write(args.out, record)
    table = markdown_table(summary)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out}")
    return record


#: The levers tried on seeds 0-2 (issue 14): (label, result file, variant, reference file, reference variant).
#: ``start`` and ``uniform`` come from ``neuron_lm.json`` (the uniform model matched to the paper-schedule run).
LEVERS = (
    ("paper schedule (at 250..1450), splitting", "neuron_lm.json", "grown", None, None),
    ("early schedule (at 75..375), splitting", "neuron_lm.json", "grown_early", "neuron_lm.json", "grown"),
    ("paper schedule, random neurons", "neuron_lm_lever_random.json", "grown", "neuron_lm.json", "grown"),
    (
        "early schedule, branch output x0.3",
        "neuron_lm_lever_early_scale03.json",
        "grown",
        "neuron_lm.json",
        "grown_early",
    ),
    (
        "early schedule, branch output x3",
        "neuron_lm_lever_early_scale3.json",
        "grown",
        "neuron_lm.json",
        "grown_early",
    ),
    ("grown shape trained from step 0", "neuron_lm.json", "grown_arch_scratch", "neuron_lm.json", "grown"),
    (
        "paper schedule, the paper's four layer kinds, gradient criterion",
        "neuron_lm_lever_paper_layers.json",
        "grown",
        "neuron_lm.json",
        "grown",
    ),
    (
        "paper schedule, fc and mlp.proj, gradient criterion ranked per kind",
        "neuron_lm_lever_fc_proj.json",
        "grown",
        "neuron_lm.json",
        "grown",
    ),
    (
        "uniform at the grown run's training FLOPs",
        "neuron_lm_uniform_flops.json",
        "uniform_flops",
        "neuron_lm.json",
        "grown",
    ),
)


def lever_table(results: Path) -> dict[str, Any]:
    """Per-seed figures of every lever in :data:`LEVERS` (files under ``results``), paired with the start model,
    the width-matched uniform model and the lever's reference; writes ``neuron_lm_levers.json`` and ``.md``."""
    base = json.loads((results / "neuron_lm.json").read_text())["runs"]
    start = {r["seed"]: r for r in base["start"]}
    uniform = {r["seed"]: r for r in base["uniform"]}
    rows = []
    for label, file, variant, ref_file, ref_variant in LEVERS:
        path = results / file
        if not path.exists():
            continue
        runs = {r["seed"]: r for r in json.loads(path.read_text())["runs"].get(variant, [])}
        ref = {}
        if ref_file is not None:
            ref = {r["seed"]: r for r in json.loads((results / ref_file).read_text())["runs"][ref_variant]}
        seeds = sorted(runs)
        row: dict[str, Any] = {
            "lever": label,
            "file": file,
            "variant": variant,
            "seeds": seeds,
            "params": [runs[s]["params"] for s in seeds],
            "val_loss": [runs[s]["val_loss"] for s in seeds],
        }
        row["val_loss_mean"], row["val_loss_std"] = mean_std(row["val_loss"])
        for name, peer in (("start", start), ("uniform", uniform), ("reference", ref)):
            if peer and all(s in peer for s in seeds):
                diffs = [runs[s]["val_loss"] - peer[s]["val_loss"] for s in seeds]
                row[f"vs_{name}"] = diffs
                row[f"vs_{name}_mean"], row[f"vs_{name}_std"] = mean_std(diffs)
        if ref_variant is not None:
            row["reference"] = f"{ref_file}:{ref_variant}"
        rows.append(row)

    def paired(row: dict[str, Any], name: str) -> str:
        if f"vs_{name}" not in row:
            return ""
        per_seed = ", ".join(f"{d:+.4f}" for d in row[f"vs_{name}"])
        return f"{row[f'vs_{name}_mean']:+.4f} ± {row[f'vs_{name}_std']:.4f} ({per_seed})"

    lines = [
        "| lever | seeds | params | val loss (nats/byte) | vs start | vs uniform | vs reference | reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['lever']} | {','.join(map(str, row['seeds']))} | {min(row['params']):,}-{max(row['params']):,} "
            f"| {row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f} | {paired(row, 'start')} "
            f"| {paired(row, 'uniform')} | {paired(row, 'reference')} | {row.get('reference', '')} |"
        )
    record = {"levers": rows}
    _write(results / "neuron_lm_levers.json", record)
    (results / "neuron_lm_levers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
