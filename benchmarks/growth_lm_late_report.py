"""Tabulates the declared tests of growing later (750 steps, and the choice at 1,500 steps):
``benchmarks/results/growth_lm_late.md`` and ``growth_lm_late.json`` (see ``growth_lm_750_late_protocol.md``).

    python benchmarks/growth_lm_late_report.py

Reads the result files ``growth_lm_<steps>_late_<phase>_<run>_s<seed>.json`` (one run each; no training). Per
horizon, phase and seed, the strict reference is the lowest final validation loss among that seed's fixed 6-block
runs (plain cosine, and the cosine restarted at 1/3 and at each growth fraction of the phase). Per grown run (ramped
G_stack 2 -> 6 after a fraction ``f`` of the steps): its final loss minus the strict reference's, its total FLOPs
over the reference's, and the reach-ratio (its FLOPs at its first validation whose loss is <= the reference's final
loss, over the reference's full run), against the strict reference and against each fixed 6-block run. The pilot's
choice of ``f`` follows the protocol's rule (the lowest worst-seed reach-ratio, ties by the mean); a test's success
is a reach-ratio <= 0.65x on every fresh seed. The frontier rows (information) compare the grown run with the fixed
models at or below its compute.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.growth_lm_3000_report import first_reach, interpolated_reach
from benchmarks.growth_lm_horizon_report import TARGET, _fmt, cells_of_test, frontier_markdown
from benchmarks.growth_lm_short_report import RESULTS

OUT = "growth_lm_late"
#: (horizon in steps, phase, label), in the order of the tables.
PHASES = (
    (750, "pilot", "pilot (seeds 12-14, chooses f)"),
    (750, "confirm", "confirmation (fresh)"),
    (1500, "confirm", "second test, 1,500 steps (fresh)"),
    (3000, "confirm", "third test, 3,000 steps (fresh)"),
)
#: The fixed 6-block runs (the candidates for the strict reference) and the fixed models of the frontier.
FIXED6 = re.compile(r"^(fixed_6|fixed_final_growth_lr_at[0-9.]+)$")
FRONTIER = re.compile(r"^(fixed_2|fixed_4|fixed_4_growth_lr_at[0-9.]+|fixed_final_equal_at[0-9.]+)$")
#: The information runs of the reference's peak LR (amendments 4, 5): not candidates for the strict reference.
LRCHECK = re.compile(r"^fixed_final_growth_lr_lr(?P<lr>[0-9.]+)_at(?P<f>[0-9.]+)$")
NAME = re.compile(r"^growth_lm_(?P<steps>\d+)_late_(?P<phase>[a-z]+)_(?P<run>.+)_s(?P<seed>\d+)\.json$")


Key = tuple[int, str, int]  # (steps, phase, seed)


def load_runs(results: Path = RESULTS) -> dict[Key, dict[str, dict[str, Any]]]:
    """Every finished run, by (steps, phase, seed) and run tag (``fixed_6``, ``stack_ramp_at0.50``, ...)."""
    out: dict[Key, dict[str, dict[str, Any]]] = {}
    for path in sorted(results.glob("growth_lm_*_late_*_s*.json")):
        match = NAME.match(path.name)
        if match is None:
            continue
        record = json.loads(path.read_text())
        for variant_runs in record["runs"].values():
            for run in variant_runs:
                if run["seed"] == int(match["seed"]) and run.get("curve"):
                    key = (int(match["steps"]), match["phase"], int(match["seed"]))
                    out.setdefault(key, {})[match["run"]] = run
    return out


def grown_rows(runs: dict[Key, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per grown run: final losses, difference and reach-ratios against the strict and each reference."""
    rows = []
    for (steps, phase, seed), by_tag in sorted(runs.items()):
        refs = {tag: run for tag, run in by_tag.items() if FIXED6.match(tag)}
        if not refs:
            continue
        strict_tag = min(refs, key=lambda tag: refs[tag]["val_loss"])
        strict = refs[strict_tag]
        for tag, run in sorted(by_tag.items()):
            if not tag.startswith("stack_ramp_at"):
                continue
            full = strict["flops"]
            reach = first_reach(run["curve"], strict["val_loss"])
            interpolated = interpolated_reach(run["curve"], strict["val_loss"])
            by_ref = {}
            for ref_tag, ref in sorted(refs.items()):
                row = first_reach(run["curve"], ref["val_loss"])
                by_ref[ref_tag] = None if row is None else row["flops"] / ref["flops"]
            rows.append(
                {
                    "steps": steps,
                    "phase": phase,
                    "seed": seed,
                    "f": float(tag.removeprefix("stack_ramp_at")),
                    "reference": strict_tag,
                    "reference_loss": strict["val_loss"],
                    "grown_loss": run["val_loss"],
                    "diff": run["val_loss"] - strict["val_loss"],
                    "total": run["flops"] / full,
                    "reach": None if reach is None else reach["flops"] / full,
                    "reach_step": None if reach is None else reach["step"],
                    "interpolated": None if interpolated is None else interpolated / full,
                    "reach_by_reference": by_ref,
                    "references": {t: r["val_loss"] for t, r in sorted(refs.items())},
                }
            )
    return rows


def choose_f(rows: list[dict[str, Any]]) -> float | None:
    """The protocol's choice from the 750-step pilot rows: the lowest worst-seed reach-ratio ("never" = infinite),
    ties by the lower mean; ``None`` without pilot rows."""
    by_f: dict[float, list[float]] = {}
    for row in rows:
        if (row["steps"], row["phase"]) == (750, "pilot"):
            by_f.setdefault(row["f"], []).append(math.inf if row["reach"] is None else row["reach"])
    if not by_f:
        return None
    return min(by_f, key=lambda f: (max(by_f[f]), statistics.mean(by_f[f])))


def frontier_rows(runs: dict[Key, dict[str, dict[str, Any]]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per confirmation seed and fixed model of the frontier: its final loss, FLOPs over the strict reference's and
    the grown run's final loss minus it."""
    grown = {(r["steps"], r["seed"], r["f"]): r for r in rows if r["phase"] == "confirm"}
    out = []
    for (steps, phase, seed), by_tag in sorted(runs.items()):
        if phase != "confirm":
            continue
        for tag, run in sorted(by_tag.items()):
            if not FRONTIER.match(tag):
                continue
            f = float(tag.rsplit("_at", 1)[1]) if "_at" in tag else None
            candidates = [r for (n, s, g), r in grown.items() if (n, s) == (steps, seed) and f in (None, g)]
            if not candidates:
                continue
            row = candidates[0]
            full = by_tag[row["reference"]]["flops"]
            out.append(
                {
                    "steps": steps,
                    "seed": seed,
                    "fixed": tag,
                    "loss": run["val_loss"],
                    "flops": run["flops"] / full,
                    "grown_minus": row["grown_loss"] - run["val_loss"],
                }
            )
    return out


def lr_check_rows(runs: dict[Key, dict[str, dict[str, Any]]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per confirmation seed and reference run with another peak LR (amendments 4 and 5, information): its final
    loss, the strict reference's, and the grown run's reach-ratio against it (``None``: never reached)."""
    grown = {(r["steps"], r["seed"], r["f"]): r for r in rows if r["phase"] == "confirm"}
    out = []
    for (steps, phase, seed), by_tag in sorted(runs.items()):
        for tag, run in sorted(by_tag.items()):
            match = LRCHECK.match(tag)
            row = grown.get((steps, seed, float(match["f"]))) if match and phase == "confirm" else None
            if row is None:
                continue
            grown_run = by_tag[f"stack_ramp_at{match['f']}"]
            reach = first_reach(grown_run["curve"], run["val_loss"])
            out.append(
                {
                    "steps": steps,
                    "seed": seed,
                    "lr": float(match["lr"]),
                    "loss": run["val_loss"],
                    "strict_reference_loss": row["reference_loss"],
                    "reach": None if reach is None else reach["flops"] / run["flops"],
                }
            )
    return out


def markdown(
    rows: list[dict[str, Any]],
    frontier: list[dict[str, Any]],
    chosen: float | None,
    lr_check: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "# LM growth, growing later (declared tests at 750, 1,500 and 3,000 steps)",
        "",
        "Ramped G_stack 2 -> 6 blocks after a fraction `f` of the steps (ramp over 12% of them, cosine restarted at "
        "the growth step with a 30-step re-warm), gradient norm clipped at 1.0, lr 1e-2, validation every 10 steps. "
        "Strict reference per seed: the lowest final loss of that seed's fixed 6-block runs (plain cosine, restarted "
        "at 1/3, restarted at each `f` of the phase). Reach-ratio: the grown run's FLOPs at its first validation whose "
        "loss is <= the reference's final loss, over the reference's full run (target <= 0.65x on every fresh seed). "
        "Protocol: `growth_lm_750_late_protocol.md`. Generated by `benchmarks/growth_lm_late_report.py`.",
        "",
        "| steps | phase | seed | f | strict reference | its final loss | grown final loss | grown minus it | "
        "grown FLOPs / reference | reach-ratio | reached at step | interpolated (information) | "
        "reach-ratio against each fixed 6-block run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(f"{t}: {_fmt(v)}" for t, v in r["reach_by_reference"].items())
        lines.append(
            f"| {r['steps']} | {r['phase']} | {r['seed']} | {r['f']:.2f} | {r['reference']} | "
            f"{r['reference_loss']:.4f} | {r['grown_loss']:.4f} | {r['diff']:+.4f} | {r['total']:.3f} | "
            f"{_fmt(r['reach'])} | "
            f"{r['reach_step'] if r['reach_step'] is not None else '-'} | {_fmt(r['interpolated'])} | {each} |"
        )
    lines += ["", "## Per test and f", ""]
    lines += [
        "| steps | test | f | seeds | grown minus strict reference (mean ± std) | reach-ratios | <= 0.65x |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps, phase, label in PHASES:
        for f in sorted({r["f"] for r in rows if (r["steps"], r["phase"]) == (steps, phase)}):
            group = [r for r in rows if (r["steps"], r["phase"], r["f"]) == (steps, phase, f)]
            lines.append(f"| {steps} | {label} | {f:.2f} | {cells_of_test(group)}")
    if chosen is not None:
        lines += ["", f"Pilot choice by the protocol's rule: **f = {chosen:.2f}**."]
    lines += frontier_markdown(frontier)
    if lr_check:
        lines += ["", "## The reference's peak LR (information, amendments 4 and 5)", ""]
        lines += [
            "| steps | seed | reference restarted at f, peak LR | its final loss | strict reference (LR 1e-2) | "
            "grown reach-ratio against it |",
            "|---|---|---|---|---|---|",
        ]
        for r in lr_check:
            lines.append(
                f"| {r['steps']} | {r['seed']} | {r['lr']:g} | {r['loss']:.4f} | {r['strict_reference_loss']:.4f} | "
                f"{_fmt(r['reach'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> str:
    runs = load_runs()
    rows = grown_rows(runs)
    chosen = choose_f(rows)
    frontier = frontier_rows(runs, rows)
    lr_check = lr_check_rows(runs, rows)
    text = markdown(rows, frontier, chosen, lr_check)
    (RESULTS / f"{OUT}.md").write_text(text)
    summary = {"target": TARGET, "pilot_choice": chosen, "grown": rows, "frontier": frontier, "lr_check": lr_check}
    (RESULTS / f"{OUT}.json").write_text(json.dumps(summary, indent=2))
    return text


if __name__ == "__main__":
    print(main())
