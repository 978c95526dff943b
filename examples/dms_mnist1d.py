"""Differentiable Model Scaling on MNIST-1D: search a tiny timm ViT down to half its FLOPs, then train on.

The supernet (4 blocks, width 64, 4 heads, MLP 128) trains with DMS gates for ``--search-epochs``
epochs while the resource loss pulls its FLOPs to 50%; it is then sliced to the discovered widths and
depth and trains for the remaining epochs. Prints the discovered architecture and the final accuracy.

Run: ``python examples/dms_mnist1d.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.measure import count_flops, count_parameters


def describe(vit: torch.nn.Module) -> str:
    rows = [
        f"  block {i}: heads {b.attn.num_heads}, mlp hidden {b.mlp.fc1.out_features}" for i, b in enumerate(vit.blocks)
    ]
    return "\n".join([f"  depth {len(vit.blocks)}", *rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    model = Classifier(make_vit(depth=4, embed_dim=64, num_heads=4, mlp_ratio=2.0), max_epochs=args.epochs)
    example = model.example_input_array
    flops_before, params_before = count_flops(model, example).total, count_parameters(model)
    dms = DifferentiableModelScaling(target=args.target, search_epochs=args.search_epochs)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[dms],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, MNIST1DDataModule(batch_size=128, seed=args.seed))
    flops_after, params_after = count_flops(model, example).total, count_parameters(model)
    accuracy = float(trainer.callback_metrics["val_acc"])
    export = next(e for e in event_log(model) if e.kind == "dms_export")
    print(f"discovered architecture (exported at epoch {export.epoch}):")
    print(describe(model.model))
    print(f"FLOPs {flops_after:,} / {flops_before:,} = {flops_after / flops_before:.3f} (target {args.target})")
    print(f"params {params_after:,} / {params_before:,}")
    print(f"final val accuracy {accuracy:.4f}")
    return {"flops_ratio": flops_after / flops_before, "val_acc": accuracy, "depth": len(model.model.blocks)}


if __name__ == "__main__":
    main()
