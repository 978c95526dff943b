"""Tabulates the LM growth runs on their own shorter schedule (``bench_growth_lm.py --grown-steps``) against the
same-length ones: ``benchmarks/results/growth_lm_1500_short.md`` (see ``growth_lm_1500_short_protocol.md``); and the
runs with gradient clipping at 1.0 for every run (``--grad-clip 1.0``): ``benchmarks/results/growth_lm_1500_clip.md``
(see ``growth_lm_1500_clip_protocol.md``).

    python benchmarks/growth_lm_short_report.py

Reads the result files (no training). Per setting and seed: the grown run's final loss minus the reference's final
loss at 1,500 steps, its total FLOPs over the reference's, and the FLOPs (over the reference's full run) at its first
validation whose loss is <= the reference's final loss. For the clipped runs also the reference per seed with and
without clipping (final loss, loss at step 100: the runs that stall sit near the unigram loss there) and the
seed-to-seed std of its final loss.
"""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = "fixed_final_growth_lr"
GROWN = "stack_ramp"
#: (phase, label, result file); a missing file is skipped (runs not made).
SETTINGS = [
    ("choice (seeds 12-14)", "same length, 1,500 steps (earlier result)", "growth_lm_1500_tuned_r30.json"),
    ("choice (seeds 12-14)", "own schedule, T = 1300", "growth_lm_1500_short_choice_T1300.json"),
    ("choice (seeds 12-14)", "own schedule, T = 1200", "growth_lm_1500_short_choice_T1200.json"),
    ("choice (seeds 12-14)", "own schedule, T = 1300, lr 1.3e-2", "growth_lm_1500_short_choice_T1300_lr0.013.json"),
    ("replication (seeds 15-17)", "same length, 1,500 steps (earlier result)", "growth_lm_1500_tuned_replicate.json"),
    ("confirmation (fresh seeds 18-20)", "own schedule, T = 1300 (declared)", "growth_lm_1500_short_confirm.json"),
    (
        "confirmation (fresh seeds 18-20)",
        "own schedule, T = 1200 (information)",
        "growth_lm_1500_short_confirm_T1200.json",
    ),
    (
        "confirmation (fresh seeds 18-20)",
        "same length, 1,500 steps (information)",
        "growth_lm_1500_short_confirm_T1500.json",
    ),
    ("replication (fresh seeds 21-23)", "own schedule, T = 1300 (declared)", "growth_lm_1500_short_replicate.json"),
]


#: The clipped runs (``growth_lm_1500_clip_protocol.md``): (phase, label, result files as a glob over seeds).
CLIP_SETTINGS = [
    ("choice (seeds 12-14)", "same length, 1,500 steps", "growth_lm_1500_clip_choice_s*.json"),
    ("choice (seeds 12-14)", "own schedule, T = 1300", "growth_lm_1500_clip_choice_T1300_s*.json"),
    ("confirmation (fresh seeds 24-26)", "same length, 1,500 steps", "growth_lm_1500_clip_confirm_s*.json"),
    ("confirmation (fresh seeds 24-26)", "own schedule, T = 1300", "growth_lm_1500_clip_confirm_T1300_s*.json"),
]
#: The clipped references (one file per seed) and the stored unclipped ones (seeds 12-23, same configuration).
CLIP_REFERENCES = ["growth_lm_1500_clip_*ref_s*.json"]
UNCLIPPED_REFERENCES = [
    "growth_lm_1500_tuned_r30.json",
    "growth_lm_1500_tuned_replicate.json",
    "growth_lm_1500_short_confirm.json",
    "growth_lm_1500_short_replicate.json",
]
#: The clipped same-length grown runs and the stored unclipped ones (seeds 12-20, same configuration).
CLIP_GROWN = ["growth_lm_1500_clip_choice_s*.json", "growth_lm_1500_clip_confirm_s*.json"]
UNCLIPPED_GROWN = [
    "growth_lm_1500_tuned_r30.json",
    "growth_lm_1500_tuned_replicate.json",
    "growth_lm_1500_short_confirm_T1500.json",
]
STALL_STEP = 100


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.4f}" if values else "-"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}"


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed with both runs: final-loss difference, total FLOPs ratio, FLOPs ratio at first reaching the loss."""
    reference = {r["seed"]: r for r in record["runs"][REFERENCE]}
    out = []
    for run in record["runs"].get(GROWN, []):
        ref = reference.get(run["seed"])
        if ref is None:
            continue
        first = next((row for row in run["curve"] if row["val_loss"] <= ref["val_loss"]), None)
        out.append(
            {
                "seed": run["seed"],
                "steps": run.get("steps", len(run["curve"]) * 50),
                "diff": run["val_loss"] - ref["val_loss"],
                "total": run["flops"] / ref["flops"],
                "reach": None if first is None else first["flops"] / ref["flops"],
            }
        )
    return out


def load(pattern: str) -> dict[str, Any] | None:
    """The runs of the result files matching ``pattern`` (one file per seed) as one record, or ``None``."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(glob.glob(str(RESULTS / pattern))):
        for name, results in json.loads(Path(path).read_text())["runs"].items():
            for run in results:
                if runs.setdefault(name, {}).setdefault(run["seed"], run)["val_loss"] != run["val_loss"]:
                    raise ValueError(f"{path}: {name} seed {run['seed']} differs from the run already read")
    if not runs:
        return None
    return {"runs": {name: [seeds[s] for s in sorted(seeds)] for name, seeds in runs.items()}}


def by_seed(patterns: list[str], variant: str = REFERENCE) -> dict[int, dict[str, Any]]:
    """``variant``'s runs by seed in the result files matching ``patterns``."""
    runs: dict[int, dict[str, Any]] = {}
    for pattern in patterns:
        record = load(pattern)
        runs.update({} if record is None else {r["seed"]: r for r in record["runs"].get(variant, [])})
    return runs


def _loss_at(run: dict[str, Any], step: int) -> float:
    return next(row["val_loss"] for row in run["curve"] if row["step"] == step)


def _std_text(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n = {len(values)})"


def clip_vs_unclipped_table(clipped: dict[int, dict[str, Any]], unclipped: dict[int, dict[str, Any]]) -> str:
    """Per seed the final loss (and the loss at step 100) of one variant with and without clipping, and the std."""
    lines = [
        f"| seed | unclipped final loss | clipped final loss | clipped minus unclipped | unclipped loss at step "
        f"{STALL_STEP} | clipped loss at step {STALL_STEP} |",
        "|---|---|---|---|---|---|",
    ]
    for seed in sorted(set(clipped) | set(unclipped)):
        a, b = unclipped.get(seed), clipped.get(seed)
        cells = [
            "-" if a is None else f"{a['val_loss']:.4f}",
            "-" if b is None else f"{b['val_loss']:.4f}",
            "-" if a is None or b is None else f"{b['val_loss'] - a['val_loss']:+.4f}",
            "-" if a is None else f"{_loss_at(a, STALL_STEP):.3f}",
            "-" if b is None else f"{_loss_at(b, STALL_STEP):.3f}",
        ]
        lines.append(f"| {seed} | {' | '.join(cells)} |")
    both = sorted(set(clipped) & set(unclipped))
    lines += [
        "",
        "Final loss, mean ± std over seeds (sample std):",
        "",
        f"- unclipped, every stored seed ({', '.join(map(str, sorted(unclipped)))}): "
        f"{_std_text([unclipped[s]['val_loss'] for s in sorted(unclipped)])}",
        f"- unclipped, the seeds also run clipped ({', '.join(map(str, both))}): "
        f"{_std_text([unclipped[s]['val_loss'] for s in both])}",
        f"- clipped at 1.0, the same seeds: {_std_text([clipped[s]['val_loss'] for s in both])}",
        f"- clipped at 1.0, every seed run ({', '.join(map(str, sorted(clipped)))}): "
        f"{_std_text([clipped[s]['val_loss'] for s in sorted(clipped)])}",
    ]
    return "\n".join(lines) + "\n"


def table(settings: list[tuple[str, str, str]] | None = None) -> str:
    lines = [
        "| phase | grown setting | seeds | final loss minus reference's (per seed; mean ± std) | "
        "total FLOPs / reference | "
        "first reaches the reference's final loss at (FLOPs / reference's full run, per seed) | <= 0.65x |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, label, name in SETTINGS if settings is None else settings:
        record = load(name)
        if record is None or REFERENCE not in record["runs"]:
            continue
        got = rows(record)
        if not got:
            continue
        diffs = [r["diff"] for r in got]
        reach = [r["reach"] for r in got]
        reach_text = ", ".join("never" if x is None else f"{x:.3f}" for x in reach)
        if all(x is not None for x in reach) and len(reach) > 1:
            reach_text += f" ({statistics.mean(reach):.3f} ± {statistics.stdev(reach):.3f})"
        met = sum(x is not None and x <= 0.65 for x in reach)
        lines.append(
            f"| {phase} | {label} | {', '.join(str(r['seed']) for r in got)} | "
            f"{', '.join(f'{d:+.4f}' for d in diffs)} ({_mean_std(diffs)}) | "
            f"{statistics.mean(r['total'] for r in got):.3f} | {reach_text} | {met} of {len(got)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> str:
    text = (
        "# LM growth on its own shorter schedule vs the tuned fixed 6-block reference (1,500 steps)\n\n"
        "Reference: `fixed_final_growth_lr` (fixed 6 blocks, lr 1e-2, cosine restarted at step 500, 1,500 steps). "
        "Grown: `stack_ramp` (ramped G_stack 2 -> 6 at 1/3 of its own steps, ramp 180, cosine restarted at the "
        "growth step with a 30-step re-warm), trained `T` steps with its schedule spanning `T` "
        "(`bench_growth_lm.py --grown-steps T`). Protocol: `growth_lm_1500_short_protocol.md`. "
        "Generated by `benchmarks/growth_lm_short_report.py`.\n\n" + table()
    )
    (RESULTS / "growth_lm_1500_short.md").write_text(text)
    clip = (
        "# LM growth with gradient clipping at 1.0 for every run (1,500 steps)\n\n"
        "Every run: `--steps 1500 --ramp-steps 180 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 "
        "--lr-restart-warmup 30 --grad-clip 1.0`. Reference: `fixed_final_growth_lr` (fixed 6 blocks, cosine "
        "restarted at step 500), clipped. Grown: `stack_ramp` (ramped G_stack 2 -> 6 at 1/3 of its steps, ramp 180, "
        "cosine restarted at the growth step), clipped, the same length or its own `--grown-steps 1300`. Protocol: "
        "`growth_lm_1500_clip_protocol.md`. Generated by `benchmarks/growth_lm_short_report.py`.\n\n"
        "## Grown vs the clipped reference\n\n" + table(CLIP_SETTINGS) + "\n## The reference with and without "
        "clipping\n\nUnclipped: the stored runs of the same configuration without `--grad-clip` ("
        + ", ".join(f"`{name}`" for name in UNCLIPPED_REFERENCES)
        + f"). The loss at step {STALL_STEP} shows the early stalls (a run that stalls still sits near 3.0-3.2 "
        "nats/byte there).\n\n"
        + clip_vs_unclipped_table(by_seed(CLIP_REFERENCES), by_seed(UNCLIPPED_REFERENCES))
        + "\n## The grown run (same length, 1,500 steps) with and without clipping\n\nUnclipped: "
        + ", ".join(f"`{name}`" for name in UNCLIPPED_GROWN)
        + f". At step {STALL_STEP} it is still the 2-block start model.\n\n"
        + clip_vs_unclipped_table(by_seed(CLIP_GROWN, GROWN), by_seed(UNCLIPPED_GROWN, GROWN))
    )
    (RESULTS / "growth_lm_1500_clip.md").write_text(clip)
    print(text)
    print(clip)
    return text


if __name__ == "__main__":
    main()
