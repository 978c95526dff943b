"""Differentiable Model Scaling on MNIST-1D: search a tiny timm ViT down to half its FLOPs, then train.

The supernet (4 blocks, width 64, 4 heads, MLP 128) trains with DMS gates for ``--search-epochs``
epochs while the resource loss pulls its FLOPs to ``--target``; at export DMS fits depth and width to
the target (within 5%) and slices the model. ``--pipeline b`` (default) trains the sliced model on for
the remaining epochs; ``--pipeline a`` stops after the export, rebuilds the found architecture from a
fresh supernet (``export_architecture``/``build_architecture``) and trains it from scratch for
``--epochs``, reporting the search's share of the CPU time. Prints the architecture and the accuracy.

Run: ``python examples/dms_mnist1d.py [--pipeline a]`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, quiet_trainer
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import build_architecture, export_architecture
from lightning_depthgrow.measure import count_flops, count_parameters


def describe(vit: torch.nn.Module) -> str:
    rows = [
        f"  block {i}: heads {b.attn.num_heads}, mlp hidden {b.mlp.fc1.out_features}" for i, b in enumerate(vit.blocks)
    ]
    return "\n".join([f"  depth {len(vit.blocks)}", *rows])


class StopAfterExport(pl.Callback):
    """Pipeline (a): end the search run as soon as DMS has exported (listed after the DMS callback)."""

    def __init__(self, search_epochs: int) -> None:
        self.search_epochs = search_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.search_epochs:
            trainer.should_stop = True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", choices=["a", "b"], default="b", help="a: train from scratch; b: continue")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    model = Classifier(make_vit(depth=4, embed_dim=64, num_heads=4, mlp_ratio=2.0), max_epochs=args.epochs)
    example = model.example_input_array
    flops_before, params_before = count_flops(model, example).total, count_parameters(model)
    dms = DifferentiableModelScaling(target=args.target, search_epochs=args.search_epochs)
    start = time.process_time()
    if args.pipeline == "b":
        trainer = quiet_trainer(args.epochs, [dms])
        trainer.fit(model, MNIST1DDataModule(batch_size=128, seed=args.seed))
    else:
        search = quiet_trainer(args.search_epochs + 1, [dms, StopAfterExport(args.search_epochs)])
        search.fit(model, MNIST1DDataModule(batch_size=128, seed=args.seed))
        search_s = time.process_time() - start
        architecture = export_architecture(model, event_log(model))
        network = make_vit(depth=4, embed_dim=64, num_heads=4, mlp_ratio=2.0)  # fresh weights
        build_architecture(network, architecture)
        model = Classifier(network, max_epochs=args.epochs)
        trainer = quiet_trainer(args.epochs, [])
        trainer.fit(model, MNIST1DDataModule(batch_size=128, seed=args.seed))
        total = time.process_time() - start
        print(f"search cost: {search_s:.1f} s of {total:.1f} s CPU ({search_s / total:.2f} of the total)")
    flops_after, params_after = count_flops(model, example).total, count_parameters(model)
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"discovered architecture (pipeline {args.pipeline}):")
    print(describe(model.model))
    print(f"FLOPs {flops_after:,} / {flops_before:,} = {flops_after / flops_before:.3f} (target {args.target})")
    print(f"params {params_after:,} / {params_before:,}")
    print(f"final val accuracy {accuracy:.4f}")
    return {"flops_ratio": flops_after / flops_before, "val_acc": accuracy, "depth": len(model.model.blocks)}


if __name__ == "__main__":
    main()
