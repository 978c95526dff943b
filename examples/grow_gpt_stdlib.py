"""Grow a byte-level GPT on Python's own source code with ``DepthGrowth()``, and compare it with fixed models.

The task where depth pays (``benchmarks/bench_growth_lm.py``): next-byte prediction on the standard library's
``.py`` files (read from this Python install, split into train and validation by file), a tiny GPT of width 32,
1,500 AdamW steps (``--steps``) of 32 windows of 128 bytes, gradient norm clipped at 1.0. Four runs, the same seed
and data:

- **grown**: 2 blocks, ``DepthGrowth()`` with its defaults (after a third of the steps the block stack is made 3x
  deeper, 2 -> 6 blocks, the copies ramped in over 12% of the run; ``--grow-at`` sets the fraction, i.e.
  ``DepthGrowth(at=[f])``), its learning rate from :class:`~lightning_depthgrow.growth.schedule.GrowthCosineLR`
  (the cosine restarted at the growth step);
- **fixed 6**: the final size from the start, with the same restarted schedule (the better of the schedules
  the benchmark tried for it);
- **fixed 6, equal FLOPs**: the final size trained for the optimizer steps whose FLOPs equal the grown run's;
- **fixed 4**: a smaller fixed model, about as cheap as the grown run (the fixed-model frontier).

It prints each run's validation loss (nats per byte) and training FLOPs (torch's counter), the grown model's
difference to each, and when (in FLOPs) the grown run first reached the fixed 6-block model's final loss. One seed
is one draw: the benchmark's multi-seed figures are in ``docs/growth.md``. The runs go to ``--workers`` processes
(2 by default: about 5 minutes on 2 CPU cores; ``--quick`` is a smoke run of a few seconds).

Run:

    python examples/grow_gpt_stdlib.py --seed 0
    python examples/grow_gpt_stdlib.py --steps 750 --grow-at 0.6 --eval-every 10  # the short-budget recipe
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

if __package__ in (None, ""):  # run as a script: make ``examples`` and ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import ByteLM, LMConfig, equal_flops_steps, stdlib_corpus, train_lm
from lightning_depthgrow.callbacks import DepthGrowth
from lightning_depthgrow.callbacks.depth_growth import DEFAULT_AT
from lightning_depthgrow.growth.schedule import GrowthCosineLR

# The benchmark's clipped recipe (benchmarks/results/growth_lm_1500_clip_protocol.md).
CONFIG = LMConfig(steps=1500, lr=0.01, min_lr_ratio=0.1, warmup_steps=30, grad_clip=1.0)
RESTART_WARMUP, START_DEPTH, FINAL_DEPTH = 30, 2, 6


class RestartedByteLM(ByteLM):
    """The benchmark's ``ByteLM`` with a growth-aware schedule: warm-up, cosine, restarted at ``grow_at``."""

    def __init__(self, model: torch.nn.Module, config: LMConfig, grow_at: float = DEFAULT_AT[0]) -> None:
        super().__init__(model, config)
        self.grow_at = grow_at

    def configure_optimizers(self) -> dict[str, Any]:
        setup = super().configure_optimizers()
        c = self.config
        schedule = GrowthCosineLR(
            total_steps=c.steps,
            at=[self.grow_at],
            warmup_steps=c.warmup_steps,
            restart_warmup=RESTART_WARMUP,
            min_lr_ratio=c.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(setup["optimizer"], schedule)
        return {"optimizer": setup["optimizer"], "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _quiet(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("GPU available", "TPU available", "💡", "`Trainer.fit` stopped"))


def run(name: str, config: LMConfig, seed: int, grow_at: float) -> dict[str, Any]:
    """Train one variant with ``Trainer.fit``; its validation curve (loss and training FLOPs every
    ``config.eval_every`` steps). Growth and every run's LR restart at ``grow_at`` of the steps."""
    torch.set_num_threads(1)
    for name_ in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name_).addFilter(_quiet)  # no per-run banner; the growth events stay
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    callbacks: list[pl.Callback] = [DepthGrowth(at=[grow_at])] if name == "grown" else []
    result = train_lm(config, seed, callbacks=callbacks, module_class=partial(RestartedByteLM, grow_at=grow_at))
    return {"name": name, "steps": config.steps, **result}


def plan(config: LMConfig, grow_at: float) -> list[tuple[str, LMConfig]]:
    return [
        ("grown", replace(config, depth=START_DEPTH)),
        ("fixed 6", replace(config, depth=FINAL_DEPTH)),
        (
            "fixed 6, equal FLOPs",
            replace(
                config,
                depth=FINAL_DEPTH,
                steps=equal_flops_steps(config, config.steps, grow_at, START_DEPTH, FINAL_DEPTH),
            ),
        ),
        ("fixed 4", replace(config, depth=4)),
    ]


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    """The comparison as printed (every figure from ``results``)."""
    grown, fixed = results["grown"], results["fixed 6"]
    lines = [f"{'model':22s} {'blocks':>6s} {'steps':>6s} {'params':>8s} {'val loss':>9s} {'FLOPs/fixed 6':>14s}"]
    for name, r in results.items():
        lines.append(
            f"{name:22s} {r['depth']:6d} {r['steps']:6d} {r['params']:8,d} {r['val_loss']:9.4f} "
            f"{r['flops'] / fixed['flops']:13.2f}x"
        )
    for name, r in results.items():
        if name != "grown":
            diff = grown["val_loss"] - r["val_loss"]
            verdict = "better" if diff < 0 else "worse"
            lines.append(f"grown - {name}: {diff:+.4f} nats/byte (grown {verdict}, lower is better)")
    reach = next((row for row in grown["curve"] if row["val_loss"] <= fixed["val_loss"]), None)
    when = f"step {reach['step']}, {reach['flops'] / fixed['flops']:.2f}x its training FLOPs" if reach else "never"
    lines.append(f"the grown run first reached fixed 6's final loss {fixed['val_loss']:.4f} at: {when}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes training the four runs")
    parser.add_argument("--steps", type=int, default=CONFIG.steps, help="optimizer steps per run")
    parser.add_argument(
        "--grow-at",
        type=float,
        default=DEFAULT_AT[0],
        help="fraction of the steps after which the grown run grows (and every run's LR cosine restarts); "
        "default DepthGrowth()'s 1/3",
    )
    parser.add_argument("--eval-every", type=int, default=CONFIG.eval_every, help="validate every this many steps")
    parser.add_argument("--quick", action="store_true", help="60 steps per run: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("runs/grow_gpt_stdlib"))
    args = parser.parse_args(argv)
    if not 0 < args.grow_at < 1:
        parser.error(f"--grow-at must be a fraction of the steps in (0, 1), not {args.grow_at}")
    config = replace(CONFIG, steps=args.steps, eval_every=args.eval_every)
    if args.quick:
        config = replace(config, steps=60, eval_every=10, warmup_steps=5)
    train, val, info = stdlib_corpus(config.corpus)
    print(
        f"corpus: {info['train_files']} train / {info['val_files']} validation files of the Python {info['python']} "
        f"standard library ({len(train):,} / {len(val):,} bytes); {config.steps} steps per run, seed {args.seed}",
        flush=True,
    )
    runs = plan(config, args.grow_at)
    results: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=context) as pool:
        futures = {name: pool.submit(run, name, c, args.seed, args.grow_at) for name, c in runs}
        for name, _ in runs:
            results[name] = futures[name].result()
            r = results[name]
            print(
                f"done: {name} ({r['depth']} blocks, val loss {r['val_loss']:.4f}, {r['cpu_s']:.0f} CPU s)", flush=True
            )
    print()
    for line in report(results):
        print(line)
    print("one seed; the benchmark's multi-seed figures: docs/growth.md")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(results, indent=2))
    print(f"curves: {args.out / 'comparison.json'}")
    return results


if __name__ == "__main__":
    main()
