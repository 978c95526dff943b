"""Tabulates the LM growth runs at 3,000 steps (clipped at 1.0): ``benchmarks/results/growth_lm_3000.md`` (see
``growth_lm_3000_protocol.md``).

    python benchmarks/growth_lm_3000_report.py

Reads the result files (no training). Per phase (pilot, seeds 12-14; confirmation, seeds 27-29) and seed: the
reference's and the grown run's final losses, the paired difference, the grown run's total FLOPs over the
reference's, the reach-ratio (the FLOPs at its first validation whose loss is <= the reference's final loss, over
the reference's full run), the interpolated reach-ratio (the crossing of the straight line between the validation
points around it), and the reference's train-vs-val gap at the end (``train_loss_end``). Then the protocol's stop
rule and success test, and, where run, the fixed 4-block model on the same schedule (the fixed-model frontier).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.growth_lm_short_report import RESULTS, load

REFERENCE = "fixed_final_growth_lr"
GROWN = "stack_ramp"
FRONTIER = "fixed_4_growth_lr"
TARGET = 0.65
#: The steps at which the paired difference (grown minus reference, same step) is shown: how the advantage evolves.
TRAJECTORY_STEPS = (1500, 2000, 2500, 3000)
#: (phase, seeds, result files as a glob over seeds).
PHASES = [
    ("pilot (seeds 12-14, information)", (12, 13, 14), "growth_lm_3000_pilot_*s*.json"),
    ("confirmation (fresh seeds 27-29)", (27, 28, 29), "growth_lm_3000_confirm_*s*.json"),
]


def first_reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first validation row whose loss is <= ``target``, or ``None``."""
    return next((row for row in curve if row["val_loss"] <= target), None)


def interpolated_reach(curve: list[dict[str, float]], target: float) -> float | None:
    """The FLOPs at which the validation curve, linear between its points, first comes down to ``target`` (``None``
    if it never does; the first point's FLOPs if that one is already at or below it)."""
    for i, row in enumerate(curve):
        if row["val_loss"] <= target:
            if i == 0:
                return float(row["flops"])
            prev = curve[i - 1]
            fraction = (prev["val_loss"] - target) / (prev["val_loss"] - row["val_loss"])
            return prev["flops"] + fraction * (row["flops"] - prev["flops"])
    return None


def seed_row(ref: dict[str, Any], run: dict[str, Any] | None) -> dict[str, Any]:
    """One seed's figures: the reference alone (``run`` ``None``: its grown run has not finished) or both."""
    row: dict[str, Any] = {
        "seed": ref["seed"],
        "ref_loss": ref["val_loss"],
        "ref_gap": ref["val_loss"] - ref["train_loss_end"] if "train_loss_end" in ref else None,
        "ref_above_best": ref["val_loss"] - min(row["val_loss"] for row in ref["curve"]),
        "ref_drop_last": _drop_last(ref),
    }
    if run is not None:
        first = first_reach(run["curve"], ref["val_loss"])
        interpolated = interpolated_reach(run["curve"], ref["val_loss"])
        row.update(
            grown_loss=run["val_loss"],
            diff=run["val_loss"] - ref["val_loss"],
            total=run["flops"] / ref["flops"],
            reach=None if first is None else first["flops"] / ref["flops"],
            reach_interp=None if interpolated is None else interpolated / ref["flops"],
            grown_gap=run["val_loss"] - run["train_loss_end"] if "train_loss_end" in run else None,
            trajectory=_same_step_diffs(run, ref),
        )
    return row


def _drop_last(run: dict[str, Any], steps: int = 500) -> float | None:
    """How much the run's validation loss fell over its last ``steps`` steps (``None`` without that point)."""
    last = run["curve"][-1]
    before = next((row for row in run["curve"] if row["step"] == last["step"] - steps), None)
    return None if before is None else before["val_loss"] - last["val_loss"]


def _same_step_diffs(run: dict[str, Any], ref: dict[str, Any]) -> dict[int, float]:
    """Grown minus reference validation loss at the same step, at :data:`TRAJECTORY_STEPS` (where both have it)."""
    a = {row["step"]: row["val_loss"] for row in run["curve"]}
    b = {row["step"]: row["val_loss"] for row in ref["curve"]}
    return {step: a[step] - b[step] for step in TRAJECTORY_STEPS if step in a and step in b}


def trajectory_table(phases: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Per seed the grown run's validation loss minus the reference's at the same step, and both runs' gaps."""
    lines = [
        "| phase | seed | "
        + " | ".join(f"grown minus reference at step {step}" for step in TRAJECTORY_STEPS)
        + " | reference val minus train loss | grown val minus train loss | reference's fall over its last 500 "
        "steps | reference's final minus its lowest val loss |",
        "|---|---|" + "---|" * (len(TRAJECTORY_STEPS) + 4),
    ]
    for phase, rows in phases:
        for r in rows:
            if "diff" not in r:
                continue
            cells = [f"{r['trajectory'][s]:+.4f}" if s in r["trajectory"] else "-" for s in TRAJECTORY_STEPS]
            cells += ["-" if r[k] is None else f"{r[k]:+.4f}" for k in ("ref_gap", "grown_gap", "ref_drop_last")]
            cells.append(f"{r['ref_above_best']:+.4f}")
            lines.append(f"| {phase} | {r['seed']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def phase_rows(pattern: str) -> list[dict[str, Any]]:
    """Per seed with a reference in the files matching ``pattern``."""
    record = load(pattern)
    if record is None or REFERENCE not in record["runs"]:
        return []
    grown = {r["seed"]: r for r in record["runs"].get(GROWN, [])}
    return [seed_row(ref, grown.get(ref["seed"])) for ref in record["runs"][REFERENCE]]


def _cell(value: float | None, fmt: str) -> str:
    return "never" if value is None else format(value, fmt)


def _mean_std(values: list[float | None], fmt: str) -> str:
    """Mean ± sample std (the value itself for one seed), only when every seed has a value (a run that never
    reaches has no ratio)."""
    if not values or any(v is None for v in values):
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), '.4f')}"


def seeds_table(phases: list[tuple[str, list[dict[str, Any]]]]) -> str:
    lines = [
        "| phase | seed | reference final loss | grown final loss | grown minus reference | total FLOPs / reference "
        f"| reach-ratio | <= {TARGET}x | interpolated reach-ratio (information) | reference val minus train loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, rows in phases:
        for r in rows:
            gap = "-" if r["ref_gap"] is None else f"{r['ref_gap']:+.4f}"
            if "diff" not in r:
                cells = [f"{r['ref_loss']:.4f}", "not run", "-", "-", "-", "-", "-", gap]
            else:
                cells = [
                    f"{r['ref_loss']:.4f}",
                    f"{r['grown_loss']:.4f}",
                    f"{r['diff']:+.4f}",
                    f"{r['total']:.3f}",
                    _cell(r["reach"], ".3f"),
                    "yes" if r["reach"] is not None and r["reach"] <= TARGET else "no",
                    _cell(r["reach_interp"], ".3f"),
                    gap,
                ]
            lines.append(f"| {phase} | {r['seed']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def summary_lines(phases: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    out = []
    for phase, rows in phases:
        done = [r for r in rows if "diff" in r]
        if not done:
            continue
        met = sum(r["reach"] is not None and r["reach"] <= TARGET for r in done)
        out.append(
            f"- {phase}, seeds {', '.join(str(r['seed']) for r in done)}: grown minus reference "
            f"{_mean_std([r['diff'] for r in done], '+.4f')}; reference final loss "
            f"{_mean_std([r['ref_loss'] for r in done], '.4f')}; grown final loss "
            f"{_mean_std([r['grown_loss'] for r in done], '.4f')}; reach-ratio "
            f"{_mean_std([r['reach'] for r in done], '.3f')}; interpolated reach-ratio "
            f"{_mean_std([r['reach_interp'] for r in done], '.3f')}; <= {TARGET}x in {met} of {len(done)}; reference "
            f"val minus train loss {_mean_std([r['ref_gap'] for r in done], '+.4f')}"
        )
    return out


def stop_rule(rows: list[dict[str, Any]]) -> str:
    """The protocol's stop rule on the pilot's rows."""
    done = [r for r in rows if "diff" in r]
    if len(done) < 3:
        return f"not applied yet ({len(done)} of 3 pilot grown runs finished)"
    above = sum(r["diff"] > 0 for r in done)
    verdict = "confirmation not run (negative)" if above >= 2 else "confirmation runs"
    return f"the grown run ends above its reference in {above} of 3 pilot seeds: {verdict}"


def success(rows: list[dict[str, Any]], seeds: tuple[int, ...]) -> str:
    """The protocol's success test: reach-ratio <= 0.65x on each confirmation seed."""
    by_seed = {r["seed"]: r for r in rows if "diff" in r}
    missing = [s for s in seeds if s not in by_seed]
    met = [s for s in seeds if s in by_seed and by_seed[s]["reach"] is not None and by_seed[s]["reach"] <= TARGET]
    if len(met) < len(seeds) - len(missing):  # a finished seed misses: not met, whatever the others do
        verdict = "**not met**"
    else:
        verdict = "undecided" if missing else "**met**"
    text = f"{verdict}: reach-ratio <= {TARGET}x on {len(met)} of {len(seeds) - len(missing)} finished seeds"
    return text + (f" (not finished: {', '.join(map(str, missing))})" if missing else "")


#: The 1,500-step study with the same recipe (``growth_lm_1500_clip_protocol.md``), its choice stage (the pilot's
#: seeds 12-14): the same-length grown runs and their references (not its ``T1300`` files).
SHORT_HORIZON = "growth_lm_1500_clip_choice_[rs]*.json"


def horizon_table(long_rows: list[dict[str, Any]], short_pattern: str = SHORT_HORIZON) -> str:
    """The hypothesis directly: per seed run at both horizons, the paired difference and the reach-ratio at 1,500
    steps (the clipped study) and at 3,000 steps (this one)."""
    short = {r["seed"]: r for r in phase_rows(short_pattern) if "diff" in r}
    lines = [
        "| seed | grown minus reference, 1,500 steps | grown minus reference, 3,000 steps | reach-ratio, 1,500 steps "
        "| reach-ratio, 3,000 steps |",
        "|---|---|---|---|---|",
    ]
    for r in long_rows:
        a = short.get(r["seed"])
        if a is None or "diff" not in r:
            continue
        cells = [f"{a['diff']:+.4f}", f"{r['diff']:+.4f}", _cell(a["reach"], ".3f"), _cell(r["reach"], ".3f")]
        lines.append(f"| {r['seed']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def frontier_table(pattern: str) -> str:
    """The fixed 4-block model on the same schedule against the reference and the grown run, per seed."""
    record = load(pattern)
    if record is None or FRONTIER not in record["runs"]:
        return "Not run.\n"
    runs = record["runs"]
    reference = {r["seed"]: r for r in runs[REFERENCE]}
    grown = {r["seed"]: r for r in runs.get(GROWN, [])}
    lines = [
        "| seed | fixed 4 final loss | minus reference | minus grown | FLOPs / reference | reaches the reference's "
        "final loss at (FLOPs / reference) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs[FRONTIER]:
        ref, g = reference[run["seed"]], grown.get(run["seed"])
        first = first_reach(run["curve"], ref["val_loss"])
        cells = [
            f"{run['val_loss']:.4f}",
            f"{run['val_loss'] - ref['val_loss']:+.4f}",
            "-" if g is None else f"{run['val_loss'] - g['val_loss']:+.4f}",
            f"{run['flops'] / ref['flops']:.3f}",
            "never" if first is None else f"{first['flops'] / ref['flops']:.3f}",
        ]
        lines.append(f"| {run['seed']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> str:
    phases = [(phase, phase_rows(pattern)) for phase, _, pattern in PHASES]
    pilot, confirm = phases[0][1], phases[1][1]
    text = (
        "# LM growth at 3,000 steps (clipped at 1.0)\n\n"
        "Every run: `--steps 3000 --ramp-steps 360 --lr 0.01 --min-lr-ratio 0.1 --warmup-steps 30 "
        "--lr-restart-warmup 30 --grad-clip 1.0`. Reference: `fixed_final_growth_lr` (fixed 6 blocks, cosine "
        "restarted at step 1,000). Grown: `stack_ramp` (ramped G_stack 2 -> 6 after step 1,000, ramp 360, cosine "
        "restarted at the growth step), same length. Protocol: `growth_lm_3000_protocol.md`. The 1,500-step "
        "study with the same recipe: `growth_lm_1500_clip.md`. Generated by `benchmarks/growth_lm_3000_report.py`."
        "\n\nReach-ratio: the grown run's FLOPs at its first validation (every 50 steps) whose loss is <= the "
        "reference's final loss, over the reference's full-run FLOPs. Reference val minus train loss: the "
        "reference's final loss on the held-out windows minus its loss on as many fixed windows of the training "
        "bytes (about 6.2 passes over them by the end).\n\n"
        "## Per seed\n\n" + seeds_table(phases) + "\nMean ± std over seeds (sample std; `-` where a seed has no "
        "value):\n\n" + "\n".join(summary_lines(phases)) + "\n\n"
        "## The advantage over training\n\nThe grown run's validation loss minus the reference's at the same step "
        "(both have trained the same steps on the same data; the grown run with less compute), and each run's "
        "final loss on the held-out windows minus its loss on as many fixed windows of the training bytes (the gap "
        "mixes repetition with the difference between the training and held-out files); and whether the reference's "
        "held-out loss still falls at the end (a rise from repeating the bytes would show as a final loss above "
        "its lowest).\n\n" + trajectory_table(phases) + "\n"
        "## 1,500 vs 3,000 steps, same seeds (the hypothesis)\n\n1,500 steps: `growth_lm_1500_clip_choice_*.json` "
        "(its choice stage, same length), same recipe at half the steps (growth at step 500, ramp 180).\n\n"
        + horizon_table(pilot)
        + "\n"
        f"Stop rule (pilot): {stop_rule(pilot)}.\n\n"
        f"Success (issue-14 target, reach-ratio <= {TARGET}x on each of seeds 27, 28, 29): "
        f"{success(confirm, PHASES[1][1])}.\n\n"
        "## Fixed-model frontier: fixed 4 blocks on the same schedule (confirmation seeds, information)\n\n"
        + frontier_table("growth_lm_3000_confirm_*s*.json")
    )
    (RESULTS / "growth_lm_3000.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
