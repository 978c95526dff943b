"""Headroom on the DMS ViT benchmark: does any 50%-FLOPs ViT beat the uniformly narrowed one from scratch?

Issue 11's target is "found architecture trained from scratch >= uniformly narrowed model of equal FLOPs + 0.5
points, 3 seeds, at 50% FLOPs". Before tuning the search it pays to know whether such an architecture exists on
this task at this scale. This trains a handful of hand-picked tiny timm ViT shapes at (within 1%) the uniform
model's forward FLOPs (torch's ``FlopCounterMode``, :func:`benchmarks.bench_dms.flops`), from scratch, with
:mod:`benchmarks.bench_dms`'s protocol (``fit``: the same Classifier, AdamW and cosine schedule, 12 epochs, the
same data order per seed, MNIST-1D's 1,000 test signals plus 5,000 of a second draw validated after the last
epoch, one torch thread), and compares each with the uniform model paired by seed.

Shapes (supernet: 4 blocks, embed width 64, 4 heads of 16, MLP 128): ``depth``, ``embed`` (the residual width),
``heads`` (of the config; ``head_dim = embed / heads``), ``kept`` (heads kept per block; fewer than ``heads``
narrow the attention only, what a DMS head gate expresses), ``mlp`` (MLP width per block; ``None`` = one width
for all blocks, solved so the forward FLOPs land on the uniform model's; a ``profile`` scales per-block widths by
one solved factor). Per-block heads and MLP widths are cut by the library's export path
(:func:`~lightning_depthgrow.dms.export_architecture` / :func:`~lightning_depthgrow.dms.build_architecture`).
Each shape notes which DMS gates could express it from the supernet (``embed`` = the residual width of the ViT: not
expressible when this study was run; ``DifferentiableModelScaling(embed=True)`` gates it since, measured by
``bench_dms_vit_embed.py``).

``uniform`` is built exactly as ``bench_dms.py``'s ``uniform`` arm (``torch.manual_seed(seed)`` then
``make_vit``), so on the same seeds it reproduces that arm's accuracies and pairs with the stored ``dms_a``
runs of ``dms_long.json`` (the architecture DMS found and exported, trained from scratch), shown as
``dms_a (stored)``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_vit_headroom.py --jobs 0::2 --out A.json &
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_vit_headroom.py --jobs 1::2 --out B.json &
    python benchmarks/bench_dms_vit_headroom.py --part report --merge A.json B.json --held-out-seeds 18 19 20 ...

``--part dms`` runs ``bench_dms.py``'s pipelines (b) and (a) with a search setting of ``DMS_SETTINGS`` (depth gates
off) on the same seeds; its rows are the exported architecture trained from scratch (``dms_b_acc``: pipeline b).
``--part shapes`` prints every shape and its FLOPs without training.

Writes ``benchmarks/results/dms_vit_headroom.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_dms
from benchmarks.bench_dms import SUPERNET, Classifier, fit, flops, make_vit, narrow_config, run_dms, uniform_vit
from benchmarks.tasks import merge_runs
from examples.common import mnist1d_tensors
from lightning_depthgrow.dms import attach_gates, build_architecture, export_architecture

RESULTS = Path(__file__).resolve().parent / "results"

# name -> shape; "mlp": None = one MLP width for every block, solved to the uniform model's FLOPs; "profile":
# per-block MLP widths proportional to it, scaled by one solved factor; "kept": heads kept per block
SHAPES: dict[str, dict[str, Any]] = {
    "uniform": {"needs": "embed (the benchmark's hand-scaled model: depth and heads kept, widths narrowed)"},
    "L4_e64_h2": {"depth": 4, "embed": 64, "heads": 4, "kept": [2] * 4, "needs": "heads + mlp (width-only search)"},
    "L3_e64_h3": {"depth": 3, "embed": 64, "heads": 4, "kept": [3] * 3, "needs": "depth + heads + mlp (DMS's kind)"},
    "L2_e64": {"depth": 2, "embed": 64, "heads": 4, "needs": "depth (+ mlp): fewer blocks at full width"},
    "L4_e64_taper": {
        "depth": 4,
        "embed": 64,
        "heads": 4,
        "kept": [4, 3, 2, 1],
        "profile": [1.0, 0.75, 0.5, 0.25],
        "needs": "heads + mlp, per block (mixed widths, tapering)",
    },
    "L3_e52": {"depth": 3, "embed": 52, "heads": 4, "needs": "embed + depth (bench_dms's uniform_depth_width)"},
    "L4_e48": {"depth": 4, "embed": 48, "heads": 4, "needs": "embed (less) + mlp (more cut)"},
    "L4_e40": {"depth": 4, "embed": 40, "heads": 4, "needs": "embed (more), wide MLP"},
    "L4_e44_h2": {"depth": 4, "embed": 44, "heads": 2, "needs": "embed; 2 heads of 22 (head geometry)"},
    "L6_e36": {"depth": 6, "embed": 36, "heads": 4, "needs": "not expressible (deeper than the supernet)"},
}
STORED = "dms_a (stored)"
# DMS search settings run by ``--part dms`` (pipeline a: search, export, train the found architecture from scratch);
# the main part's defaults with one change each, towards the shapes that win here (all blocks kept)
DMS_SETTINGS: dict[str, dict[str, Any]] = {
    "dms_a_no_depth": {"depth": False},
    # with the embedding-width gate (``embed=True``), which can express the L4_e48 kind of shape
    # (benchmarks/bench_dms_vit_embed.py runs these, declared settings on fresh seeds)
    "dms_a_embed": {"embed": True},
    "dms_a_embed_no_depth": {"embed": True, "depth": False},
    "dms_a_embed_mlp_only": {"embed": True, "depth": False, "heads": False},
    # the same with one MLP width shared by every block (``tie=("width",)``: one learnable ratio for the MLP gates;
    # benchmarks/bench_dms_vit_embed.py, dms_vit_tie_*)
    "dms_a_embed_mlp_tied": {"embed": True, "depth": False, "heads": False, "tie": ("width",)},
}


def build(shape: dict[str, Any]) -> torch.nn.Module:
    """A fresh ViT of ``shape`` (``mlp`` a list of per-block widths); kept heads below ``heads`` and uneven MLP
    widths are cut by DMS's ``build_architecture`` from a ViT with the widest MLP."""
    mlp, embed, kept = shape["mlp"], shape["embed"], shape.get("kept")
    widest = max(mlp)
    config = {"depth": shape["depth"], "embed_dim": embed, "num_heads": shape["heads"]}
    net = make_vit(**config, mlp_ratio=(widest + 0.5) / embed)
    if (kept is not None and any(k != shape["heads"] for k in kept)) or any(m != widest for m in mlp):
        probe = make_vit(**config, mlp_ratio=(widest + 0.5) / embed)
        attach_gates(probe, width=True, heads=True, depth=False)
        arch = export_architecture(probe)
        for i in range(shape["depth"]):
            if kept is not None:
                arch["gates"][f"blocks/{i}:heads"]["keep"] = list(range(kept[i]))
            arch["gates"][f"blocks/{i}:mlp"]["keep"] = list(range(mlp[i]))
        build_architecture(net, arch)
    return net


def architecture_of(net: torch.nn.Module) -> dict[str, Any]:
    blocks = list(net.blocks)
    return {
        "depth": len(blocks),
        "embed": net.embed_dim,
        "heads": [b.attn.num_heads for b in blocks],
        "head_dim": blocks[0].attn.head_dim if blocks else None,
        "mlp": [b.mlp.fc1.out_features for b in blocks],
    }


def solve_shape(name: str, target: int) -> dict[str, Any]:
    """``SHAPES[name]`` with its per-block MLP widths solved so the forward FLOPs land nearest ``target``."""
    spec = dict(SHAPES[name])
    if name == "uniform":
        _, config = uniform_vit(target)
        c = narrow_config(config)
        hidden = config["mlp_hidden"]
        return {**spec, "depth": c["depth"], "embed": c["embed_dim"], "heads": c["num_heads"], "mlp": [hidden] * 4}
    profile = spec.get("profile", [1.0] * spec["depth"])

    def widths(scale: float) -> list[int]:
        return [max(1, round(scale * p)) for p in profile]

    def count(scale: float) -> int:
        return flops(build({**spec, "mlp": widths(scale)}))

    lo, hi = count(1.0), count(1001.0)  # FLOPs are linear in the MLP widths
    scale = 1 + (target - lo) * 1000 / (hi - lo)
    best = min((abs(count(s) - target), s) for s in (scale - 1, scale, scale + 1) if min(widths(s)) >= 1)[1]
    return {**spec, "mlp": widths(best)}


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def stored_dms_a(seeds: set[int], target: float) -> list[dict[str, Any]]:
    """The ``dms_a`` runs of ``dms_long.json`` on ``seeds`` (same protocol, same seeds)."""
    path = RESULTS / "dms_long.json"
    if not path.exists():
        return []
    runs = json.loads(path.read_text())["main"]["runs"]
    return [
        {"shape_name": STORED, "seed": r["seed"], "acc": r["acc"], "architecture": r["architecture"]}
        for r in runs
        if r["variant"] == "dms_a" and r["target"] == target and r["seed"] in seeds
    ]


def summarise(runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per shape: accuracy and, paired by seed, accuracy minus the uniform model's (mean, std, SE, wins, 95% CI)."""
    uniform = {r["seed"]: r["acc"] for r in runs if r["shape_name"] == "uniform"}
    rows_all = runs + stored_dms_a(set(uniform), target)
    out: dict[str, Any] = {}
    for name in [*SHAPES, *DMS_SETTINGS, STORED]:
        rows = [r for r in rows_all if r["shape_name"] == name]
        if not rows:
            continue
        s: dict[str, Any] = {"n": len(rows), "acc": _mean_std([r["acc"] for r in rows])}
        diffs = [r["acc"] - uniform[r["seed"]] for r in rows if r["seed"] in uniform]
        if name != "uniform" and diffs:
            mean, std = _mean_std(diffs)
            se = std / len(diffs) ** 0.5
            s["minus_uniform"] = {
                "mean": mean,
                "std": std,
                "se": se,
                "ci95": [mean - 1.96 * se, mean + 1.96 * se],
                "wins": sum(d > 0 for d in diffs),
                "n": len(diffs),
                "per_seed": {str(r["seed"]): r["acc"] - uniform[r["seed"]] for r in rows if r["seed"] in uniform},
            }
        if name == STORED:  # counts per gate name, as dms_long.json stores them
            arch = [r["architecture"] for r in rows]
            kept = [(a["model/blocks:depth"], [v for k, v in a.items() if k.endswith(":heads")]) for a in arch]
            s["found"] = {
                "depth": sorted({d for d, _ in kept}),
                "heads": [min(min(h) for _, h in kept), max(max(h) for _, h in kept)],
                "mlp": [
                    min(v for a in arch for k, v in a.items() if k.endswith(":mlp")),
                    max(v for a in arch for k, v in a.items() if k.endswith(":mlp")),
                ],
            }
        if "flops_over_uniform" in rows[0]:
            s["flops_over_uniform"] = rows[0]["flops_over_uniform"]
            s["flops_over_full"] = rows[0]["flops_over_full"]
        out[name] = s
    return out


def found_cells(runs: list[dict[str, Any]], name: str) -> str:
    """Table cells (blocks, embed, heads, MLP, FLOPs / full, FLOPs / uniform) of the architectures a DMS setting
    exported, as ranges over seeds."""
    rows = [r for r in runs if r["shape_name"] == name]

    def span(values: list[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"

    depths = [r["architecture"]["depth"] for r in rows]
    embeds = [r["architecture"]["embed"] for r in rows]
    heads = [h for r in rows for h in r["architecture"]["heads"]]
    mlp = [m for r in rows for m in r["architecture"]["mlp"]]
    f_full = statistics.fmean(r["flops_over_full"] for r in rows)
    f_uniform = statistics.fmean(r["flops_over_uniform"] for r in rows)
    return (
        f"{span(depths)} (per seed) | {span(embeds)} | {span(heads)} of 16, per seed | {span(mlp)}, per seed "
        f"| {f_full:.3f} | {f_uniform:.3f}"
    )


def summary_table(result: dict[str, Any], seeds: set[int] | None = None) -> list[str]:
    """The per-shape table (over ``seeds``, default all)."""
    runs = [r for r in result["runs"] if seeds is None or r["seed"] in seeds]
    s = summarise(runs, result["config"]["target"])
    lines = [
        "| shape | blocks | embed | heads per block (head dim) | MLP per block | FLOPs / full | FLOPs / uniform "
        "| DMS needs | val acc (mean ± std) | acc - uniform, points (mean ± std) | SE | 95% CI | wins | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + _table_rows(runs, s)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# DMS ViT headroom: hand-picked 50%-FLOPs ViT shapes trained from scratch (MNIST-1D)",
        "",
        "Generated by `benchmarks/bench_dms_vit_headroom.py` (see its docstring). Protocol of "
        "`benchmarks/bench_dms.py`'s `dms_long` run (12 epochs, the same data order per seed, 6,000 validation "
        "signals after the last epoch); every shape trained from scratch. Differences are accuracy minus the "
        "uniformly narrowed model's on the same seed, in points (1 point = 0.01). Target of issue 11: >= +0.5 "
        "points.",
        "",
        f"Configuration: {json.dumps(result['config'])}",
        "",
        "## All seeds",
        "",
        *summary_table(result),
    ]
    held_out = result.get("held_out_seeds")
    if held_out:
        lines += [
            "",
            f"## Held-out seeds {held_out[0]}-{held_out[-1]} only",
            "",
            "The shapes rerun here were picked on the other seeds; these seeds had not been seen by that choice.",
            "",
            *summary_table(result, set(held_out)),
        ]
    lines += [
        "",
        "## Every run",
        "",
        "| shape | seed | val acc | acc - uniform | CPU s |",
        "|---|---|---|---|---|",
    ]
    uniform = {r["seed"]: r["acc"] for r in result["runs"] if r["shape_name"] == "uniform"}
    order = [*SHAPES, *DMS_SETTINGS]
    for r in sorted(result["runs"], key=lambda r: (order.index(r["shape_name"]), r["seed"])):
        diff = f"{100 * (r['acc'] - uniform[r['seed']]):+.2f}" if r["seed"] in uniform else ""
        lines.append(f"| {r['shape_name']} | {r['seed']} | {r['acc']:.4f} | {diff} | {r['cpu_s']:.0f} |")
    if result.get("notes"):
        lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


def _table_rows(runs: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    arch = {r["shape_name"]: r["architecture"] for r in runs}
    lines = []
    for name, g in s.items():
        d = g.get("minus_uniform")
        diff = se = ci = wins = ""
        if d:
            diff = f"{100 * d['mean']:+.2f} ± {100 * d['std']:.2f}"
            se, ci = f"{100 * d['se']:.2f}", f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
            wins = f"{d['wins']}/{d['n']}"
        if name == STORED:
            f = g["found"]
            shape_cells = (
                f"{f['depth']} (per seed) | 64 | {f['heads'][0]}-{f['heads'][1]} of 16, per seed (of the 4 supernet "
                f"blocks) | {f['mlp'][0]}-{f['mlp'][1]}, per seed | 0.500 (dms_long.json) | | depth + heads + mlp"
            )
        elif name in DMS_SETTINGS:
            shape_cells = f"{found_cells(runs, name)} | {json.dumps(DMS_SETTINGS[name])}"
        else:
            a = arch[name]
            shape_cells = (
                f"{a['depth']} | {a['embed']} | {a['heads']} ({a['head_dim']}) | {a['mlp']} "
                f"| {g['flops_over_full']:.3f} | {g['flops_over_uniform']:.3f} | {SHAPES[name]['needs']}"
            )
        lines.append(
            f"| {name} | {shape_cells} | {g['acc'][0]:.4f} ± {g['acc'][1]:.4f} | {diff} | {se} | {ci} | {wins} "
            f"| {g['n']} |"
        )
    return lines


def dms_row(
    seed: int, name: str, full: int, f_uniform: int, epochs: int, search_epochs: int, target: float = 0.5
) -> dict[str, Any]:
    """One DMS setting's run (``DMS_SETTINGS[name]``, ``bench_dms.run_dms``: pipelines a and b) as a results row:
    the exported architecture, its FLOPs over the full and the uniform model, both pipelines' accuracies, the
    search's cost."""
    t0 = time.process_time()
    dms = run_dms(seed, epochs, target, full, search_epochs=search_epochs, **DMS_SETTINGS[name])
    found = dms["architecture"]
    blocks = [k.split("/")[2].split(":")[0] for k in found if k.endswith(":mlp")]
    return {
        "shape_name": name,
        "seed": seed,
        "architecture": {
            "depth": found.get("model/blocks:depth", SUPERNET["depth"]),
            "embed": found.get("model:embed", SUPERNET["embed_dim"]),
            "heads": [found.get(f"model/blocks/{b}:heads", SUPERNET["num_heads"]) for b in blocks],
            "mlp": [found[f"model/blocks/{b}:mlp"] for b in blocks],
            "gates": found,
        },
        "flops_over_full": dms["dms_a"]["flops_ratio"],
        "flops_over_uniform": dms["dms_a"]["flops_ratio"] * full / f_uniform,
        "searched_ratio": dms["searched_ratio"],
        "acc": dms["dms_a"]["acc"],
        "dms_b_acc": dms["dms_b"]["acc"],
        "dms_a_epoch_cpu_s": dms["dms_a"]["seconds"],  # search epochs + the from-scratch fit
        "search_fraction": dms["dms_a"]["search_fraction"],
        "cpu_s": time.process_time() - t0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["run", "report", "shapes", "dms"], default="run")
    parser.add_argument("--settings", nargs="+", default=list(DMS_SETTINGS), choices=list(DMS_SETTINGS), help="dms")
    parser.add_argument("--search-epochs", type=int, default=3, help="dms part: as dms_long")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10, 18)))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--jobs", default="0::1", help="slice start::step of the seed-major job list")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--val-extra", type=int, default=5000)
    parser.add_argument("--merge", type=Path, nargs="*", default=[])
    parser.add_argument("--held-out-seeds", type=int, nargs="*", help="report: a table of these seeds alone")
    parser.add_argument("--out", type=Path, default=RESULTS / "dms_vit_headroom.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "report":
        result = merge_runs(args.out, args.merge)
        if args.held_out_seeds is not None:
            result["held_out_seeds"] = sorted(args.held_out_seeds)
        result["summary"] = summarise(result["runs"], result["config"]["target"])
        if result.get("held_out_seeds"):
            held_out = set(result["held_out_seeds"])
            runs = [r for r in result["runs"] if r["seed"] in held_out]
            result["summary_held_out"] = summarise(runs, result["config"]["target"])
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return result
    mnist1d_tensors()
    bench_dms.VALIDATION.update(extra=args.val_extra, last_only=True)
    full = flops(make_vit(**SUPERNET))
    uniform = solve_shape("uniform", int(args.target * full))
    f_uniform = flops(build(uniform))
    shapes = {name: uniform if name == "uniform" else solve_shape(name, f_uniform) for name in args.shapes}
    if args.part == "shapes":
        for name, shape in shapes.items():
            f = flops(build(shape))
            print(f"{name}: {architecture_of(build(shape))} FLOPs/full {f / full:.4f} /uniform {f / f_uniform:.4f}")
        return {}
    start, step = (int(x) for x in args.jobs.split("::"))
    names = args.settings if args.part == "dms" else args.shapes
    jobs = [(seed, name) for seed in args.seeds for name in names][start::step]
    result: dict[str, Any] = {
        "config": {
            "supernet": SUPERNET,
            "target": args.target,
            "epochs": args.epochs,
            "val_extra": args.val_extra,
            "val_last_only": True,
            "threads": 1,
            "full_flops": full,
            "uniform_flops": f_uniform,
        },
        "runs": [],
    }
    for seed, name in jobs:
        if args.part == "dms":  # bench_dms's pipeline a (its weights: seed + 1000), the search's settings changed
            row = dms_row(seed, name, full, f_uniform, args.epochs, args.search_epochs, args.target)
            found = row["architecture"]["gates"]
            result["runs"].append(row)
            args.out.write_text(json.dumps(result, indent=2))
            print(f"seed {seed} {name}: dms_a {row['acc']:.4f} dms_b {row['dms_b_acc']:.4f} {found}", flush=True)
            continue
        torch.manual_seed(seed)  # as bench_dms's uniform arm: the weights depend on the seed only
        net = build(shapes[name])
        f = flops(net)
        assert abs(f / f_uniform - 1) < 0.05, (name, f / f_uniform)
        t0 = time.process_time()
        acc, _ = fit(Classifier(net, max_epochs=args.epochs), args.epochs, seed, [])
        row = {
            "shape_name": name,
            "seed": seed,
            "architecture": architecture_of(net),
            "forward_flops": f,
            "flops_over_full": f / full,
            "flops_over_uniform": f / f_uniform,
            "acc": acc,
            "cpu_s": time.process_time() - t0,
        }
        result["runs"].append(row)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"seed {seed} {name}: acc {acc:.4f} ({row['cpu_s']:.0f} CPU s)", flush=True)
    return result


if __name__ == "__main__":
    main()
