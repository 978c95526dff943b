"""Benchmark: curvature-guided depth growth vs uniform placement vs a fixed model of the final size.

MNIST-1D, a tiny timm ViT growing from 2 blocks to ``--budget`` x its starting parameters (one block every
2 epochs after a 2-epoch warm-up; with 12 epochs and budget 3: 2 -> 6 blocks), against a ViT built at the grown
run's final depth from the start; every variant trains for the same number of epochs with the same data order
and seeds. Reported per variant: validation accuracy (mean +- std over seeds), parameters, wall and CPU seconds
(one thread: CPU seconds are what a run costs, wall seconds also count other jobs on a shared machine); the
grown/fixed wall and CPU ratios; time-to-accuracy: the CPU seconds after which the fixed model first reached the
grown run's final accuracy (per seed); the surgery + optimizer + DDP-rewrap seconds of one growth step as a
fraction of an epoch. The instrumentation callbacks (ArchitectureLogger, printing) are off.

    OMP_NUM_THREADS=1 python benchmarks/bench_growth.py --epochs 12 --seeds 0 1 2

Writes ``benchmarks/results/growth.json``. The growth schedule scales with ``--epochs`` (warm-up and interval
``round(epochs / 6)``, i.e. 2 and 2 at 12 epochs) unless ``--warmup-epochs`` / ``--grow-every`` are given.
``--larger-fixed DEPTH`` adds a fixed model deeper than the grown one, the paper's (arXiv 2402.12418) comparison
of a grown model with a larger uniform one, e.g. the longer schedule with growth over the first half:

    OMP_NUM_THREADS=1 python benchmarks/bench_growth.py --epochs 30 --warmup-epochs 3 --grow-every 4 \
        --larger-fixed 8 --out benchmarks/results/growth_long.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import MNIST1DDataModule, mnist1d_tensors
from examples.grow_vit_mnist1d import run_fixed, run_grown, time_to_accuracy


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument(
        "--warmup-epochs", type=int, default=None, help="epochs before the first growth (default: round(epochs / 6))"
    )
    parser.add_argument(
        "--grow-every", type=int, default=None, help="epochs between growth steps (default: round(epochs / 6))"
    )
    parser.add_argument(
        "--larger-fixed",
        type=int,
        default=None,
        metavar="DEPTH",
        help="also train a fixed model of DEPTH blocks (must exceed the grown model's final depth)",
    )
    parser.add_argument(
        "--recipe",
        choices=("paper", "default"),
        default="paper",
        help="paper: DepthGrowth.paper() with curvature and uniform placement (the comparison above); default: "
        "DepthGrowth()'s defaults against the fixed-model frontier (fixed 6 blocks for the same steps and for the "
        "grown run's training FLOPs, fixed 4 blocks), see frontier()",
    )
    parser.add_argument(
        "--train-draws",
        type=int,
        nargs="+",
        default=[],
        metavar="SEED",
        help="--recipe default: more MNIST-1D draws (generator seeds, not 42 or 43) whose every signal joins the "
        "training set (the data-rich protocol: 44 45 46)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "growth.json")
    args = parser.parse_args(argv)
    if args.recipe == "default":
        return frontier(args.epochs, args.seeds, args.out, tuple(args.train_draws))
    if args.train_draws:
        parser.error("--train-draws applies to --recipe default only (the frontier benchmark)")
    # The 12-epoch schedule (warm-up 2, every 2) stretched proportionally to the epoch count.
    scaled = max(1, round(args.epochs / 6))
    warmup = scaled if args.warmup_epochs is None else args.warmup_epochs
    every = scaled if args.grow_every is None else args.grow_every
    mnist1d_tensors()  # generate the data set once, outside the timed runs

    runs: dict[str, list[dict[str, Any]]] = {"curvature": [], "uniform": [], "fixed": []}
    if args.larger_fixed is not None:
        runs["larger_fixed"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            # Interleaved per seed, so a slow phase of a shared machine hits every variant alike.
            for placement in ("curvature", "uniform"):
                result = run_grown(
                    args.epochs,
                    seed,
                    Path(tmp),
                    args.budget,
                    warmup_epochs=warmup,
                    grow_every=every,
                    placement=placement,
                    verbose=False,
                    history=False,
                    recipe="paper",
                )
                runs[placement].append(result)
                print(f"seed {seed} {placement:9s} acc {result['val_acc']:.3f} {result['wall_s']:.1f}s", flush=True)
            depth = runs["curvature"][-1]["depth"]
            result = run_fixed(args.epochs, seed, depth, Path(tmp))
            runs["fixed"].append(result)
            print(f"seed {seed} fixed({depth})  acc {result['val_acc']:.3f} {result['wall_s']:.1f}s", flush=True)
            if args.larger_fixed is not None:
                if args.larger_fixed <= depth:
                    raise ValueError(
                        f"--larger-fixed {args.larger_fixed} is not deeper than the grown model's final depth "
                        f"{depth}; pass a depth > {depth} or leave the flag out"
                    )
                result = run_fixed(args.epochs, seed, args.larger_fixed, Path(tmp))
                runs["larger_fixed"].append(result)
                print(
                    f"seed {seed} fixed({args.larger_fixed})  acc {result['val_acc']:.3f} {result['wall_s']:.1f}s",
                    flush=True,
                )

    summary: dict[str, Any] = {}
    fixed_wall = statistics.fmean(r["wall_s"] for r in runs["fixed"])
    fixed_cpu = statistics.fmean(r["cpu_s"] for r in runs["fixed"])
    larger_cpu = statistics.fmean(r["cpu_s"] for r in runs["larger_fixed"]) if "larger_fixed" in runs else None
    for name, results in runs.items():
        acc, acc_std = _mean_std([r["val_acc"] for r in results])
        wall, wall_std = _mean_std([r["wall_s"] for r in results])
        cpu, cpu_std = _mean_std([r["cpu_s"] for r in results])
        entry = {
            "val_acc_mean": acc,
            "val_acc_std": acc_std,
            "params": [r["params"] for r in results],
            "depth": [r["depth"] for r in results],
            "wall_s_mean": wall,
            "wall_s_std": wall_std,
            "wall_ratio_vs_fixed": wall / fixed_wall,
            "cpu_s_mean": cpu,
            "cpu_s_std": cpu_std,
            "cpu_ratio_vs_fixed": cpu / fixed_cpu,
        }
        if larger_cpu is not None:
            entry["cpu_ratio_vs_larger_fixed"] = cpu / larger_cpu
        if name in ("curvature", "uniform"):
            # When (CPU seconds) the fixed model of the same seed first matched this variant's final accuracy.
            reached = [time_to_accuracy(f["curve"], r["val_acc"]) for r, f in zip(results, runs["fixed"])]
            entry["fixed_reaches_this_acc_at_cpu_s"] = [None if x is None else x["cpu_s"] for x in reached]
            if "larger_fixed" in runs:
                reached = [time_to_accuracy(f["curve"], r["val_acc"]) for r, f in zip(results, runs["larger_fixed"])]
                entry["larger_fixed_reaches_this_acc_at_cpu_s"] = [None if x is None else x["cpu_s"] for x in reached]
            fractions = [s / r["epoch_s"] for r in results for s in r["surgery_s"]]
            entry["surgery_s_per_step_mean"] = statistics.fmean(s for r in results for s in r["surgery_s"])
            entry["surgery_fraction_of_epoch_mean"] = statistics.fmean(fractions)
            entry["insert_after"] = [[e["reason"]["block"] for e in r["events"]] for r in results]
        summary[name] = entry

    print()
    print(
        f"MNIST-1D, ViT 2 blocks -> {args.budget}x params, {args.epochs} epochs (warm-up {warmup}, grow every "
        f"{every}), seeds {args.seeds}"
    )
    print(
        f"{'variant':12s} {'val_acc':>15s} {'params':>9s} {'wall s':>13s} {'wall/fixed':>10s} {'CPU s':>13s} "
        f"{'CPU/fixed':>9s} {'surgery/epoch':>13s}"
    )
    for name, e in summary.items():
        surgery = f"{e['surgery_fraction_of_epoch_mean']:.4f}" if "surgery_fraction_of_epoch_mean" in e else "-"
        print(
            f"{name:12s} {e['val_acc_mean']:7.3f} +- {e['val_acc_std']:.3f} {max(e['params']):9,d} "
            f"{e['wall_s_mean']:6.1f} +- {e['wall_s_std']:4.1f} {e['wall_ratio_vs_fixed']:10.2f} "
            f"{e['cpu_s_mean']:6.1f} +- {e['cpu_s_std']:4.1f} {e['cpu_ratio_vs_fixed']:9.2f} {surgery:>13s}"
        )
    for name in ("curvature", "uniform"):
        reached = summary[name]["fixed_reaches_this_acc_at_cpu_s"]
        shown = ", ".join("never" if x is None else f"{x:.1f}" for x in reached)
        print(f"fixed model reaches {name}'s final val_acc after CPU s (per seed): {shown}")
        if "larger_fixed" in summary:
            reached = summary[name]["larger_fixed_reaches_this_acc_at_cpu_s"]
            shown = ", ".join("never" if x is None else f"{x:.1f}" for x in reached)
            print(f"larger fixed model reaches {name}'s final val_acc after CPU s (per seed): {shown}")
    record = {
        "config": {
            "epochs": args.epochs,
            "seeds": args.seeds,
            "budget": args.budget,
            "start_depth": 2,
            "warmup_epochs": warmup,
            "grow_every": every,
            "larger_fixed": args.larger_fixed,
        },
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_avg_1_5_15_at_end": os.getloadavg(),
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return record


# The variants of the frontier benchmark, in its table's order.
FRONTIER = ("grown", "fixed_6", "fixed_6_equal_flops", "fixed_4", "fixed_2")


def frontier(epochs: int, seeds: list[int], out: Path, train_draws: tuple[int, ...] = ()) -> dict[str, Any]:
    """``DepthGrowth()``'s defaults (ramped G_stack, 2 -> 6 blocks after a third of the steps) against the fixed
    models around it in training compute, per seed in one process: fixed 6 blocks for the same steps, fixed 6 blocks
    for the steps that cost the grown run's training FLOPs (its own warm-up and cosine over them), fixed 4 and fixed
    2 blocks for the same steps. Paired differences (grown - each) per seed; FLOPs from torch's counter
    (``examples.grow_vit_mnist1d.step_flops``). ``train_draws``: more MNIST-1D draws in the training set (the
    data-rich protocol, e.g. ``(44, 45, 46)``). Writes ``out`` (JSON) and ``out`` with ``.md`` (:func:`table`).

        OMP_NUM_THREADS=1 python benchmarks/bench_growth.py --recipe default --epochs 30 --seeds 0 1 2 \
            --out benchmarks/results/growth_default_mnist1d.json
    """
    MNIST1DDataModule(train_draws=train_draws)  # refuses the validation draws before any run
    mnist1d_tensors()
    for draw in train_draws:
        mnist1d_tensors(draw)  # generate every draw once, outside the timed runs
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in FRONTIER}
    config = {
        "epochs": epochs,
        "seeds": seeds,
        "recipe": "DepthGrowth() defaults",
        "start_depth": 2,
        "train_draws": list(train_draws),
        "train_signals": 4000 + 5000 * len(train_draws),
    }
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            grown = run_grown(
                epochs, seed, Path(tmp), verbose=False, history=False, recipe="default", train_draws=train_draws
            )
            fixed = run_fixed(epochs, seed, grown["depth"], Path(tmp), train_draws=train_draws)
            steps = max(1, round(fixed["steps"] * grown["train_flops"] / fixed["train_flops"]))
            equal = run_fixed(epochs, seed, grown["depth"], Path(tmp), max_steps=steps, train_draws=train_draws)
            four = run_fixed(epochs, seed, 4, Path(tmp), train_draws=train_draws)
            two = run_fixed(epochs, seed, 2, Path(tmp), train_draws=train_draws)
            for name, r in zip(FRONTIER, (grown, fixed, equal, four, two), strict=True):
                r.pop("curve", None)
                runs[name].append(r)
                print(f"seed {seed} {name:20s} acc {r['val_acc']:.3f} flops {r['train_flops']:.3g}", flush=True)
            # Written after every seed: a stopped run keeps the seeds it finished.
            record = {"config": config, "machine": machine, "summary": summarize(runs), "runs": runs}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=2))
    lines = table(record)
    print("\n".join(lines))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return record


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float, int]:
    """``a - b`` in val_acc per seed: mean, std, and the seeds where ``a`` is higher."""
    diffs = [x["val_acc"] - y["val_acc"] for x, y in zip(a, b, strict=True)]
    mean, std = _mean_std(diffs)
    return mean, std, sum(d > 0 for d in diffs)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: val_acc mean/std, training FLOPs / fixed 6, paired grown - this; fixed 6 - this (whether the
    benchmark tells the fixed depths apart); ``above_frontier``: grown beats both fixed 6 at equal FLOPs and fixed
    4 by more than the std of the paired differences."""
    base = runs["fixed_6"]
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        acc, acc_std = _mean_std([r["val_acc"] for r in results])
        diff, diff_std, better = _paired(runs["grown"], results)
        deeper, deeper_std, deeper_better = _paired(base, results)
        summary[name] = {
            "val_acc_mean": acc,
            "val_acc_std": acc_std,
            "flops_vs_fixed_6": statistics.fmean(r["train_flops"] / b["train_flops"] for r, b in zip(results, base)),
            "steps": [r["steps"] for r in results],
            "grown_minus_this_mean": diff,
            "grown_minus_this_std": diff_std,
            "grown_better_in": better,
            "fixed_6_minus_this_mean": deeper,
            "fixed_6_minus_this_std": deeper_std,
            "fixed_6_better_in": deeper_better,
            "cpu_s_mean": statistics.fmean(r["cpu_s"] for r in results),
        }
    if {"fixed_6_equal_flops", "fixed_4"} <= summary.keys() and len(runs["grown"]) > 1:
        summary["above_frontier"] = all(
            summary[name]["grown_minus_this_mean"] > summary[name]["grown_minus_this_std"]
            for name in ("fixed_6_equal_flops", "fixed_4")
        )
    return summary


def table(record: dict[str, Any]) -> list[str]:
    """The Markdown table of a :func:`frontier` record (its JSON)."""
    config, summary = record["config"], record["summary"]
    seeds, draws = config["seeds"], config.get("train_draws", [])
    n = len(record["runs"]["grown"])
    data = (
        f"MNIST-1D's 4,000 training signals plus every signal of draws {', '.join(map(str, draws))} "
        f"({config['train_signals']:,} signals)"
        if draws
        else "MNIST-1D's 4,000 training signals"
    )
    lines = [
        f"# DepthGrowth() defaults on MNIST-1D: the fixed-model frontier ({config['epochs']} epochs, seeds {seeds})",
        "",
        f"Tiny timm ViT, 2 -> 6 blocks (ramped G_stack after a third of the steps); {data}; validation: MNIST-1D's "
        f"1,000 test signals. Val accuracy, mean ± std over {n} seeds; paired differences in points (mean ± std of "
        "the per-seed differences). Generated from the JSON by `benchmarks/bench_growth.py --recipe default`.",
        "",
        "| variant | steps | train FLOPs / fixed 6 | val acc | grown - this (points) | grown better in | "
        "fixed 6 - this (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in FRONTIER:
        if name not in summary:
            continue
        e = summary[name]
        paired = (
            ""
            if name == "grown"
            else f"{100 * e['grown_minus_this_mean']:+.1f} ± {100 * e['grown_minus_this_std']:.1f}"
        )
        better = "" if name == "grown" else f"{e['grown_better_in']} of {n}"
        deeper = (
            ""
            if name == "fixed_6"
            else f"{100 * e['fixed_6_minus_this_mean']:+.1f} ± {100 * e['fixed_6_minus_this_std']:.1f}"
        )
        steps = sorted(set(e.get("steps", [])))
        shown = "-".join(map(str, (steps[0], steps[-1]) if len(steps) > 1 else steps))
        lines.append(
            f"| {name} | {shown} | {e['flops_vs_fixed_6']:.2f} | {e['val_acc_mean']:.3f} ± {e['val_acc_std']:.3f} | "
            f"{paired} | {better} | {deeper} |"
        )
    lines += [
        "",
        "Per seed (val acc):",
        "",
        "| seed | " + " | ".join(FRONTIER) + " |",
        "|---" * (len(FRONTIER) + 1) + "|",
    ]
    for i, seed in enumerate(seeds[:n]):
        accs = [f"{record['runs'][name][i]['val_acc']:.3f}" for name in FRONTIER if name in record["runs"]]
        lines.append(f"| {seed} | " + " | ".join(accs) + " |")
    if "above_frontier" in summary:
        verdict = "yes" if summary["above_frontier"] else "no"
        lines += [
            "",
            f"Grown above the fixed-model frontier (better than fixed_6_equal_flops and fixed_4 by more than the "
            f"paired std): **{verdict}**.",
        ]
    return lines


if __name__ == "__main__":
    main()
