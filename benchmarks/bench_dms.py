"""Benchmark: Differentiable Model Scaling on MNIST-1D.

1. Overhead: wall time of a DMS search step (soft masks, resource loss, importance update, projection)
   over a plain training step of the same supernet (target <= 1.15), both measured here, interleaved,
   on the tiny supernet below and on a DeiT-T-width one (embed 192, 6 blocks).
2. Quality: for each seed, DMS searches a tiny timm ViT (4 blocks, width 64) down to ``--target`` of its
   FLOPs for ``--search-epochs`` epochs and trains the exported model for the rest, against a uniformly
   narrowed ViT (same depth, embed width scaled) of the closest FLOPs trained for the same total epochs,
   same data and seed. Reports validation accuracy mean +- std and FLOPs ratios.

    python benchmarks/bench_dms.py --epochs 8 --search-epochs 4 --seeds 0 1 2

Writes ``benchmarks/results/dms.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, mnist1d_tensors
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import ResourceModel, attach_gates, update_importance
from lightning_depthgrow.measure import count_flops

SUPERNET = {"depth": 4, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2.0}
LARGE_SUPERNET = {"depth": 6, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0}  # DeiT-T width, 6 blocks


def _search_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, search: bool) -> Callable[[], None]:
    """One AdamW step of ``model`` on ``(x, y)``; with ``search``, the DMS work the callback adds to a step."""
    gates = attach_gates(model) if search else None
    res = ResourceModel.build(model, x[:2]) if search else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        if search:
            r_c = res.evaluate(gates) / res.full_flops
            loss = loss + torch.relu(torch.log(r_c / 0.5))
        loss.backward()
        if search:
            update_importance(gates.bank)
        opt.step()
        opt.zero_grad()
        if search:
            gates.project_()

    return step


def step_overhead(supernet: dict[str, Any], steps: int = 10, repeats: int = 12) -> dict[str, Any]:
    """Seconds per step of plain vs DMS-search training of the same supernet on one batch of 128.

    Both models start from the same weights and see the same batch; each is warmed up, then timed in
    ``repeats`` blocks of ``steps`` steps in alternating order (ABBA), so drift hits both. On a shared
    machine load comes in phases that can cover a few blocks of one kind more than the other, so the
    headline ``ratio`` is the median over repeats of search/plain of the two blocks timed back to back;
    the ratio of medians and of the fastest blocks (noise only adds time) are reported with it.
    """
    x, y, _, _ = mnist1d_tensors()
    x, y = x[:128], y[:128]
    fns = {}
    for name in ("plain", "search"):
        torch.manual_seed(0)
        fns[name] = _search_step(make_vit(**supernet), x, y, search=name == "search")
        for _ in range(5):
            fns[name]()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "search": []}
    for r in range(repeats):
        for name in ("plain", "search") if r % 2 == 0 else ("search", "plain"):
            start = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            times[name].append((time.perf_counter() - start) / steps)
    plain, search = statistics.median(times["plain"]), statistics.median(times["search"])
    paired = statistics.median(s / p for s, p in zip(times["search"], times["plain"]))
    return {
        "supernet": supernet,
        "plain_step_s": plain,
        "search_step_s": search,
        "ratio": paired,
        "ratio_of_medians": search / plain,
        "ratio_of_minima": min(times["search"]) / min(times["plain"]),
        "plain_all_s": times["plain"],
        "search_all_s": times["search"],
    }


def profile_search_step(supernet: dict[str, Any], steps: int = 10, rows: int = 25) -> str:
    """``torch.profiler`` table (self CPU time) of ``steps`` DMS search steps."""
    from torch.profiler import ProfilerActivity, profile

    x, y, _, _ = mnist1d_tensors()
    torch.manual_seed(0)
    step = _search_step(make_vit(**supernet), x[:128], y[:128], search=True)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def fit(model: Classifier, epochs: int, seed: int, callbacks: list) -> float:
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, MNIST1DDataModule(batch_size=128, seed=seed))
    return float(trainer.callback_metrics["val_acc"])


def uniform_vit(flops: float, example: torch.Tensor) -> torch.nn.Module:
    """The supernet's depth and head count with the embed width (multiple of the heads) closest in FLOPs."""
    heads = SUPERNET["num_heads"]
    best = None
    for dim in range(heads, SUPERNET["embed_dim"] + 1, heads):
        model = make_vit(**{**SUPERNET, "embed_dim": dim})
        gap = abs(count_flops(model, example).total - flops)
        if best is None or gap < best[0]:
            best = (gap, dim)
    return make_vit(**{**SUPERNET, "embed_dim": best[1]})


def quality(seed: int, epochs: int, search_epochs: int, target: float) -> dict[str, Any]:
    example = torch.zeros(2, 1, 1, 40)
    pl.seed_everything(seed, verbose=False)
    dms_model = Classifier(make_vit(**SUPERNET), max_epochs=epochs)
    full = count_flops(dms_model, example).total
    dms = DifferentiableModelScaling(target=target, search_epochs=search_epochs)
    dms_acc = fit(dms_model, epochs, seed, [dms])
    dms_flops = count_flops(dms_model, example).total
    pl.seed_everything(seed, verbose=False)
    uniform = Classifier(uniform_vit(dms_flops, example), max_epochs=epochs)
    uni_flops = count_flops(uniform, example).total
    uni_acc = fit(uniform, epochs, seed, [])
    return {
        "seed": seed,
        "dms_acc": dms_acc,
        "dms_flops_ratio": dms_flops / full,
        "uniform_acc": uni_acc,
        "uniform_flops_ratio": uni_flops / full,
        "uniform_embed_dim": uniform.model.embed_dim,
        "dms_depth": len(dms_model.model.blocks),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--search-epochs", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of a search step")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "dms.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mnist1d_tensors()  # generate the data set once, outside the timed parts

    overhead = [step_overhead(net) for net in (SUPERNET, LARGE_SUPERNET)]
    for o in overhead:
        print(
            f"step time {o['supernet']}: plain {o['plain_step_s'] * 1e3:.1f} ms, DMS search "
            f"{o['search_step_s'] * 1e3:.1f} ms, ratio {o['ratio']:.3f} (target <= 1.15; of medians "
            f"{o['ratio_of_medians']:.3f}, of minima {o['ratio_of_minima']:.3f})",
            flush=True,
        )
    if args.profile:
        print(profile_search_step(SUPERNET), flush=True)
    runs = []
    for seed in args.seeds:
        runs.append(quality(seed, args.epochs, args.search_epochs, args.target))
        r = runs[-1]
        print(
            f"seed {seed}: DMS acc {r['dms_acc']:.3f} (FLOPs {r['dms_flops_ratio']:.3f}, depth {r['dms_depth']}) | "
            f"uniform acc {r['uniform_acc']:.3f} (FLOPs {r['uniform_flops_ratio']:.3f}, "
            f"dim {r['uniform_embed_dim']})",
            flush=True,
        )
    summary = {
        k: _mean_std([r[k] for r in runs]) for k in ("dms_acc", "uniform_acc", "dms_flops_ratio", "uniform_flops_ratio")
    }
    print("\n| variant | val acc (mean +- std) | FLOPs / supernet |\n|---|---|---|")
    for name in ("dms", "uniform"):
        acc, flops = summary[f"{name}_acc"], summary[f"{name}_flops_ratio"]
        print(f"| {name} | {acc[0]:.4f} +- {acc[1]:.4f} | {flops[0]:.3f} |")
    result = {
        "config": {
            **vars(args),
            "out": str(args.out),
            "supernet": SUPERNET,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "overhead": overhead,
        "runs": runs,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
