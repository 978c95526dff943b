"""Grow a tiny timm ViT on MNIST-1D while it trains, then compare it with fixed models of the final size.

The grown model starts with 2 blocks. :class:`~lightning_depthgrow.callbacks.depth_growth.DepthGrowth` with its
defaults (``--recipe default``, the recipe that paid on the byte-level LM benchmark) triples the block stack after
a third of the optimizer steps (G_stack, 2 -> 6 blocks) and ramps the copies in over 12% of the run;
``--recipe paper`` is ``DepthGrowth.paper()``: zero-initialised blocks every 2 epochs after a 2-epoch warm-up
until ``--budget`` times the starting parameters. Two baselines are built at the grown model's final depth: one
trained for the same number of epochs, one trained (with its own full schedule) for the epochs that cost what the
grown run cost in training FLOPs. A fixed 4-block model (cheaper than the grown run) is trained as well: growth
has to beat it too to be worth its FLOPs. Every run prints its accuracy, FLOPs and time; the grown run also prints
its architecture after every epoch and writes ``architecture_history.json`` plus an HTML report
(ArchitectureLogger) under ``--out``. MNIST-1D is data-limited: growth does not beat a same-size model trained from
the start here (see ``docs/growth.md``); the demo prints whatever this run measures.

``--train-draws 44 45 46`` adds three more MNIST-1D draws (generated offline, 5,000 signals each) to the 4,000
training signals: the data-rich protocol of ``benchmarks/results/growth_rich_protocol.md``. There too growth was not
above the fixed-model frontier (12 epochs, 5 fresh seeds: grown - fixed 6 at equal FLOPs -0.3 ± 1.0 points, grown -
fixed 4 -0.9 ± 1.2; ``benchmarks/results/growth_rich_confirm.md``).

Run (a few minutes on 2 CPU cores; ``--quick`` for a smoke run of a few seconds):

    python examples/grow_vit_mnist1d.py --epochs 12 --seed 0
    python examples/grow_vit_mnist1d.py --epochs 12 --train-draws 44 45 46  # 19,000 training signals
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

if __package__ in (None, ""):  # run as a script: make ``examples.common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, mnist1d_tensors, quiet_trainer
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.measure import count_flops, count_parameters

BATCH_SIZE = 128  # MNIST1DDataModule's
# The demo's data and length (see the module docstring); SMALL_DEPTH: the cheaper fixed model it also trains.
TRAIN_DRAWS: tuple[int, ...] = ()
EPOCHS = 12
SMALL_DEPTH = 4


class ArchitecturePrinter(Callback):
    """Prints depth, parameters, validation accuracy and the growth events of every epoch."""

    def __init__(self, growth: DepthGrowth) -> None:
        self._seen = 0
        self.growth = growth

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        blocks = pl_module.model.blocks
        acc = float(trainer.callback_metrics.get("val_acc", float("nan")))
        print(
            f"epoch {trainer.current_epoch:3d} | depth {len(blocks)} | params {count_parameters(pl_module):,} | "
            f"val_acc {acc:.3f}",
            flush=True,
        )
        for event in event_log(pl_module)[self._seen :]:
            cost = f"; surgery+rewrap {event.cost['seconds'] * 1e3:.1f} ms" if "seconds" in event.cost else ""
            print(f"    step {event.step}: {self.growth.describe(event)}{cost}", flush=True)
        self._seen = len(event_log(pl_module))


class EpochClock(Callback):
    """Records, after every validation, the depth, val_acc and the wall/CPU seconds since training started, and
    the training steps taken at each depth (``steps_at_depth``, counted as each batch starts: what it costs).

    CPU seconds (``time.process_time``, one thread) are what a run costs; on a shared machine wall time also
    counts the time other jobs hold the cores.
    """

    def __init__(self) -> None:
        self.start = (0.0, 0.0)
        self.rows: list[dict[str, float]] = []
        self.steps_at_depth: Counter[int] = Counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.steps_at_depth[len(pl_module.model.blocks)] += 1

    def train_flops(self) -> int:
        """Training FLOPs of the run: each step at the depth the model had for it (a step's cost is proportional to
        the forward FLOPs at that depth)."""
        return sum(steps * step_flops(depth) for depth, steps in self.steps_at_depth.items())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "depth": len(pl_module.model.blocks),
                "val_acc": float(trainer.callback_metrics.get("val_acc", float("nan"))),
                "wall_s": time.perf_counter() - self.start[0],
                "cpu_s": time.process_time() - self.start[1],
            }
        )


def build_trainer(epochs: int, callbacks: list[Callback], out: Path, quick: bool, max_steps: int = -1) -> pl.Trainer:
    return quiet_trainer(
        epochs,
        callbacks,
        default_root_dir=str(out),
        num_sanity_val_steps=0,
        limit_train_batches=4 if quick else 1.0,
        max_steps=max_steps,
    )


def run_grown(
    epochs: int,
    seed: int,
    out: Path,
    budget: float = 3.0,
    warmup_epochs: int = 2,
    grow_every: int = 2,
    placement: str = "uniform",
    quick: bool = False,
    verbose: bool = True,
    history: bool = True,
    recipe: str = "paper",
    train_draws: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Train a 2-block ViT that grows while it trains; returns accuracy, time, training FLOPs and architecture.

    ``recipe="paper"``: ``DepthGrowth.paper()`` to ``budget`` x the parameters (``warmup_epochs``, ``grow_every``,
    ``placement`` apply); ``recipe="default"``: ``DepthGrowth()``'s defaults (ramped G_stack, 2 -> 6 blocks after
    a third of the steps). ``history`` adds the ArchitectureLogger (JSON history and HTML report); ``verbose``
    prints every epoch. ``train_draws``: more MNIST-1D draws in the training set (:class:`MNIST1DDataModule`).
    """
    pl.seed_everything(seed, verbose=False)
    module = Classifier(make_vit(depth=2), max_epochs=epochs)
    # Uniform placement (the default): curvature placement did not beat it on MNIST-1D or on the byte-level LM
    # (docs/growth.md). With placement="curvature", a private monitor with 2 probes on the last batch (one estimate
    # costs about 5 training steps here).
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False, seed=seed) if placement == "curvature" else None
    if recipe == "default":
        growth = DepthGrowth(seed=seed)
    elif recipe == "paper":
        growth = DepthGrowth.paper(
            final_budget=budget,
            warmup_epochs=warmup_epochs,
            grow_every=grow_every,
            placement=placement,
            curvature_monitor=monitor,
            seed=seed,
        )
    else:
        raise ValueError(f"recipe={recipe!r}: use 'default' (DepthGrowth()) or 'paper' (DepthGrowth.paper())")
    clock = EpochClock()
    callbacks: list[Callback] = [growth, clock]
    if history:
        callbacks.append(ArchitectureLogger(report=not quick))
    if verbose:
        callbacks.append(ArchitecturePrinter(growth))
    trainer = build_trainer(epochs, callbacks, out, quick)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, MNIST1DDataModule(seed=seed, train_draws=train_draws))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    events = event_log(module)
    return {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "wall_s": wall,
        "cpu_s": cpu,
        "depth": len(module.model.blocks),
        "params": count_parameters(module),
        "curve": clock.rows,
        "events": [e.to_dict() for e in events],
        "surgery_s": [e.cost["seconds"] for e in events if "seconds" in e.cost],
        "epoch_s": wall / epochs,
        "steps": trainer.global_step,
        "train_flops": clock.train_flops(),
    }


@cache
def step_flops(depth: int) -> int:
    """Forward FLOPs of one training batch of a ``depth``-block demo ViT (proportional to a training step's)."""
    return count_flops(make_vit(depth=depth), torch.zeros(BATCH_SIZE, 1, 1, 40)).total


def run_fixed(
    epochs: int,
    seed: int,
    depth: int,
    out: Path,
    quick: bool = False,
    max_steps: int = -1,
    train_draws: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Train a fixed ViT of ``depth`` blocks for ``epochs`` epochs, or ``max_steps`` optimizer steps when given
    (its warm-up and cosine then span those steps; validated at the end); returns accuracy, time and size.
    ``train_draws``: more MNIST-1D draws in the training set (:class:`MNIST1DDataModule`)."""
    pl.seed_everything(seed, verbose=False)
    module = Classifier(make_vit(depth=depth), max_epochs=epochs)
    clock = EpochClock()
    trainer = build_trainer(epochs, [clock], out, quick, max_steps=max_steps)
    start, cpu = time.perf_counter(), time.process_time()
    data = MNIST1DDataModule(seed=seed, train_draws=train_draws)
    trainer.fit(module, data)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if max_steps >= 0:  # stopped inside an epoch: validate the final weights
        val_acc = float(trainer.validate(module, data, verbose=False)[0]["val_acc"])
    else:
        val_acc = float(trainer.callback_metrics["val_acc"])
    return {
        "val_acc": val_acc,
        "wall_s": wall,
        "cpu_s": cpu,
        "depth": depth,
        "params": count_parameters(module),
        "curve": clock.rows,
        "steps": trainer.global_step,
        "train_flops": clock.train_flops(),
    }


def time_to_accuracy(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first row of an :class:`EpochClock` curve whose ``val_acc`` reaches ``target`` (``None``: never)."""
    return next((row for row in curve if row["val_acc"] >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recipe",
        choices=("default", "paper"),
        default="default",
        help="default: DepthGrowth() (ramped G_stack, 2 -> 6 blocks); paper: DepthGrowth.paper()",
    )
    parser.add_argument("--budget", type=float, default=3.0, help="--recipe paper: final parameters, x the start")
    parser.add_argument(
        "--train-draws",
        type=int,
        nargs="*",
        default=list(TRAIN_DRAWS),
        metavar="SEED",
        help="more MNIST-1D draws (generator seeds, not 42 or 43) whose every signal (5,000 a draw) joins the "
        f"4,000 training signals (default: {' '.join(map(str, TRAIN_DRAWS)) or 'none'}; pass the flag alone for "
        "none)",
    )
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch, 3 epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/grow_vit_mnist1d"))
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    warmup, every = (1, 1) if args.quick else (2, 2)
    draws = tuple(args.train_draws)
    MNIST1DDataModule(train_draws=draws)  # refuses the validation draws before any run
    for draw in (42, *draws):
        mnist1d_tensors(draw)  # generate the data once, outside the timed runs
    signals = 4000 + 5000 * len(draws)
    data = f"draws {', '.join(map(str, draws))} added: {signals:,} training signals" if draws else "4,000 signals"

    what = "DepthGrowth() (ramped G_stack)" if args.recipe == "default" else f"DepthGrowth.paper(), {args.budget}x"
    print(f"== grown ViT: 2 blocks, {what}, {epochs} epochs, MNIST-1D ({data}) ==", flush=True)
    grown = run_grown(
        epochs,
        args.seed,
        args.out,
        args.budget,
        warmup,
        every,
        quick=args.quick,
        recipe=args.recipe,
        train_draws=draws,
    )
    depth = grown["depth"]
    print(f"== fixed ViT: {depth} blocks from the start, {epochs} epochs ==", flush=True)
    fixed = run_fixed(epochs, args.seed, depth, args.out, quick=args.quick, train_draws=draws)
    # Equal training compute: the same model trained for the optimizer steps the grown run's FLOPs pay for, with
    # its own full schedule (warm-up and cosine over those steps).
    equal_steps = max(1, round(fixed["steps"] * grown["train_flops"] / fixed["train_flops"]))
    print(f"== fixed ViT: {depth} blocks, {equal_steps} steps (the grown run's training FLOPs) ==", flush=True)
    equal = run_fixed(epochs, args.seed, depth, args.out, quick=args.quick, max_steps=equal_steps, train_draws=draws)
    # The fixed model that costs less than the grown run: growth has to beat it too to be worth its FLOPs.
    print(f"== fixed ViT: {SMALL_DEPTH} blocks from the start, {epochs} epochs ==", flush=True)
    small = run_fixed(epochs, args.seed, SMALL_DEPTH, args.out, quick=args.quick, train_draws=draws)

    print()
    print(
        f"{'model':14s} {'depth':>5s} {'steps':>6s} {'params':>9s} {'val_acc':>8s} {'train FLOPs':>12s} "
        f"{'wall s':>7s} {'CPU s':>7s}"
    )
    rows = (("grown", grown), ("fixed", fixed), ("fixed, = FLOPs", equal), (f"fixed {SMALL_DEPTH}", small))
    for name, r in rows:
        print(
            f"{name:14s} {r['depth']:5d} {r['steps']:6d} {r['params']:9,d} {r['val_acc']:8.3f} "
            f"{r['train_flops'] / fixed['train_flops']:11.2f}x {r['wall_s']:7.1f} {r['cpu_s']:7.1f}"
        )
    for name, r in (("fixed", fixed), ("fixed at equal FLOPs", equal), (f"fixed {SMALL_DEPTH}", small)):
        print(f"grown - {name}: {100 * (grown['val_acc'] - r['val_acc']):+.1f} points of val_acc")
    reached = time_to_accuracy(fixed["curve"], grown["val_acc"])
    when = f"epoch {reached['epoch']}, {reached['cpu_s']:.1f} CPU s" if reached else "never"
    print(f"the fixed model reached the grown model's final val_acc {grown['val_acc']:.3f} at: {when}")
    task = "with more training data" if draws else "on a data-limited task"
    print(f"one seed {task}; benchmarks/ has the multi-seed comparisons (docs/growth.md)")
    print(f"architecture history and report: {args.out}")
    comparison = {
        "train_draws": list(draws),
        "grown": grown,
        "fixed": fixed,
        "fixed_equal_flops": equal,
        f"fixed_{SMALL_DEPTH}": small,
    }
    (args.out / "comparison.json").write_text(json.dumps(comparison, indent=2))


if __name__ == "__main__":
    main()
