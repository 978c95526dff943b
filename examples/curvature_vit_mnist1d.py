"""Per-block curvature of a tiny timm ViT while it trains on MNIST-1D, with :class:`CurvatureMonitor`.

After every epoch it prints, per block, the Hutchinson estimate of the Hessian trace, its standard error
and the trace per parameter, and what the estimate cost as a fraction of the epoch's training time.

    python examples/curvature_vit_mnist1d.py --epochs 3

Runs offline (MNIST-1D is generated) in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

if __package__ in (None, ""):  # run as a script: make ``examples.common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, quiet_trainer
from lightning_depthgrow.callbacks.curvature_monitor import CurvatureMonitor


class TimedCurvatureMonitor(CurvatureMonitor):
    """A :class:`CurvatureMonitor` that also records the process CPU time of every estimate.

    CPU time (all threads of this process) is what the cost fraction is computed from: unlike wall time it
    does not grow when other processes compete for the same cores.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cpu_seconds: list[float] = []

    def estimate_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        start = time.process_time()
        estimate = super().estimate_now(trainer, pl_module)
        self.cpu_seconds.append(time.process_time() - start)
        return estimate


class CurvatureTable(Callback):
    """Prints the monitor's latest estimate and its cost; place it after the monitor in ``callbacks``.

    Cost = CPU time of the estimate / CPU time of the rest of the epoch (training steps and validation).
    """

    def __init__(self, monitor: TimedCurvatureMonitor) -> None:
        self.monitor = monitor
        self.fractions: list[float] = []
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.process_time()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.monitor.history[-1]
        if record["epoch"] != trainer.current_epoch:
            return
        # This hook runs after the monitor's: the epoch's CPU time includes the estimate, subtract it.
        estimate_cpu = self.monitor.cpu_seconds[-1]
        rest_cpu = time.process_time() - self._epoch_start - estimate_cpu
        self.fractions.append(estimate_cpu / rest_cpu)
        loss = trainer.callback_metrics.get("train_loss", torch.tensor(float("nan"))).item()
        print(f"\nepoch {trainer.current_epoch}  train_loss {loss:.3f}  ({record['backend']})")
        print(f"{'block':<16} {'trace':>10} {'stderr':>10} {'trace/param':>12} {'params':>8}")
        for block, trace in record["traces"].items():
            per_param = record["trace_per_param"][block]
            print(
                f"{block:<16} {trace['mean']:>10.3f} {trace['stderr']:>10.3f} {per_param:>12.2e} "
                f"{record['num_params'][block]:>8d}"
            )
        print(
            f"monitor cost: {estimate_cpu:.2f} CPU-s ({record['seconds']:.2f} s wall) for {trace['num_probes']} "
            f"probes on {self.monitor.num_batches} batch(es) = {100 * estimate_cpu / rest_cpu:.1f}% of the rest "
            f"of the epoch ({rest_cpu:.2f} CPU-s of training and validation)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=3, help="number of ViT blocks")
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--num-batches", type=int, default=1, help="recent training batches to estimate on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    model = Classifier(make_vit(depth=args.depth), max_epochs=args.epochs)
    monitor = TimedCurvatureMonitor(num_batches=args.num_batches, num_probes=args.num_probes, seed=args.seed)
    table = CurvatureTable(monitor)
    trainer = quiet_trainer(args.epochs, [monitor, table], num_sanity_val_steps=0)
    trainer.fit(model, MNIST1DDataModule(batch_size=128, seed=args.seed))
    if table.fractions:
        mean = sum(table.fractions) / len(table.fractions)
        print(
            f"\nmean monitor cost: {100 * mean:.1f}% of the rest of an epoch (CPU time) "
            f"(val_acc {trainer.callback_metrics['val_acc'].item():.3f})"
        )


if __name__ == "__main__":
    main()
