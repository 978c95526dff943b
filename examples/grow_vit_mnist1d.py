"""Grow a tiny timm ViT on MNIST-1D while it trains, then compare it with a fixed model of the final size.

The grown model starts with 2 blocks; :class:`~lightning_depthgrow.callbacks.depth_growth.DepthGrowth` inserts an
identity-initialised block after the block with the highest Hessian trace per parameter every ``--grow-every``
epochs after a warm-up, until the parameter budget (``--budget`` times the starting size) is used. The fixed
baseline is built at the grown model's final depth and trained for the same number of epochs. Both runs print
their accuracy and wall time; the grown run also prints its architecture after every epoch and writes
``architecture_history.json`` plus an HTML report (ArchitectureLogger) under ``--out``.

Run (about 1-2 minutes on 2 CPU cores, 45 CPU seconds; ``--quick`` for a smoke run of a few seconds):

    python examples/grow_vit_mnist1d.py --epochs 12 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

if __package__ in (None, ""):  # run as a script: make ``examples.common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, mnist1d_tensors, quiet_trainer
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.architecture_logger import ArchitectureLogger
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor
from lightning_depthgrow.callbacks.depth_growth import DepthGrowth
from lightning_depthgrow.measure import count_parameters


class ArchitecturePrinter(Callback):
    """Prints depth, parameters, validation accuracy and the growth events of every epoch."""

    def __init__(self) -> None:
        self._seen = 0

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
            r = event.reason
            others = ", ".join(f"{u['block']} {u['score']:.3g}" for u in r.get("runners_up", [])) or "none"
            print(
                f"    grew: new block after {r['block']} ({r['score_name']} {r['score']:.3g}; runners-up {others}); "
                f"budget {r['budget_after']:,.0f}/{r['budget_limit']:,.0f} {r['budget_metric']}; "
                f"surgery+rewrap {event.cost['seconds'] * 1e3:.1f} ms",
                flush=True,
            )
        self._seen = len(event_log(pl_module))


class EpochClock(Callback):
    """Records, after every validation, the depth, val_acc and the wall/CPU seconds since training started.

    CPU seconds (``time.process_time``, one thread) are what a run costs; on a shared machine wall time also
    counts the time other jobs hold the cores.
    """

    def __init__(self) -> None:
        self.start = (0.0, 0.0)
        self.rows: list[dict[str, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = (time.perf_counter(), time.process_time())

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


def build_trainer(epochs: int, callbacks: list[Callback], out: Path, quick: bool) -> pl.Trainer:
    return quiet_trainer(
        epochs,
        callbacks,
        default_root_dir=str(out),
        num_sanity_val_steps=0,
        limit_train_batches=4 if quick else 1.0,
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
) -> dict[str, Any]:
    """Train a 2-block ViT that grows to ``budget`` x its parameters; returns accuracy, time and architecture.

    ``history`` adds the ArchitectureLogger (JSON history and HTML report); ``verbose`` prints every epoch.
    """
    pl.seed_everything(seed, verbose=False)
    module = Classifier(make_vit(depth=2), max_epochs=epochs)
    # Uniform placement (the default): curvature placement did not beat it on MNIST-1D or on the byte-level LM
    # (docs/growth.md). With placement="curvature", a private monitor with 2 probes on the last batch (one estimate
    # costs about 5 training steps here).
    monitor = CurvatureMonitor(num_batches=1, num_probes=2, log=False, seed=seed) if placement == "curvature" else None
    growth = DepthGrowth.paper(
        final_budget=budget,
        warmup_epochs=warmup_epochs,
        grow_every=grow_every,
        placement=placement,
        curvature_monitor=monitor,
        seed=seed,
    )
    clock = EpochClock()
    callbacks: list[Callback] = [growth, clock]
    if history:
        callbacks.append(ArchitectureLogger(report=not quick))
    if verbose:
        callbacks.append(ArchitecturePrinter())
    trainer = build_trainer(epochs, callbacks, out, quick)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, MNIST1DDataModule(seed=seed))
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
        "surgery_s": [e.cost["seconds"] for e in events],
        "epoch_s": wall / epochs,
    }


def run_fixed(epochs: int, seed: int, depth: int, out: Path, quick: bool = False) -> dict[str, Any]:
    """Train a fixed ViT of ``depth`` blocks for ``epochs`` epochs; returns accuracy, time and size."""
    pl.seed_everything(seed, verbose=False)
    module = Classifier(make_vit(depth=depth), max_epochs=epochs)
    clock = EpochClock()
    trainer = build_trainer(epochs, [clock], out, quick)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, MNIST1DDataModule(seed=seed))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "val_acc": float(trainer.callback_metrics["val_acc"]),
        "wall_s": wall,
        "cpu_s": cpu,
        "depth": depth,
        "params": count_parameters(module),
        "curve": clock.rows,
    }


def time_to_accuracy(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first row of an :class:`EpochClock` curve whose ``val_acc`` reaches ``target`` (``None``: never)."""
    return next((row for row in curve if row["val_acc"] >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=3.0, help="final parameter budget, x the starting model")
    parser.add_argument("--quick", action="store_true", help="a few batches per epoch, 3 epochs: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/grow_vit_mnist1d"))
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    warmup, every = (1, 1) if args.quick else (2, 2)
    mnist1d_tensors()  # generate the data set once, outside the timed runs

    print(f"== grown ViT: 2 blocks -> {args.budget}x parameters, {epochs} epochs ==", flush=True)
    grown = run_grown(epochs, args.seed, args.out, args.budget, warmup, every, quick=args.quick)
    print(f"== fixed ViT: {grown['depth']} blocks from the start, {epochs} epochs ==", flush=True)
    fixed = run_fixed(epochs, args.seed, grown["depth"], args.out, quick=args.quick)

    print()
    print(f"{'model':8s} {'depth':>5s} {'params':>9s} {'val_acc':>8s} {'wall s':>7s} {'CPU s':>7s}")
    for name, r in (("grown", grown), ("fixed", fixed)):
        print(f"{name:8s} {r['depth']:5d} {r['params']:9,d} {r['val_acc']:8.3f} {r['wall_s']:7.1f} {r['cpu_s']:7.1f}")
    print(f"grown/fixed: wall {grown['wall_s'] / fixed['wall_s']:.2f}, CPU {grown['cpu_s'] / fixed['cpu_s']:.2f}")
    reached = time_to_accuracy(fixed["curve"], grown["val_acc"])
    when = f"epoch {reached['epoch']}, {reached['cpu_s']:.1f} CPU s" if reached else "never"
    print(f"the fixed model reached the grown model's final val_acc {grown['val_acc']:.3f} at: {when}")
    print(f"architecture history and report: {args.out}")
    (args.out / "comparison.json").write_text(json.dumps({"grown": grown, "fixed": fixed}, indent=2))


if __name__ == "__main__":
    main()
