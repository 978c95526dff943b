"""Tabulates the clipped LM growth recipe at three training horizons: ``benchmarks/results/growth_lm_horizon.md``.

    python benchmarks/growth_lm_horizon_report.py

Reads the result files of three declared studies of the same recipe (ramped G_stack 2 -> 6 at 1/3, cosine restarted
at the growth step, gradient norm clipped at 1.0, lr 1e-2; the reference is the fixed 6-block model with the same
restarted schedule): 750 steps (``growth_lm_750_protocol.md``), 1,500 steps (``growth_lm_1500_clip_protocol.md``)
and 3,000 steps (``growth_lm_3000_protocol.md``). Per horizon, phase and seed: both final losses, their paired
difference, and the reach-ratio (the grown run's FLOPs at its first validation whose loss is <= the reference's
final loss, over the reference's full run) on the run's own validation grid, on the 50-step grid (the rows at
multiples of 50 steps and the last), and interpolated between validations (information). No training.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.growth_lm_3000_report import first_reach, interpolated_reach
from benchmarks.growth_lm_short_report import RESULTS, by_seed

REFERENCE, GROWN, TARGET, GRID = "fixed_final_growth_lr", "stack_ramp", 0.65, 50
#: (horizon in steps, phase, fresh seeds?, file prefix: ``<prefix>_ref_s<seed>.json`` and ``<prefix>_s<seed>.json``)
STUDIES = [
    (750, "pilot (seeds 12-14, information)", False, "growth_lm_750_pilot"),
    (750, "confirmation, 50-step grid (fresh)", True, "growth_lm_750_confirm"),
    (750, "second test, 10-step grid (fresh)", True, "growth_lm_750_grid10"),
    (750, "grown on its own 600 steps, pilot (information)", False, "growth_lm_750_own_pilot"),
    (750, "grown on its own 600 steps (fresh)", True, "growth_lm_750_own_confirm"),
    (1500, "choice (seeds 12-14)", False, "growth_lm_1500_clip_choice"),
    (1500, "confirmation (fresh)", True, "growth_lm_1500_clip_confirm"),
    (3000, "pilot (seeds 12-14, information)", False, "growth_lm_3000_pilot"),
    (3000, "confirmation (fresh)", True, "growth_lm_3000_confirm"),
]


def on_grid(curve: list[dict[str, Any]], grid: int) -> list[dict[str, Any]]:
    """The validation rows at multiples of ``grid`` steps, and the last row (the end of training)."""
    return [row for i, row in enumerate(curve) if row["step"] % grid == 0 or i == len(curve) - 1]


def seed_figures(ref: dict[str, Any], grown: dict[str, Any]) -> dict[str, Any]:
    """One seed's figures (reach-ratios ``None`` where the grown run never reaches the reference's final loss)."""
    target, full = ref["val_loss"], ref["flops"]

    def ratio(row: dict[str, Any] | None) -> float | None:
        return None if row is None else row["flops"] / full

    interpolated = interpolated_reach(grown["curve"], target)
    return {
        "seed": ref["seed"],
        "ref": target,
        "grown": grown["val_loss"],
        "diff": grown["val_loss"] - target,
        "total": grown["flops"] / full,
        "grid": grown["curve"][1]["step"] - grown["curve"][0]["step"],
        "reach": ratio(first_reach(grown["curve"], target)),
        "reach50": ratio(first_reach(on_grid(grown["curve"], GRID), target)),
        "interpolated": None if interpolated is None else interpolated / full,
    }


#: (horizon, result files holding fixed models at or below the grown run's compute, run on the confirmation seeds)
FRONTIER = [(750, "growth_lm_750_confirm_frontier_s*.json"), (3000, "growth_lm_3000_confirm_fixed4_s*.json")]
FIXED = {"fixed_4_growth_lr": "fixed 4 blocks, restarted schedule", "fixed_final_equal": "fixed 6 at the grown FLOPs"}


def frontier_rows(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per horizon, seed and fixed model of the frontier files: its final loss, FLOPs over the reference's, and the
    grown run's final loss minus it (the grown run from :func:`rows`)."""
    grown = {(r["steps"], r["seed"]): r for r in table if r["fresh"]}
    out = []
    for steps, pattern in FRONTIER:
        refs = by_seed([pattern])
        for variant, label in FIXED.items():
            for seed, run in sorted(by_seed([pattern], variant).items()):
                ref = refs[seed]
                if (steps, seed) in grown:
                    out.append(
                        {
                            "steps": steps,
                            "seed": seed,
                            "fixed": label,
                            "loss": run["val_loss"],
                            "flops": run["flops"] / ref["flops"],
                            "grown_minus": grown[(steps, seed)]["grown"] - run["val_loss"],
                        }
                    )
    return out


def rows() -> list[dict[str, Any]]:
    """Every finished seed of every study, in the order of :data:`STUDIES`."""
    out = []
    for steps, phase, fresh, prefix in STUDIES:
        # the reference's own file, or the grown run's file that took it with --reuse
        refs = by_seed([f"{prefix}_ref_s*.json", f"{prefix}_s*.json"])
        grown = by_seed([f"{prefix}_s*.json"], GROWN)
        for seed in sorted(set(refs) & set(grown)):
            out.append({"steps": steps, "phase": phase, "fresh": fresh, **seed_figures(refs[seed], grown[seed])})
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "never" if value is None else f"{value:.{digits}f}"


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else "-"


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "# LM growth at three training horizons (clipped recipe)",
        "",
        "Ramped G_stack 2 -> 6 blocks after a third of the steps, cosine restarted at the growth step, gradient norm "
        "clipped at 1.0, lr 1e-2, total FLOPs 0.792x the reference's (0.633x on its own 600-step schedule); "
        "reference: the fixed 6-block model with the same restarted schedule. Protocols: `growth_lm_750_protocol.md`, "
        "`growth_lm_750_own_protocol.md`, `growth_lm_1500_clip_protocol.md`, `growth_lm_3000_protocol.md`. "
        "Reach-ratio: the grown run's FLOPs at its first validation whose loss is <= the reference's final loss, "
        "over the reference's full run (target <= 0.65x on every fresh seed). Generated by "
        "`benchmarks/growth_lm_horizon_report.py`.",
        "",
        "| steps | phase | seed | reference final loss | grown final loss | grown minus reference | grown FLOPs / "
        "reference | validation grid (steps) | reach-ratio | on the 50-step grid | interpolated (information) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['steps']} | {r['phase']} | {r['seed']} | {r['ref']:.4f} | {r['grown']:.4f} | {r['diff']:+.4f} | "
            f"{r['total']:.3f} | {r['grid']} | {_fmt(r['reach'])} | {_fmt(r['reach50'])} | {_fmt(r['interpolated'])} |"
        )
    lines += ["", "## Each declared test on fresh seeds", ""]
    lines += [
        "| steps | test | fresh seeds | grown minus reference (mean ± std) | reach-ratios | <= 0.65x |",
        "|---|---|---|---|---|---|",
    ]
    for steps, phase, fresh_seeds, _ in STUDIES:
        fresh = [r for r in table if (r["steps"], r["phase"]) == (steps, phase)]
        if not fresh_seeds or not fresh:
            continue
        lines.append(f"| {steps} | {phase} | {cells_of_test(fresh)}")
    lines += frontier_markdown(frontier_rows(table))
    return "\n".join(lines) + "\n"


def cells_of_test(group: list[dict[str, Any]]) -> str:
    """One declared test's table cells from its seeds' rows (``seed``, ``diff``, ``reach``): the seeds, the grown
    minus reference difference (mean ± std), the reach-ratios, and how many are <= the target."""
    met = sum(r["reach"] is not None and r["reach"] <= TARGET for r in group)
    return (
        f"{', '.join(str(r['seed']) for r in group)} | {_mean_std([r['diff'] for r in group])} | "
        f"{', '.join(_fmt(r['reach']) for r in group)} | {met} of {len(group)} |"
    )


def frontier_markdown(frontier: list[dict[str, Any]]) -> list[str]:
    """The frontier section's lines (none without rows): per horizon, seed and fixed model its final loss, FLOPs over
    the reference's and the grown run's final loss minus it."""
    if not frontier:
        return []
    lines = ["", "## The fixed-model frontier (information, confirmation seeds)", ""]
    lines += [
        "| steps | seed | fixed model | final loss | FLOPs / reference | grown minus it |",
        "|---|---|---|---|---|---|",
    ]
    for f in frontier:
        lines.append(
            f"| {f['steps']} | {f['seed']} | {f['fixed']} | {f['loss']:.4f} | {f['flops']:.3f} | "
            f"{f['grown_minus']:+.4f} |"
        )
    return lines


def main() -> str:
    text = markdown(rows())
    (RESULTS / "growth_lm_horizon.md").write_text(text)
    return text


if __name__ == "__main__":
    print(main())
