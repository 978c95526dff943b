"""DMS with the embedding-width gate on the MNIST-1D tiny timm ViT: found architecture from scratch vs uniform.

Issue 11's target: the architecture DMS finds at 50% FLOPs, trained from scratch (pipeline a), >= the uniformly
narrowed model of equal FLOPs + 0.5 points. The hand-picked headroom study (``dms_vit_headroom.md``) found its best
50% shape (embed 48, 4 blocks, 4 heads, MLP 71) needs the embedding (residual-stream) width, which DMS did not gate;
``DifferentiableModelScaling(embed=True)`` now does (site ``vit_embed``, docs/dms.md).

Protocol: :mod:`benchmarks.bench_dms_vit_headroom`'s, i.e. ``bench_dms.py``'s ``dms_long`` run (12 epochs, the same
data order per seed, MNIST-1D's 1,000 test signals plus 5,000 of a second draw validated after the last epoch, one
torch thread, AdamW and cosine schedule). Per seed, one process runs

- ``uniform``: ``torch.manual_seed(seed)`` then the uniformly narrowed ViT at 50% of the supernet's FLOPs (embed 44,
  MLP 95; exactly ``bench_dms.py``'s ``uniform`` arm), trained from scratch;
- the DMS setting (``bench_dms_vit_headroom.DMS_SETTINGS``): ``bench_dms.run_dms``, i.e. a search of
  ``--search-epochs`` epochs inside a 12-epoch fit (pipeline b), its exported architecture rebuilt on a fresh
  supernet (``torch.manual_seed(seed + 1000)``) and trained from scratch for 12 epochs (pipeline a, ``acc``);

and the report pairs them by seed (accuracy difference in points, mean, std, SE, 95% CI, wins).

    # choose settings on seeds 10-17 (uniform runs reused from dms_vit_headroom.json, same protocol and seeds)
    python benchmarks/bench_dms_vit_embed.py --part tune --settings dms_a_embed dms_a_embed_no_depth ...
    # the declared setting on fresh seeds
    python benchmarks/bench_dms_vit_embed.py --part confirm --settings dms_a_embed_no_depth --seeds 66 ... 89
    python benchmarks/bench_dms_vit_embed.py --part report --out benchmarks/results/dms_vit_embed_confirm.json
    # tied MLP widths (``tie=("width",)``, setting dms_a_embed_mlp_tied): choice on 10-17 against the stored untied
    # rows, then the declared confirmation (benchmarks/results/dms_vit_tie_protocol.md)
    python benchmarks/bench_dms_vit_headroom.py --part dms --settings dms_a_embed_mlp_tied --seeds 10 ... 17 \
        --out benchmarks/results/dms_vit_tie_tune_runs.json
    python benchmarks/bench_dms_vit_embed.py --part tune --settings dms_a_embed_mlp_only dms_a_embed_mlp_tied \
        --seeds 10 ... 17 --out benchmarks/results/dms_vit_tie_tune.json \
        --tuned benchmarks/results/dms_vit_embed_tune.json benchmarks/results/dms_vit_tie_tune_runs.json
    python benchmarks/bench_dms_vit_embed.py --part confirm --settings dms_a_embed_mlp_tied --seeds 106 ... 129 \
        --out benchmarks/results/dms_vit_tie_confirm.json

Writes ``benchmarks/results/dms_vit_embed_*.json`` and ``.md``.
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
from benchmarks import bench_dms_vit_headroom as headroom
from benchmarks.bench_dms import SUPERNET, Classifier, fit, flops, make_vit
from examples.common import mnist1d_tensors
from lightning_depthgrow.dms import attach_gates, build_architecture, export_architecture

RESULTS = Path(__file__).resolve().parent / "results"


def uniform_row(
    seed: int, shape: dict[str, Any] | None, full: int, f_uniform: int, epochs: int, name: str = "uniform"
) -> dict[str, Any]:
    """The uniformly narrowed model (``shape``), or with ``shape=None`` the full supernet (``name="full"``: does
    the protocol tell 100% from 50% FLOPs apart?), from scratch."""
    torch.manual_seed(seed)  # as bench_dms's uniform arm: the weights depend on the seed only
    net = headroom.build(shape) if shape is not None else make_vit(**SUPERNET)
    t0 = time.process_time()
    acc, _ = fit(Classifier(net, max_epochs=epochs), epochs, seed, [])
    return {
        "shape_name": name,
        "seed": seed,
        "architecture": headroom.architecture_of(net),
        "forward_flops": flops(net),
        "flops_over_full": flops(net) / full,
        "flops_over_uniform": flops(net) / f_uniform,
        "acc": acc,
        "cpu_s": time.process_time() - t0,
    }


HAND_EMBED = 43  # the median embedding width the declared setting exported on seeds 66-89
_HAND_MLP: dict[int, int] = {}  # uniform FLOPs -> the hand-built shape's MLP width at them


def hand_built(mlp: int, embed: int = HAND_EMBED) -> torch.nn.Module:
    """A fresh supernet cut to embed ``embed`` (4 heads of 16 kept) and ``mlp`` units per block: the kind of shape
    the embed + MLP search exports, with one MLP width for every block (built by ``build_architecture``)."""
    probe = make_vit(**SUPERNET)
    attach_gates(probe, width=True, heads=False, depth=False, embed=True)
    arch = export_architecture(probe)
    for name, gate in arch["gates"].items():
        gate["keep"] = list(range(embed if name.endswith(":embed") else mlp))
    net = make_vit(**SUPERNET)
    build_architecture(net, arch)
    return net


def hand_row(seed: int, full: int, f_uniform: int, epochs: int) -> dict[str, Any]:
    """The hand-built shape from scratch, with pipeline (a)'s fresh-supernet seed (``seed + 1000``)."""
    if f_uniform not in _HAND_MLP:
        _HAND_MLP[f_uniform] = min(range(8, 129), key=lambda m: abs(flops(hand_built(m)) - f_uniform))
    mlp = _HAND_MLP[f_uniform]
    torch.manual_seed(seed + 1000)
    net = hand_built(mlp)
    t0 = time.process_time()
    acc, _ = fit(Classifier(net, max_epochs=epochs), epochs, seed, [])
    return {
        "shape_name": "hand_e43_h16",
        "seed": seed,
        "architecture": {**headroom.architecture_of(net), "embed": net.embed_dim},
        "forward_flops": flops(net),
        "flops_over_full": flops(net) / full,
        "flops_over_uniform": flops(net) / f_uniform,
        "acc": acc,
        "cpu_s": time.process_time() - t0,
    }


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"# DMS with the embedding-width gate (ViT, MNIST-1D): {result['title']}",
        "",
        "Generated by `benchmarks/bench_dms_vit_embed.py` (see its docstring). Pipeline (a): the architecture a DMS "
        f"search found at {100 * result['config']['target']:.0f}% FLOPs, trained from scratch; compared with the "
        "uniformly narrowed model of the same FLOPs (4 blocks, 4 heads, narrower embedding and MLP widths; 50%: embed "
        "44, MLP 95) of the same seed. Differences in points (1 point = 0.01 accuracy).",
        "",
        f"Configuration: {json.dumps(result['config'])}",
        "",
    ]
    if result.get("declared"):
        lines += [f"Declared before running: {result['declared']}", ""]
    lines += headroom.summary_table(result)
    pairs = paired(result["runs"])
    if pairs:
        lines += ["", "Paired differences, points (every pair of arms with common seeds):", ""]
        lines += ["| arm - arm | mean | std | SE | 95% CI | median | wins | n |", "|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(
                f"| {p['a']} - {p['b']} | {p['mean']:+.2f} | {p['std']:.2f} | {p['se']:.2f} | [{p['ci95'][0]:+.2f}, "
                f"{p['ci95'][1]:+.2f}] | {p['median']:+.2f} | {p['wins']}/{p['n']} | {p['n']} |"
            )
    lines += ["", "Verdict per setting (target: mean paired difference >= +0.5 points):", ""]
    for name, g in s.items():
        d = g.get("minus_uniform")
        if d and name in headroom.DMS_SETTINGS:
            met = "met" if d["mean"] >= 0.005 else "NOT met"
            met += "; the 95% CI excludes 0" if d["ci95"][0] > 0 else "; the 95% CI includes 0 (not significant)"
            met += f"; median {100 * statistics.median(d['per_seed'].values()):+.2f}"
            lines.append(
                f"- {name}: {100 * d['mean']:+.2f} points (SE {100 * d['se']:.2f}, 95% CI [{100 * d['ci95'][0]:+.2f}, "
                f"{100 * d['ci95'][1]:+.2f}], wins {d['wins']}/{d['n']}): {met}"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| setting | seed | embed | depth | heads | MLP | FLOPs / full | val acc | acc - uniform | dms_b acc | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    uniform = {r["seed"]: r["acc"] for r in result["runs"] if r["shape_name"] == "uniform"}
    for r in sorted(result["runs"], key=lambda r: (r["shape_name"] != "uniform", r["shape_name"], r["seed"])):
        a = r["architecture"]
        diff = (
            f"{100 * (r['acc'] - uniform[r['seed']]):+.2f}"
            if r["seed"] in uniform and r["shape_name"] != "uniform"
            else ""
        )
        lines.append(
            f"| {r['shape_name']} | {r['seed']} | {a['embed']} | {a['depth']} | {a['heads']} | {a['mlp']} "
            f"| {r['flops_over_full']:.3f} | {r['acc']:.4f} | {diff} | {r.get('dms_b_acc', float('nan')):.4f} "
            f"| {r['cpu_s']:.0f} |"
        )
    if result.get("notes"):
        lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


def paired(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences (points) of every arm against uniform, and of the other arms against each other."""
    acc: dict[str, dict[int, float]] = {}
    for r in runs:
        acc.setdefault(r["shape_name"], {})[r["seed"]] = 100 * r["acc"]
    names = ["uniform", *sorted(n for n in acc if n != "uniform")]
    out = []
    for j, b in enumerate(names):
        for a in names[j + 1 :]:
            seeds = sorted(set(acc[a]) & set(acc.get(b, {})))
            if len(seeds) < 2:
                continue
            d = [acc[a][s] - acc[b][s] for s in seeds]
            mean, std = statistics.fmean(d), statistics.stdev(d)
            se = std / len(d) ** 0.5
            out.append(
                {
                    "a": a,
                    "b": b,
                    "mean": mean,
                    "std": std,
                    "se": se,
                    "ci95": [mean - 1.96 * se, mean + 1.96 * se],
                    "median": statistics.median(d),
                    "wins": sum(x > 0 for x in d),
                    "n": len(d),
                }
            )
    return out


def report(path: Path) -> dict[str, Any]:
    result = json.loads(path.read_text())
    result["summary"] = headroom.summarise(result["runs"], result["config"]["target"])
    result["paired_points"] = paired(result["runs"])
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["tune", "confirm", "report"], default="confirm")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["dms_a_embed_mlp_only"],
        choices=[*headroom.DMS_SETTINGS, "hand_e43_h16", "full"],
        help="DMS settings, or hand_e43_h16 (the diagnostic hand-built shape), or full (the supernet from scratch)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(66, 90)))
    parser.add_argument("--target", type=float, default=0.5, help="FLOPs target (fraction of the supernet's)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--val-extra", type=int, default=5000)
    parser.add_argument(
        "--train-draws",
        type=int,
        nargs="*",
        default=[],
        help="more MNIST-1D draws (generator seeds, e.g. 44 45 46) added to the training set (5,000 signals each)",
    )
    parser.add_argument("--declared", default="", help="the protocol declared (and committed) before the run")
    parser.add_argument(
        "--tuned", type=Path, nargs="*", default=[], help="tune: files of DMS rows (bench_dms_vit_headroom --part dms)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dms_vit_embed_confirm.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "report":
        return report(args.out)
    config = {
        "supernet": SUPERNET,
        "target": args.target,
        "epochs": args.epochs,
        "search_epochs": args.search_epochs,
        "val_extra": args.val_extra,
        "val_last_only": True,
        **({"train_draws": args.train_draws} if args.train_draws else {}),
        "threads": 1,
        "settings": {n: headroom.DMS_SETTINGS.get(n, "hand-built") for n in args.settings},
        "seeds": args.seeds,
    }
    if args.part == "tune":  # DMS rows from --tuned, uniform rows (same protocol, same seeds) from the headroom study
        stored = json.loads((RESULTS / "dms_vit_headroom.json").read_text())["runs"]
        tuned = [r for path in args.tuned for r in json.loads(path.read_text())["runs"]]
        runs = [r for r in stored if r["shape_name"] == "uniform" and r["seed"] in args.seeds]
        runs += [r for r in tuned if r["shape_name"] in args.settings and r["seed"] in args.seeds]
        result = {"title": "choosing the setting (seeds chosen on)", "config": config, "runs": runs}
        args.out.write_text(json.dumps(result, indent=2))
        return report(args.out)
    mnist1d_tensors()
    bench_dms.VALIDATION.update(extra=args.val_extra, last_only=True, train_draws=tuple(args.train_draws))
    full = flops(make_vit(**SUPERNET))
    shape = headroom.solve_shape("uniform", int(args.target * full))
    f_uniform = flops(headroom.build(shape))
    config.update(full_flops=full, uniform_flops=f_uniform)
    result = {"title": "declared setting on fresh seeds", "declared": args.declared, "config": config, "runs": []}
    if args.out.exists():  # resume: keep the seeds already done
        result["runs"] = json.loads(args.out.read_text())["runs"]
    done = {(r["seed"], r["shape_name"]) for r in result["runs"]}
    for seed in args.seeds:
        for name in ["uniform", *args.settings]:
            if (seed, name) in done:
                continue
            if name == "uniform":
                row = uniform_row(seed, shape, full, f_uniform, args.epochs)
            elif name == "full":
                row = uniform_row(seed, None, full, f_uniform, args.epochs, name="full")
            elif name == "hand_e43_h16":
                row = hand_row(seed, full, f_uniform, args.epochs)
            else:
                row = headroom.dms_row(seed, name, full, f_uniform, args.epochs, args.search_epochs, args.target)
            result["runs"].append(row)
            args.out.write_text(json.dumps(result, indent=2))
            print(
                f"seed {seed} {name}: acc {row['acc']:.4f} {row['architecture']} ({row['cpu_s']:.0f} CPU s)", flush=True
            )
    return report(args.out)


if __name__ == "__main__":
    main()
