"""Headroom on the DMS LM benchmark: does any 50%-FLOPs GPT-2 beat the uniformly narrowed one from scratch?

Issue 11's target is "found architecture trained from scratch >= uniformly narrowed model of equal FLOPs +
0.5 points". Before tuning a search it pays to know whether such an architecture exists on this task at this
scale. This trains a handful of hand-picked GPT-2 shapes at (within 1%) the uniform model's forward FLOPs,
from scratch, on :mod:`benchmarks.bench_dms_lm`'s task (same data, same schedule, same seeds), each for the
steps that spend the uniform arm's compute (``--base-steps`` x the uniform model's step FLOPs: 1,200 steps, what
the benchmark gives its ``uniform`` arm), and compares each with the uniform model paired by seed.

Shapes: ``dim`` (``n_embd``, the residual width), ``layers``, ``heads`` (kept per block; ``head_dim`` is
``dim / n_head`` of the config, so fewer heads than ``n_head`` narrow the attention only, what a DMS head gate
expresses), ``inner`` (MLP width, solved so the forward FLOPs land on the uniform model's). Per shape it is
noted which DMS gate could express it from the 64-wide, 4-block supernet (``residual`` = not expressible: DMS
does not gate ``n_embd``).

Metrics: validation loss (nats/byte) and next-byte top-1 accuracy (%, "points") on the benchmark's held-out
windows.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_lm_headroom.py --jobs 0::2 --out A.json &
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_lm_headroom.py --jobs 1::2 --out B.json &
    python benchmarks/bench_dms_lm_headroom.py --part report --merge A.json B.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_dms_lm import (
    RESULTS,
    GPT2Bytes,
    architecture_of,
    evaluate,
    fit,
    forward_flops,
    gpt2_config,
    make_gpt2,
    uniform_shape,
)
from benchmarks.tasks import LMConfig, merge_runs
from lightning_depthgrow.dms import attach_gates, build_architecture, export_architecture

SUPERNET = {"dim": 64, "layers": 4, "heads": 4, "inner": 256}

# name -> (dim, layers, config heads, kept heads per block (None = all), inner (None = solve), what DMS needs);
# "dms_found" is read per seed from the DMS benchmark's results (the dms_a architecture of that seed)
SHAPES: dict[str, tuple[int, int, int, list[int] | None, int | None, str]] = {
    "uniform": (48, 3, 4, None, None, "residual (the benchmark's hand-scaled model)"),
    "dms_found": (64, 2, 4, None, None, "depth + heads + mlp (what the benchmark's DMS search found, per seed)"),
    "d64_L4_h2": (64, 4, 4, [2, 2, 2, 2], None, "heads + mlp (width-only search)"),
    "d64_L3_h3": (64, 3, 4, [3, 3, 3], None, "depth + heads + mlp"),
    "d48_L4": (48, 4, 4, None, None, "residual + heads + mlp (keep depth)"),
    "d56_L3": (56, 3, 4, None, None, "residual (less) + mlp (more)"),
    "d40_L4_wide_mlp": (40, 4, 4, None, None, "residual (more), MLP ~5x"),
}


def build(shape: dict[str, Any], context: int) -> GPT2Bytes:
    """A fresh GPT-2 of ``shape``; kept heads below ``n_head`` and per-block MLP widths (``inner`` a list) are
    sliced by DMS's ``build_architecture``."""
    kept, inner = shape["heads"], shape["inner"]
    widest = max(inner) if isinstance(inner, list) else inner
    config = gpt2_config(shape["dim"], shape["layers"], shape["config_heads"], widest, context)
    net = GPT2Bytes(config)
    heads_cut = kept is not None and any(k != shape["config_heads"] for k in kept)
    mlp_cut = isinstance(inner, list) and any(i != widest for i in inner)
    if heads_cut or mlp_cut:
        probe = GPT2Bytes(config)
        attach_gates(probe, width=True, heads=True, depth=False)
        arch = export_architecture(probe)
        for i in range(shape["layers"]):
            if kept is not None:
                arch["gates"][f"gpt/transformer/h/{i}:heads"]["keep"] = list(range(kept[i]))
            if isinstance(inner, list):
                arch["gates"][f"gpt/transformer/h/{i}:mlp"]["keep"] = list(range(inner[i]))
        build_architecture(net, arch)
    return net


def found_shape(seed: int, source: Path = RESULTS / "dms_lm.json") -> dict[str, Any]:
    """The architecture the DMS benchmark's search found on ``seed`` (its ``dms_a`` row in ``source``)."""
    runs = json.loads(source.read_text())["runs"]
    a = next(r["architecture"] for r in runs if r["variant"] == "dms_a" and r["seed"] == seed and r["target"] == 0.5)
    return {
        "dim": a["dim"],
        "layers": a["layers"],
        "config_heads": 4,
        "heads": a["heads"],
        "inner": a["inner"],
        "needs": SHAPES["dms_found"][5],
    }


def solve_shape(
    name: str, target: int, context: int, seed: int = 0, source: Path = RESULTS / "dms_lm.json"
) -> dict[str, Any]:
    if name == "dms_found":
        return found_shape(seed, source)
    dim, layers, heads, kept, inner, needs = SHAPES[name]
    if name == "uniform":
        u = uniform_shape(SUPERNET, target, context)
        return {
            "dim": u["dim"],
            "layers": u["layers"],
            "config_heads": u["heads"],
            "heads": None,
            "inner": u["inner"],
            "needs": needs,
        }
    shape = {"dim": dim, "layers": layers, "config_heads": heads, "heads": kept, "inner": inner, "needs": needs}
    if inner is None:  # FLOPs are linear in the MLP width: two counts give the line
        lo = forward_flops(build({**shape, "inner": 1}, context), context)
        hi = forward_flops(build({**shape, "inner": 1001}, context), context)
        shape["inner"] = max(1, round(1 + (target - lo) * 1000 / (hi - lo)))
    return shape


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["shape_name"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {}
    for name in SHAPES:
        rows = [r for r in runs if r["shape_name"] == name]
        if not rows:
            continue
        s: dict[str, Any] = {"n": len(rows)}
        for key in ("val_loss", "val_acc"):
            vals = [r[key] for r in rows]
            s[key] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
            diffs = [r[key] - by[("uniform", r["seed"])][key] for r in rows if ("uniform", r["seed"]) in by]
            if name != "uniform" and diffs:
                s[key + "_minus_uniform"] = {
                    "mean": statistics.fmean(diffs),
                    "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                    "per_seed": diffs,
                }
        s["flops_over_uniform"] = rows[0]["flops_over_uniform"]
        s["steps"] = rows[0]["steps"]
        out[name] = s
    return out


def markdown(result: dict[str, Any]) -> str:
    s = summarise(result["runs"])
    shapes = {r["shape_name"]: r for r in result["runs"]}
    lines = [
        "# DMS LM headroom: hand-picked 50%-FLOPs GPT-2 shapes trained from scratch",
        "",
        "Generated by `benchmarks/bench_dms_lm_headroom.py` (see its docstring). Task, data order, schedule and "
        "seeds of `benchmarks/bench_dms_lm.py`; every shape trained from scratch for the steps that spend the "
        "uniform arm's compute. Loss in nats/byte (lower is better), accuracy = next-byte top-1 in % (points). "
        "Differences are paired by seed against `uniform` (negative loss / positive accuracy = the shape is "
        "better).",
        "",
        f"Configuration: {json.dumps(result['config'])}",
        "",
        "| shape | n_embd | blocks | heads kept | MLP | FLOPs / uniform | steps | DMS needs | val loss | "
        "loss - uniform (per seed) | accuracy % | acc - uniform (per seed) | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g in s.items():
        sh = shapes[name]["shape"]  # dms_found: one seed's (the others are under "Every run")
        heads = sh["heads"] or [sh["config_heads"]] * sh["layers"]

        def diff(g: dict[str, Any], key: str, fmt: str) -> str:
            d = g.get(key + "_minus_uniform")
            if not d:
                return ""
            per = ", ".join(format(x, fmt) for x in d["per_seed"])
            return f"{d['mean']:{fmt}} ± {d['std']:.3f} ({per})"

        lines.append(
            f"| {name} | {sh['dim']} | {sh['layers']} | {heads} | {sh['inner']} | {g['flops_over_uniform']:.3f} "
            f"| {g['steps']} | {sh['needs']} | {g['val_loss'][0]:.4f} ± {g['val_loss'][1]:.4f} "
            f"| {diff(g, 'val_loss', '+.4f')} | {g['val_acc'][0]:.2f} ± {g['val_acc'][1]:.2f} "
            f"| {diff(g, 'val_acc', '+.2f')} | {g['n']} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| shape | seed | n_embd | blocks | heads per block | MLP per block | steps | val loss | accuracy % | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["runs"], key=lambda r: (list(SHAPES).index(r["shape_name"]), r["seed"])):
        a = r["architecture"]
        lines.append(
            f"| {r['shape_name']} | {r['seed']} | {a['dim']} | {a['layers']} | {a['heads']} | {a['inner']} "
            f"| {r['steps']} | {r['val_loss']:.4f} | {r['val_acc']:.2f} | {r['cpu_s']:.0f} |"
        )
    if result.get("notes"):
        lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["run", "report"], default="run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--jobs", default="0::1", help="slice start::step of the seed-major job list")
    parser.add_argument("--base-steps", type=int, default=1200, help="steps of the uniform model")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--epoch-steps", type=int, default=100)
    parser.add_argument(
        "--found-from",
        type=Path,
        default=RESULTS / "dms_lm.json",
        help="the DMS benchmark results whose dms_a architectures are dms_found",
    )
    parser.add_argument("--merge", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS / "dms_lm_headroom.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "report":
        result = merge_runs(args.out, args.merge)
        result["summary"] = summarise(result["runs"])
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return result
    config = LMConfig(dim=64, heads=4, context=128, batch_size=32, steps=args.base_steps, val_windows=512)
    full = forward_flops(make_gpt2(SUPERNET, config.context), config.context)
    target = int(args.target * full)
    uniform = solve_shape("uniform", target, config.context)
    f_uniform = forward_flops(build(uniform, config.context), config.context)
    start, step = (int(x) for x in args.jobs.split("::"))
    jobs = [(seed, name) for seed in args.seeds for name in args.shapes][start::step]
    result: dict[str, Any] = {
        "config": {
            "supernet": SUPERNET,
            "target": args.target,
            "base_steps": args.base_steps,
            "found_from": args.found_from.name,
            "epoch_steps": args.epoch_steps,
            "lm": {
                "lr": config.lr,
                "batch_size": config.batch_size,
                "context": config.context,
                "warmup": config.warmup_steps,
            },
        },
        "runs": [],
    }
    for seed, name in jobs:
        shape = uniform if name == "uniform" else solve_shape(name, f_uniform, config.context, seed, args.found_from)
        torch.manual_seed(seed)
        net = build(shape, config.context)
        f = forward_flops(net, config.context)
        steps = round(args.base_steps * f_uniform / f)
        t0 = time.process_time()
        out = fit(net, replace(config, steps=steps), seed, args.epoch_steps, [])
        loss, acc = evaluate(out["module"].model, config)
        row = {
            "shape_name": name,
            "seed": seed,
            "shape": shape,
            "architecture": architecture_of(out["module"].model),
            "forward_flops": f,
            "flops_over_full": f / full,
            "flops_over_uniform": f / f_uniform,
            "steps": steps,
            "val_loss": loss,
            "val_acc": acc,
            "bench_val_loss": out["val_loss"],
            "cpu_s": time.process_time() - t0,
            "first_batch_sum": out["first_batch_sum"],
        }
        result["runs"].append(row)
        result["summary"] = summarise(result["runs"])
        args.out.write_text(json.dumps(result, indent=2))
        print(f"seed {seed} {name}: loss {loss:.4f} acc {acc:.2f} steps {steps} ({row['cpu_s']:.0f} CPU s)", flush=True)
    return result


if __name__ == "__main__":
    main()
