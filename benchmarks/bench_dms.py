"""Benchmark: Differentiable Model Scaling on MNIST-1D against a uniformly narrowed model and Torch-Pruning.

All variants train the same tiny timm ViT family (supernet: 4 blocks, width 64, 4 heads, MLP 128) on the
same data in the same order (per seed), for the same number of epochs:

- ``full``: the supernet.
- ``uniform``: a ViT of the supernet's depth and heads, embed width and MLP width narrowed uniformly to
  the target FLOPs (the hand-scaled model of equal FLOPs), trained from scratch.
- ``dms_b`` (pipeline b, "search while training, export, continue"): DMS searches for ``search_epochs``
  epochs, exports (sliced weights and optimizer state) and trains on.
- ``dms_a`` (pipeline a, "search, export, train from scratch"): the architecture ``dms_b``'s search
  found (:func:`~lightning_depthgrow.dms.export_architecture`), rebuilt from a freshly initialised
  supernet (:func:`~lightning_depthgrow.dms.build_architecture`) and trained for the full epochs. Its search
  is the first ``search_epochs`` epochs of ``dms_b``'s run; its cost is reported as a fraction of the total.
- ``torch_pruning``: the supernet trained for ``search_epochs`` epochs, then pruned by Torch-Pruning
  (``GroupTaylorImportance``, its timm-ViT recipe: embed width, MLP units and head dims) to the target
  FLOPs, at the same point in training as DMS's export, and trained on (fresh AdamW moments, as
  Torch-Pruning leaves the optimizer to the user; the LR schedule continues where it was).

FLOPs are counted by torch's ``FlopCounterMode`` (``lightning_depthgrow.measure.count_flops``). Parts:
``overhead`` (search step / plain step), ``main`` (all variants at each target), ``levers`` (dynamics
choices of the search, pipelines a and b at the first target). Each part updates its own key of the JSON.

    python benchmarks/bench_dms.py --part main --epochs 10 --search-epochs 3 --targets 0.5 0.3

``step-cost`` (search step / plain step inside ``Trainer.fit``, both supernets, lockstep; its own JSON
``dms_step_cost.json`` and section of ``dms.md``; ``--before`` an earlier source tree to compare with):

    python benchmarks/bench_dms.py --part step-cost --repeats 4 --epochs 3 --batches 32 --batches-large 10 \
        --before /tmp/before  # git archive <commit> | tar -x -C /tmp/before

``epoch-cost`` (the main part's search epochs / plain epochs inside ``Trainer.fit``, whole epochs with validation,
paired in lockstep per seed and target; key ``epoch_cost`` of the JSON):

    python benchmarks/bench_dms.py --part epoch-cost --epochs 8 --search-epochs 2 --targets 0.5 0.3 --seeds 5 6 7 8 9

The main part's validation: MNIST-1D's 1,000 test signals after every epoch by default; ``--val-extra 5000`` adds
signals of a second MNIST-1D draw (less evaluation noise in paired differences), ``--val-last-only`` validates
after the last epoch only. Runs split over processes (one ``--out`` each) are merged with
``--part report --out a.json --merge b.json``.

Writes ``benchmarks/results/dms.json`` and ``benchmarks/results/dms.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

# the step-cost part runs the "before" variant with another source tree (DMS_BENCH_TREE) in a child process
sys.path.insert(0, os.environ.get("DMS_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule, make_vit, mnist1d_tensors, quiet_trainer
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import (
    ResourceModel,
    attach_gates,
    build_architecture,
    export_architecture,
    update_importance,
)
from lightning_depthgrow.measure import count_flops

SUPERNET = {"depth": 4, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2.0}
LARGE_SUPERNET = {"depth": 6, "embed_dim": 192, "num_heads": 3, "mlp_ratio": 4.0}  # DeiT-T width, 6 blocks
EXAMPLE = torch.zeros(2, 1, 1, 40)
# dynamics choices of the search, each against the defaults (arch_lr 0.01, width-only last 20%, the main part's
# search length), which the main part measures
LEVERS = {
    "search_4_epochs": {"search_epochs": 4},
    "arch_lr_0.03": {"arch_lr": 0.03},
    "no_width_only_phase": {"schedule_fraction": 1.0},
}


# ----------------------------------------------------------------------------------------- overhead
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


def step_overhead(supernet: dict[str, Any], steps: int = 10, repeats: int = 8) -> dict[str, Any]:
    """Seconds per step of plain vs DMS-search training of the same supernet on one batch of 128.

    Same weights and batch; warm-up, then ``repeats`` blocks of ``steps`` steps in ABBA order. The headline
    ``ratio`` is the median of the back-to-back search/plain ratios (load on a shared machine comes in phases).
    """
    x, y, _, _ = mnist1d_tensors()
    x, y = x[:128], y[:128]
    fns = {}
    for name in ("plain", "search"):
        torch.manual_seed(0)
        fns[name] = _search_step(make_vit(**supernet), x, y, search=name == "search")
        for _ in range(5):
            fns[name]()
    times: dict[str, list[float]] = {"plain": [], "search": []}
    for r in range(repeats):
        for name in ("plain", "search") if r % 2 == 0 else ("search", "plain"):
            start = time.perf_counter()
            for _ in range(steps):
                fns[name]()
            times[name].append((time.perf_counter() - start) / steps)
    plain, search = statistics.median(times["plain"]), statistics.median(times["search"])
    return {
        "supernet": supernet,
        "plain_step_s": plain,
        "search_step_s": search,
        "ratio": statistics.median(s / p for s, p in zip(times["search"], times["plain"])),
        "ratio_of_minima": min(times["search"]) / min(times["plain"]),
    }


# ----------------------------------------------------------------------------------------- step cost in Lightning
class Lockstep:
    """Two fits, each in its own thread, taking turns one training step at a time: only one thread runs at any
    moment, and each step's CPU time (``time.thread_time``) is taken from before every callback's
    ``on_train_batch_start`` to after every ``on_train_batch_end`` (data loading is outside), so the two fits'
    steps alternate under the same load on a shared machine and pair up step by step.
    """

    def __init__(self, names: list[str], epochs: range) -> None:
        self.names, self.epochs = names, epochs
        self.seconds: dict[str, list[tuple[int, float]]] = {n: [] for n in names}  # (epoch, seconds) per step
        self._cond = threading.Condition()
        self._turn = names[0]
        self._ready: set[str] = set()
        self._done: set[str] = set()

    def measuring(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch in self.epochs

    def _wait_turn(self, name: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == name)

    def _pass_turn(self, name: str, done: bool = False) -> None:
        with self._cond:
            if done:
                self._done.add(name)
            waiting = [n for n in self.names if n != name and n not in self._done]
            self._turn = waiting[0] if waiting else name
            self._cond.notify_all()

    def run(self, fits: dict[str, tuple[pl.Trainer, pl.LightningModule]], data: Callable[[], Any]) -> None:
        """Fit every ``(trainer, module)`` of ``fits`` in its own thread on ``data()`` (called in that thread);
        the first error of any fit is re-raised here once all threads ended."""
        errors: list[BaseException] = []

        def fit(name: str) -> None:
            try:
                trainer, model = fits[name]
                trainer.fit(model, data())
            except BaseException as err:  # re-raised in the calling thread
                errors.append(err)

        threads = [threading.Thread(target=fit, args=(name,)) for name in self.names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def callbacks(self, name: str, profiler: Any = None) -> tuple[Callback, Callback]:
        """``(first, last)``: to go first and last in the fit's callback list."""
        clock, start = self, [0.0]

        class First(Callback):
            def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                with clock._cond:  # both fits set up (DMS counts FLOPs there) before either trains
                    clock._ready.add(name)
                    clock._cond.notify_all()
                    clock._cond.wait_for(lambda: len(clock._ready) == len(clock.names))
                clock._wait_turn(name)

            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                if profiler is not None and clock.measuring(trainer):
                    profiler.enable()
                start[0] = time.thread_time()

            def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                clock._pass_turn(name, done=True)

            def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, err: BaseException) -> None:
                with clock._cond:
                    clock._ready.add(name)
                clock._pass_turn(name, done=True)

        class Last(Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
                clock.seconds[name].append((trainer.current_epoch, time.thread_time() - start[0]))
                if profiler is not None:
                    profiler.disable()
                clock._pass_turn(name)
                clock._wait_turn(name)

        return First(), Last()


DMS_STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end")


def _time_hooks(callback: Callback, measuring: Callable[[pl.Trainer], bool]) -> dict[str, float]:
    """Wrap the callback's per-step hooks (instance attributes, which Lightning calls) to sum their CPU seconds
    (of the calling thread) over the measured epochs; returns the running sums."""
    spent = dict.fromkeys(DMS_STEP_HOOKS, 0.0)

    def timed(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def call(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return hook(trainer, *args, **kwargs)
            finally:
                if measuring(trainer):
                    spent[name] += time.thread_time() - start

        return call

    for name in DMS_STEP_HOOKS:
        setattr(callback, name, timed(name, getattr(callback, name)))
    return spent


def step_cost_pair(epochs: int, batches: int, supernet: dict[str, Any], profile: Path | None = None) -> dict[str, Any]:
    """One plain fit and one DMS search of the same supernet (same weights, data and order), in lockstep
    (:class:`Lockstep`); per fit the median CPU seconds of a step over the search epochs after the first, for DMS
    its callback's own per-step hooks' seconds per step, and the median of the step-by-step DMS / plain ratios.
    ``profile``: cProfile the DMS fit's measured steps into this file."""
    lockstep = Lockstep(["plain", "dms"], range(1, epochs - 1))
    dms = DifferentiableModelScaling(target=0.5, search_epochs=epochs - 1)
    spent = _time_hooks(dms, lockstep.measuring)
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
    data = MNIST1DDataModule(batch_size=128, seed=0)
    fits = {}
    for name in lockstep.names:
        pl.seed_everything(0, verbose=False)  # the same initial weights
        first, last = lockstep.callbacks(name, profiler if name == "dms" else None)
        trainer = quiet_trainer(
            epochs,
            [first, *([dms] if name == "dms" else []), last],
            limit_train_batches=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        fits[name] = (trainer, Classifier(make_vit(**supernet)))
    lockstep.run(fits, lambda: copy.deepcopy(data))
    if profiler is not None:
        profiler.dump_stats(str(profile))
    measured = {n: [t for epoch, t in lockstep.seconds[n] if epoch in lockstep.epochs] for n in lockstep.names}
    out: dict[str, Any] = {n: {"step_s": statistics.median(measured[n])} for n in lockstep.names}
    hooks = {name: t / len(measured["dms"]) for name, t in spent.items()}
    out["dms"].update(hooks_s=sum(hooks.values()), **hooks)
    out["paired_ratio_median"] = statistics.median(d / p for d, p in zip(measured["dms"], measured["plain"]))
    out["steps"] = len(measured["dms"])
    return out


SUPERNETS = {"tiny": SUPERNET, "large": LARGE_SUPERNET}


def step_cost_part(
    repeats: int, epochs: int, batches: dict[str, int], before: Path | None, threads: int
) -> dict[str, Any]:
    """CPU seconds per training step inside ``Trainer.fit``: plain vs DMS, for each supernet in ``batches`` (its
    training steps per epoch), with this tree and with the ``before`` tree.

    Each (repeat, supernet, tree) runs one child process that trains the plain supernet and the DMS search on it
    in lockstep (:func:`step_cost_pair`: two threads taking turns one step at a time, so the two see the same
    load on a shared machine); supernets and trees are interleaved within a repeat, their order rotated. Both
    fits train the same supernet (same seed, data and order); the search runs ``epochs`` - 1 epochs (export at
    the last), and the steps of epochs 1 .. ``epochs`` - 2 (the search epochs after the first) are measured.
    Per child: the median of the step-by-step DMS / plain ratios (the headline), the medians of each fit's
    steps, and the DMS callback's own per-step hook time. ``before`` is another source tree of the package
    (e.g. ``git archive main | tar -x -C /tmp/main``), run with this benchmark code.
    """
    here = str(Path(__file__).resolve().parents[1])
    trees = {"dms": here, **({"dms_before": str(before.resolve())} if before is not None else {})}
    names = list(trees)
    nets = list(batches)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {net: {name: [] for name in names} for net in nets}
    for r in range(repeats):
        for k, net in enumerate(nets[r % len(nets) :] + nets[: r % len(nets)]):
            for name in names[(r + k) % len(names) :] + names[: (r + k) % len(names)]:
                env = {**os.environ, "DMS_BENCH_TREE": trees[name], "PYTHONPATH": trees[name], "OMP_NUM_THREADS": "1"}
                args = [sys.executable, __file__, "--part", "step-cost-one", "--supernet", net]
                args += ["--epochs", str(epochs), "--batches", str(batches[net]), "--threads", str(threads)]
                done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                runs[net][name].append(figures)
                print(
                    f"repeat {r} {net} {name}: DMS / plain {figures['paired_ratio_median']:.3f} (step medians "
                    f"{1e3 * figures['dms']['step_s']:.1f} / {1e3 * figures['plain']['step_s']:.1f} ms, DMS hooks "
                    f"{1e3 * figures['dms']['hooks_s']:.2f} ms)",
                    flush=True,
                )
    out: dict[str, Any] = {}
    for net in nets:
        out[net] = {
            "supernet": SUPERNETS[net],
            "batch_size": 128,
            "repeats": repeats,
            "epochs": epochs,
            "batches_per_epoch": batches[net],
            "measured_epochs": list(range(1, epochs - 1)),
            "trees": trees,
            "runs": runs[net],
            **{f"{name}_over_plain": step_cost_ratios(runs[net][name]) for name in names},
        }
    return out


def step_cost_ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the repeats of one tree: the step-by-step DMS / plain medians (mean ± std, median), the ratio of the
    fits' step medians, the ratio of the fastest repeats' step medians (load only ever adds time), the hooks."""
    paired = [r["paired_ratio_median"] for r in runs]
    plain, dms = [r["plain"]["step_s"] for r in runs], [r["dms"]["step_s"] for r in runs]
    return {
        "paired_per_repeat": paired,
        "paired_mean_std": _mean_std(paired),
        "paired_median": statistics.median(paired),
        "ratio_of_step_medians": _mean_std([d / p for d, p in zip(dms, plain)]),
        "ratio_of_minima": min(dms) / min(plain),
        "plain_step_ms": 1e3 * statistics.median(plain),
        "dms_step_ms": 1e3 * statistics.median(dms),
        "hooks_ms": _mean_std([1e3 * r["dms"]["hooks_s"] for r in runs]),
        "hooks_ms_by_hook": {h: statistics.fmean(1e3 * r["dms"][h] for r in runs) for h in DMS_STEP_HOOKS},
    }


STEP_COST_HEADING = "## Search step / plain step inside Lightning (CPU time, same process)"


def step_cost_markdown(cost: dict[str, Any]) -> str:
    """The step-cost section of ``dms.md`` from ``dms_step_cost.json``."""
    lines = [
        STEP_COST_HEADING,
        "",
        "From `python benchmarks/bench_dms.py --part step-cost` (`dms_step_cost.json`): per repeat, one process "
        "trains the plain supernet and the DMS search on it in lockstep (two threads taking turns one training step "
        "at a time, so both see the same load); CPU time of each step from the first batch hook to the last, over "
        "the search epochs after the first. Headline: the median of the step-by-step DMS / plain ratios, mean ± "
        "std over repeats. `dms`: this tree; `dms_before`: the `--before` source tree. Target: <= 1.15.",
        "",
        "| supernet | tree | plain ms/step | DMS ms/step | DMS hooks ms/step | DMS / plain, paired (mean ± std) "
        "| median | ratio of fastest | repeats |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for net in [n for n in SUPERNETS if n in cost]:
        c = cost[net]
        for name in c["trees"]:
            r = c[f"{name}_over_plain"]
            lines.append(
                f"| {net} {c['supernet']} | {name} | {r['plain_step_ms']:.1f} | {r['dms_step_ms']:.1f} "
                f"| {r['hooks_ms'][0]:.2f} ± {r['hooks_ms'][1]:.2f} | {r['paired_mean_std'][0]:.3f} ± "
                f"{r['paired_mean_std'][1]:.3f} | {r['paired_median']:.3f} | {r['ratio_of_minima']:.3f} "
                f"| {len(r['paired_per_repeat'])} |"
            )
    trees = {name: path for net in SUPERNETS if net in cost for name, path in cost[net]["trees"].items()}
    lines += ["", "Trees: " + ", ".join(f"`{name}` = `{path}`" for name, path in trees.items())]
    return "\n".join(lines) + "\n"


def write_step_cost_section(md: Path, cost: dict[str, Any]) -> None:
    """Put the step-cost section into ``md`` (replacing an earlier one; after the title if there is none)."""
    text = md.read_text() if md.exists() else "# DMS benchmark (MNIST-1D, tiny timm ViT)\n"
    section = step_cost_markdown(cost)
    if STEP_COST_HEADING in text:
        head, rest = text.split(STEP_COST_HEADING, 1)
        tail = rest[rest.index("\n## ") + 1 :] if "\n## " in rest else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)


# ----------------------------------------------------------------------------------------- search epochs in Lightning
def epoch_cost_pair(target: float, seed: int, epochs: int, search_epochs: int) -> dict[str, Any]:
    """The main part's search epochs against the same epochs of plain training, paired: one process, the plain
    supernet fit and the DMS search (the main part's setup: same seed, weights, data order, ``Classifier`` with
    ``max_epochs=epochs``, validation after every epoch) in lockstep (:class:`Lockstep`, two threads taking turns
    one training step at a time). Per fit the thread CPU time of each search epoch, from the first callback's
    ``on_train_epoch_start`` to the last one's ``on_train_epoch_end``: the steps, data loading and the loop between
    them, validation, every epoch-level hook; split into steps, validation and the rest. DMS's own per-step hooks
    are timed as well. Both fits stop after ``search_epochs + 1`` epochs (the export epoch is not measured).

    The sanity validation is off: Lightning runs it before ``on_train_start``, where the lockstep does not yet hold
    the threads apart. Before 0.6 the DMS setup's FLOP count (``FlopCounterMode``, whose module tracker hooks every
    module globally) was corrupted by a forward pass in the other thread at that moment; ``count_flops`` now tracks
    only the counted model's modules in its own thread, and the setting is kept so the figures stay comparable.
    """
    names = ["plain", "dms"]
    lockstep = Lockstep(names, range(search_epochs))
    dms = DifferentiableModelScaling(target=target, search_epochs=search_epochs)
    spent = _time_hooks(dms, lockstep.measuring)
    epoch_s: dict[str, list[float]] = {n: [] for n in names}
    val_s: dict[str, list[float]] = {n: [] for n in names}

    def clocks(name: str) -> tuple[Callback, Callback]:
        start: dict[str, float] = {}

        class Open(Callback):
            def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                start["epoch"] = time.thread_time()

            def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                start["val"] = time.thread_time()

        class Close(Callback):
            def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                if lockstep.measuring(trainer):
                    val_s[name].append(time.thread_time() - start["val"])

            def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                if lockstep.measuring(trainer):
                    epoch_s[name].append(time.thread_time() - start["epoch"])

        return Open(), Close()

    fits = {}
    for name in names:
        torch.manual_seed(seed)  # as the main part: the same initial weights
        model = Classifier(make_vit(**SUPERNET), max_epochs=epochs)
        first, last = lockstep.callbacks(name)
        open_, close = clocks(name)
        trainer = quiet_trainer(
            search_epochs + 1, [open_, first, *([dms] if name == "dms" else []), last, close], num_sanity_val_steps=0
        )
        fits[name] = (trainer, model)
    pl.seed_everything(seed, verbose=False)
    lockstep.run(fits, lambda: MNIST1DDataModule(batch_size=128, seed=seed))
    steps = {n: [t for epoch, t in lockstep.seconds[n] if epoch in lockstep.epochs] for n in names}
    out: dict[str, Any] = {"target": target, "seed": seed}
    for n in names:
        total, in_steps, in_val = sum(epoch_s[n]), sum(steps[n]), sum(val_s[n])
        out[n] = {
            "epoch_s": epoch_s[n],
            "steps_s": in_steps,
            "val_s": in_val,
            "rest_s": total - in_steps - in_val,
            "step_median_s": statistics.median(steps[n]),
        }
    out["dms"]["hooks_s"] = sum(spent.values())
    out["dms"]["hooks_by_hook_s"] = spent
    out["epoch_ratio"] = sum(epoch_s["dms"]) / sum(epoch_s["plain"])
    out["steps_ratio"] = out["dms"]["steps_s"] / out["plain"]["steps_s"]
    out["paired_step_ratio_median"] = statistics.median(d / p for d, p in zip(steps["dms"], steps["plain"]))
    out["steps"] = len(steps["dms"])
    return out


def epoch_cost_part(targets: list[float], seeds: list[int], epochs: int, search_epochs: int) -> dict[str, Any]:
    """:func:`epoch_cost_pair` for every target and seed (targets interleaved per seed); per target the search /
    plain epoch CPU ratios (mean ± std over seeds) and where the time goes."""
    runs = []
    for seed in seeds:
        for target in targets if seed % 2 == 0 else targets[::-1]:
            r = epoch_cost_pair(target, seed, epochs, search_epochs)
            runs.append(r)
            print(
                f"epoch cost target {target} seed {seed}: epochs {r['epoch_ratio']:.3f}, steps {r['steps_ratio']:.3f} "
                f"(paired step median {r['paired_step_ratio_median']:.3f}); plain/DMS s: steps "
                f"{r['plain']['steps_s']:.2f}/{r['dms']['steps_s']:.2f} val {r['plain']['val_s']:.2f}/"
                f"{r['dms']['val_s']:.2f} rest {r['plain']['rest_s']:.2f}/{r['dms']['rest_s']:.2f}",
                flush=True,
            )
    summary = {}
    for target in targets:
        rows = [r for r in runs if r["target"] == target]
        summary[str(target)] = {
            "epoch_ratio": _mean_std([r["epoch_ratio"] for r in rows]),
            "steps_ratio": _mean_std([r["steps_ratio"] for r in rows]),
            "paired_step_ratio_median": _mean_std([r["paired_step_ratio_median"] for r in rows]),
            **{
                f"{n}_{part}_s_per_epoch": statistics.fmean(r[n][f"{part}_s"] for r in rows) / search_epochs
                for n in ("plain", "dms")
                for part in ("steps", "val", "rest")
            },
            "dms_hooks_ms_per_step": statistics.fmean(1e3 * r["dms"]["hooks_s"] / r["steps"] for r in rows),
            "n": len(rows),
        }
    return {"epochs": epochs, "search_epochs": search_epochs, "runs": runs, "summary": summary}


def epoch_cost_markdown(cost: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Search epochs / plain epochs inside Lightning (CPU time, paired in one process)",
        "",
        "From `python benchmarks/bench_dms.py --part epoch-cost` (key `epoch_cost` of `dms.json`): per seed and "
        "target, one process trains the plain supernet and the DMS search with the main part's setup (Classifier with "
        f"max_epochs={cost['epochs']}, search_epochs={cost['search_epochs']}, validation after every epoch) in "
        "lockstep (two threads taking turns one training step at a time, so both see the same load); thread CPU "
        "time of each search epoch from its first to its last hook, i.e. steps, data loading, validation and "
        "epoch-level hooks. Target: <= 1.15.",
        "",
        "| target | search / plain epochs (mean ± std) | steps only | paired step median | plain s/epoch: steps, "
        "val, rest | DMS s/epoch: steps, val, rest | DMS hooks ms/step | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target, s in cost["summary"].items():
        ratio, steps, paired = s["epoch_ratio"], s["steps_ratio"], s["paired_step_ratio_median"]
        parts = [
            f"{s[f'{n}_steps_s_per_epoch']:.2f}, {s[f'{n}_val_s_per_epoch']:.3f}, {s[f'{n}_rest_s_per_epoch']:.3f}"
            for n in ("plain", "dms")
        ]
        lines.append(
            f"| {target} | {ratio[0]:.3f} ± {ratio[1]:.3f} | {steps[0]:.3f} ± {steps[1]:.3f} "
            f"| {paired[0]:.3f} ± {paired[1]:.3f} | {parts[0]} | {parts[1]} "
            f"| {s['dms_hooks_ms_per_step']:.2f} | {s['n']} |"
        )
    if cost.get("load"):
        lines += ["", f"Machine load during the run: {cost['load']}"]
    return lines


# ----------------------------------------------------------------------------------------- training
class EpochClock(Callback):
    """Process CPU seconds of every training epoch (robust to other jobs on a shared machine)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.process_time() - self._start)


# Data protocol of the main and levers parts (``--val-extra``, ``--val-last-only``): MNIST-1D's 1,000 test
# signals by default, validated after every epoch; ``train_draws``: more MNIST-1D draws (generator seeds) whose
# signals (train and test parts, 5,000 each) are added to the 4,000 training signals (none by default).
VALIDATION: dict[str, Any] = {"extra": 0, "last_only": False, "train_draws": ()}


class BenchData(MNIST1DDataModule):
    """MNIST-1D with ``extra`` more validation signals: the first ``extra`` of a second MNIST-1D draw (generator
    seed 43; the same templates, fresh noise and transforms; 5,000 signals), after the 1,000 test signals. The
    training draws (``train_draws``, neither 42 nor 43) are :class:`MNIST1DDataModule`'s."""

    def __init__(self, extra: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra = extra

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.extra:
            xa, ya, xb, yb = mnist1d_tensors(43)
            x, y = torch.cat([xa, xb])[: self.extra], torch.cat([ya, yb])[: self.extra]
            xv, yv = self.val_set.tensors
            self.val_set = torch.utils.data.TensorDataset(torch.cat([xv, x]), torch.cat([yv, y]))


def fit(model: Classifier, epochs: int, seed: int, callbacks: list[Callback]) -> tuple[float, list[float]]:
    """Train; returns the final validation accuracy and the CPU seconds of each training epoch."""
    clock = EpochClock()
    pl.seed_everything(seed, verbose=False)
    trainer = quiet_trainer(
        epochs, [*callbacks, clock], check_val_every_n_epoch=epochs if VALIDATION["last_only"] else 1
    )
    data = BenchData(VALIDATION["extra"], train_draws=VALIDATION["train_draws"], batch_size=128, seed=seed)
    trainer.fit(model, data)
    return float(trainer.callback_metrics["val_acc"]), clock.seconds


def flops(model: torch.nn.Module) -> int:
    return count_flops(model, EXAMPLE).total


def uniform_vit(target_flops: float, depth: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Hand scaling to ``target_flops``: the supernet's heads and ``depth`` (default: the supernet's), the widest
    embed width (a multiple of the heads) with MLP ratio 2 that fits the budget, then the MLP width that brings
    the FLOPs closest to it (widths narrowed uniformly). The search runs once per budget (cached)."""
    heads, depth = SUPERNET["num_heads"], depth or SUPERNET["depth"]
    if (target_flops, depth) in _UNIFORM:
        config = _UNIFORM[(target_flops, depth)]
        return make_vit(**narrow_config(config)), dict(config)
    base = {**SUPERNET, "depth": depth}
    dim = max(
        d
        for d in range(heads, SUPERNET["embed_dim"] + 1, heads)
        if flops(make_vit(**{**base, "embed_dim": d})) <= target_flops
    )
    best = None
    for hidden in range(dim, 4 * dim + 1):
        config = {**base, "embed_dim": dim, "mlp_ratio": (hidden + 0.5) / dim}
        gap = abs(flops(make_vit(**config)) - target_flops)
        if best is None or gap < best[0]:
            best = (gap, config)
        elif gap > best[0]:
            break
    _UNIFORM[(target_flops, depth)] = {"embed_dim": dim, "mlp_hidden": int(dim * best[1]["mlp_ratio"]), "depth": depth}
    return make_vit(**best[1]), dict(_UNIFORM[(target_flops, depth)])


_UNIFORM: dict[tuple[float, int], dict[str, Any]] = {}


def narrow_config(config: dict[str, Any]) -> dict[str, Any]:
    """``make_vit`` arguments of a :func:`uniform_vit` result (its ``config``)."""
    dim, hidden = config["embed_dim"], config["mlp_hidden"]
    return {**SUPERNET, "depth": config["depth"], "embed_dim": dim, "mlp_ratio": (hidden + 0.5) / dim}


def uniform_depth_width_vit(target_flops: float, full_flops: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Depth and widths scaled by one factor ``f``: FLOPs go about as depth x width^2, so ``f = ratio ** (1/3)``;
    depth ``round(f * depth)``, then the widths that fill the budget (:func:`uniform_vit`)."""
    f = (target_flops / full_flops) ** (1 / 3)
    return uniform_vit(target_flops, max(1, round(f * SUPERNET["depth"])))


class TorchPruningAt(Callback):
    """Torch-Pruning (Taylor importance, its timm ViT recipe) at the start of epoch ``epoch`` to ``target`` FLOPs."""

    def __init__(self, epoch: int, target_flops: float, batches: int = 4) -> None:
        self.epoch, self.target_flops, self.batches = epoch, target_flops, batches
        self.report: dict[str, Any] = {}

    def _pruned(self, net: torch.nn.Module, ratio: float, data: list) -> torch.nn.Module:
        import torch_pruning as tp
        from timm.layers import Attention

        net.zero_grad()
        for x, y in data:  # Taylor importance needs gradients
            F.cross_entropy(net(x), y).backward()
        attentions = [m for m in net.modules() if isinstance(m, Attention)]
        pruner = tp.pruner.MetaPruner(
            net,
            EXAMPLE,
            importance=tp.importance.GroupTaylorImportance(),
            pruning_ratio=ratio,
            ignored_layers=[net.head],
            num_heads={m.qkv: m.num_heads for m in attentions},
        )
        pruner.step()
        for m in attentions:
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
            m.scale = m.head_dim**-0.5
        net.zero_grad(set_to_none=True)
        return net

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        loader = trainer.datamodule.train_dataloader()
        data = [b for _, b in zip(range(self.batches), loader)]
        net = pl_module.model
        before = flops(net)
        lo, hi = 0.0, 0.95  # pruning ratio: bisect on copies for the FLOPs target
        for _ in range(8):
            mid = 0.5 * (lo + hi)
            if flops(self._pruned(copy.deepcopy(net), mid, data)) > self.target_flops:
                lo = mid
            else:
                hi = mid
        candidates = [(abs(flops(self._pruned(copy.deepcopy(net), r, data)) - self.target_flops), r) for r in (lo, hi)]
        ratio = min(candidates)[1]
        pl_module.model = self._pruned(net, ratio, data)
        trainer.strategy.setup_optimizers(trainer)  # fresh AdamW moments; the LR schedule continues
        for config in trainer.lr_scheduler_configs:
            config.scheduler.last_epoch = trainer.global_step - 1
            config.scheduler.step()
        self.report = {"pruning_ratio": ratio, "flops_before": before, "flops_after": flops(pl_module.model)}


def run_dms(seed: int, epochs: int, target: float, full: int, **options: Any) -> dict[str, Any]:
    """Pipeline b, then pipeline a on the architecture its search found."""
    search_epochs = options.pop("search_epochs")
    torch.manual_seed(seed)
    model = Classifier(make_vit(**SUPERNET), max_epochs=epochs)
    dms = DifferentiableModelScaling(target=target, search_epochs=search_epochs, **options)
    acc_b, seconds_b = fit(model, epochs, seed, [dms])
    log = event_log(model)
    export = next(e for e in log if e.kind == "dms_export")
    arch = export_architecture(model, log)
    flops_b = flops(model.model)
    torch.manual_seed(seed + 1000)  # a fresh supernet: new weights, same architecture
    scratch = make_vit(**SUPERNET)
    build_architecture(scratch, arch)
    assert flops(scratch) == flops_b
    acc_a, seconds_a = fit(Classifier(scratch, max_epochs=epochs), epochs, seed, [])
    search_s = sum(seconds_b[:search_epochs])
    return {
        "dms_b": {"acc": acc_b, "flops_ratio": flops_b / full, "seconds": sum(seconds_b), "epoch_seconds": seconds_b},
        "dms_a": {
            "acc": acc_a,
            "flops_ratio": flops_b / full,
            "seconds": search_s + sum(seconds_a),
            "search_fraction": search_s / (search_s + sum(seconds_a)),
        },
        "searched_ratio": export.reason.get("searched_ratio"),
        "architecture": arch["summary"],
        "depth": len(model.model.blocks),
    }


VARIANTS = ("full", "uniform", "uniform_depth_width", "dms", "torch_pruning")


def main_part(
    seeds: list[int],
    epochs: int,
    search_epochs: int,
    targets: list[float],
    variants: list[str],
    dms_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    full_flops = flops(make_vit(**SUPERNET))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        if "full" in variants:
            torch.manual_seed(seed)
            acc, seconds = fit(Classifier(make_vit(**SUPERNET), max_epochs=epochs), epochs, seed, [])
            runs.append(
                {
                    "seed": seed,
                    "target": 1.0,
                    "variant": "full",
                    "acc": acc,
                    "flops_ratio": 1.0,
                    "seconds": sum(seconds),
                }
            )
            print(f"seed {seed} full: {acc:.3f}", flush=True)
        for target in targets:
            row = {"seed": seed, "target": target}
            for variant in ("uniform", "uniform_depth_width"):
                if variant not in variants:
                    continue
                if variant == "uniform":
                    narrow, config = uniform_vit(target * full_flops)
                else:
                    narrow, config = uniform_depth_width_vit(target * full_flops, full_flops)
                torch.manual_seed(seed)  # the weights depend on the seed only (not on the search for the widths)
                narrow = make_vit(**narrow_config(config))
                acc, seconds = fit(Classifier(narrow, max_epochs=epochs), epochs, seed, [])
                runs.append(
                    {
                        **row,
                        "variant": variant,
                        "acc": acc,
                        "flops_ratio": flops(narrow) / full_flops,
                        "seconds": sum(seconds),
                        **config,
                    }
                )
            if "dms" in variants:
                dms = run_dms(seed, epochs, target, full_flops, search_epochs=search_epochs, **(dms_options or {}))
            for variant in ("dms_b", "dms_a") if "dms" in variants else ():
                runs.append(
                    {
                        **row,
                        "variant": variant,
                        **dms[variant],
                        "architecture": dms["architecture"],
                        "searched_ratio": dms["searched_ratio"],
                    }
                )
            if "torch_pruning" in variants:
                torch.manual_seed(seed)
                model = Classifier(make_vit(**SUPERNET), max_epochs=epochs)
                tp = TorchPruningAt(search_epochs, target * full_flops)
                acc, seconds = fit(model, epochs, seed, [tp])
                runs.append(
                    {
                        **row,
                        "variant": "torch_pruning",
                        "acc": acc,
                        "flops_ratio": flops(model.model) / full_flops,
                        "seconds": sum(seconds),
                        "epoch_seconds": seconds,
                        **tp.report,
                    }
                )
            print(
                f"seed {seed} target {target}: "
                + ", ".join(
                    f"{r['variant']} {r['acc']:.3f} ({r['flops_ratio']:.3f})"
                    for r in runs
                    if r["seed"] == seed and r["target"] == target
                ),
                flush=True,
            )
    return runs


def levers_part(seeds: list[int], epochs: int, search_epochs: int, target: float) -> dict[str, Any]:
    full_flops = flops(make_vit(**SUPERNET))
    runs = []
    for name, options in LEVERS.items():
        for seed in seeds:
            dms = run_dms(seed, epochs, target, full_flops, **{"search_epochs": search_epochs, **options})
            for variant in ("dms_b", "dms_a"):
                runs.append(
                    {
                        "seed": seed,
                        "lever": name,
                        "variant": variant,
                        **dms[variant],
                        "architecture": dms["architecture"],
                        "searched_ratio": dms["searched_ratio"],
                    }
                )
            print(
                f"lever {name} seed {seed}: b {dms['dms_b']['acc']:.3f} a {dms['dms_a']['acc']:.3f} "
                f"searched {dms['searched_ratio']:.3f} exported {dms['dms_b']['flops_ratio']:.3f}",
                flush=True,
            )
    return {"target": target, "levers": LEVERS, "runs": runs, "summary": summarise(runs, "lever", "variant")}


PAIRS = [("dms_a", "uniform"), ("dms_a", "uniform_depth_width"), ("dms_b", "torch_pruning"), ("full", "uniform")]


def paired_differences(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy differences of variant pairs on the same seed (same data order), mean +- std over seeds, per target."""
    out: dict[str, Any] = {}
    by_key = {(r["target"], r["variant"], r["seed"]): r["acc"] for r in runs}
    targets = sorted({r["target"] for r in runs if r["target"] < 1.0}, reverse=True)
    for target in targets:
        for a, b in PAIRS:
            ta = 1.0 if a == "full" else target
            diffs = [
                by_key[(ta, a, seed)] - by_key[(target, b, seed)]
                for seed in sorted({r["seed"] for r in runs})
                if (ta, a, seed) in by_key and (target, b, seed) in by_key
            ]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                out[f"{target}: {a} - {b}"] = {"diff": _mean_std(diffs), "wins": wins, "n": len(diffs)}
    return out


def search_epoch_ratio(runs: list[dict[str, Any]], search_epochs: int) -> dict[str, Any]:
    """CPU time of DMS's search epochs over the same epochs of plain training, inside Lightning, per target.

    The plain epochs are Torch-Pruning's run before it prunes: the same supernet, data and order.
    """
    out: dict[str, Any] = {}
    for target in sorted({r["target"] for r in runs if r["variant"] == "dms_b" and "epoch_seconds" in r}):
        ratios = []
        for b in (r for r in runs if r["variant"] == "dms_b" and r["target"] == target and "epoch_seconds" in r):
            plain = [
                r for r in runs if r["variant"] == "torch_pruning" and r["target"] == target and r["seed"] == b["seed"]
            ]
            if plain and "epoch_seconds" in plain[0]:
                ratios.append(sum(b["epoch_seconds"][:search_epochs]) / sum(plain[0]["epoch_seconds"][:search_epochs]))
        if ratios:
            out[str(target)] = _mean_std(ratios)
    return out


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def summarise(runs: list[dict[str, Any]], *keys: str) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        label = "/".join(str(r[k]) for k in (("target",) if "target" in r else ()) + keys)
        groups.setdefault(label, []).append(r)
    out = {}
    for label, rows in groups.items():
        out[label] = {
            "acc": _mean_std([r["acc"] for r in rows]),
            "flops_ratio": _mean_std([r["flops_ratio"] for r in rows]),
            "n": len(rows),
        }
        if "search_fraction" in rows[0]:
            out[label]["search_fraction"] = _mean_std([r["search_fraction"] for r in rows])
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# DMS benchmark (MNIST-1D, tiny timm ViT)",
        "",
        "Generated by `benchmarks/bench_dms.py`; see its docstring.",
        "",
    ]
    cfg = result.get("config", {})
    lines.append(f"Last invocation: {json.dumps({k: v for k, v in cfg.items() if k != 'out'})}")
    lines.append("The main part's default DMS settings (arch_lr 0.01, width-only last 20%) are the levers' baseline.")
    if "overhead" in result:
        lines += [
            "",
            "## Search step / plain step",
            "",
            "| supernet | plain ms | search ms | ratio (target <= 1.15) |",
            "|---|---|---|---|",
        ]
        for o in result["overhead"]:
            lines.append(
                f"| {o['supernet']} | {o['plain_step_s'] * 1e3:.1f} | {o['search_step_s'] * 1e3:.1f} "
                f"| {o['ratio']:.3f} |"
            )
    if "epoch_cost" in result:
        lines += epoch_cost_markdown(result["epoch_cost"])
    for target, (mean, std) in result.get("main", {}).get("search_epoch_cpu_ratio", {}).items():
        lines.append(
            "\nUnpaired (not a measure of DMS's cost): DMS's search epochs in the main part's stored runs over "
            f"Torch-Pruning's run's first epochs, process CPU time, target {target}: {mean:.3f} ± {std:.3f}. The two "
            "fits ran minutes apart, so load on the shared machine moves this ratio, and stored runs may predate "
            "changes to the callback; the paired epoch-cost section above is the measurement."
        )
    paired = result.get("main", {}).get("paired")
    if paired:
        lines += ["", "## Paired differences (same seed)", ""]
        lines.append("| pair | acc difference (mean ± std) | standard error of the mean | wins | n |")
        lines.append("|---|---|---|---|---|")
        for label, p in paired.items():
            se = p["diff"][1] / p["n"] ** 0.5
            lines.append(f"| {label} | {p['diff'][0]:+.4f} ± {p['diff'][1]:.4f} | {se:.4f} | {p['wins']} | {p['n']} |")
    for part in ("main", "levers"):
        if part not in result:
            continue
        lines += [
            "",
            f"## {part}",
            "",
            "| group | val acc (mean ± std) | FLOPs / supernet | search cost / total | n |",
            "|---|---|---|---|---|",
        ]
        for label, s in result[part]["summary"].items():
            frac = f"{s['search_fraction'][0]:.3f}" if "search_fraction" in s else ""
            lines.append(
                f"| {label} | {s['acc'][0]:.4f} ± {s['acc'][1]:.4f} "
                f"| {s['flops_ratio'][0]:.3f} ± {s['flops_ratio'][1]:.3f} | {frac} | {s['n']} |"
            )
    return "\n".join(lines) + "\n"


def write_markdown(out: Path, result: dict[str, Any]) -> None:
    """``dms.md`` next to ``out``, keeping the step-cost section of ``dms_step_cost.json`` if there is one."""
    md = out.with_suffix(".md")
    md.write_text(markdown(result))
    cost = out.with_name("dms_step_cost.json")
    if cost.exists():
        write_step_cost_section(md, json.loads(cost.read_text()))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=["overhead", "main", "levers", "all", "report", "step-cost", "step-cost-one", "epoch-cost"],
        default="all",
    )
    parser.add_argument("--supernet", choices=list(SUPERNETS), default="tiny", help="step-cost-one")
    parser.add_argument("--supernets", nargs="+", choices=list(SUPERNETS), default=list(SUPERNETS), help="step-cost")
    parser.add_argument("--repeats", type=int, default=3, help="step-cost part: child processes per supernet and tree")
    parser.add_argument("--batches", type=int, default=32, help="step-cost part: training steps per epoch (tiny)")
    parser.add_argument("--batches-large", type=int, default=10, help="step-cost part: steps per epoch (large)")
    parser.add_argument("--before", type=Path, default=None, help="step-cost part: an earlier source tree")
    parser.add_argument(
        "--profile", type=Path, default=None, help="step-cost-one: cProfile the DMS fit's measured steps"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="main part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument(
        "--val-extra", type=int, default=0, help="main/levers: validation signals added from a second MNIST-1D draw"
    )
    parser.add_argument("--val-last-only", action="store_true", help="main/levers: validate after the last epoch only")
    parser.add_argument(
        "--train-draws",
        type=int,
        nargs="*",
        default=[],
        help="main/levers: more MNIST-1D draws (generator seeds, e.g. 44 45 46) added to the training set",
    )
    parser.add_argument(
        "--dms-options",
        default="{}",
        help='main: more DifferentiableModelScaling arguments as JSON, e.g. \'{"embed": true, "depth": false}\'',
    )
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="report: fold these JSONs' main runs in")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "dms.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    mnist1d_tensors()
    VALIDATION.update(extra=args.val_extra, last_only=args.val_last_only, train_draws=tuple(args.train_draws))
    if args.part == "step-cost-one":  # a plain fit and a DMS search in lockstep, in this process
        print(json.dumps(step_cost_pair(args.epochs, args.batches, SUPERNETS[args.supernet], args.profile)))
        return {}
    if args.part == "step-cost":  # its own JSON (dms_step_cost.json unless --out is given) and section of dms.md
        out = args.out if args.out.name != "dms.json" else args.out.with_name("dms_step_cost.json")
        batches = {"tiny": args.batches, "large": args.batches_large}
        run = step_cost_part(
            args.repeats, args.epochs, {n: batches[n] for n in args.supernets}, args.before, args.threads
        )
        config = {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "machine": platform.machine(),
        }
        # supernets not run this time keep their earlier figures (and their config)
        cost = json.loads(out.read_text()) if out.exists() else {}
        cost = {k: v for k, v in cost.items() if k in SUPERNETS}
        cost.update({net: {**figures, "config": config} for net, figures in run.items()})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(cost, indent=2))
        write_step_cost_section(out.with_name("dms.md"), cost)
        print(step_cost_markdown(cost))
        return cost
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result = {k: v for k, v in result.items() if k in ("config", "overhead", "main", "levers", "epoch_cost")}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "merge", "before", "profile")}
    if args.part == "report":  # re-render the markdown (and derived numbers) from the stored runs
        for other in args.merge:  # runs of the same protocol split over processes
            extra = json.loads(other.read_text()).get("main", {})
            main = result.setdefault("main", {"configs": {}, "runs": []})
            have = {(r["target"], r["variant"], r["seed"]) for r in main["runs"]}
            main["runs"] += [r for r in extra.get("runs", []) if (r["target"], r["variant"], r["seed"]) not in have]
            main["configs"] = {**extra.get("configs", {}), **main["configs"]}
        if "main" in result:
            result["main"]["runs"].sort(key=lambda r: (-r["target"], r["variant"], r["seed"]))
            result["main"]["summary"] = summarise(result["main"]["runs"], "variant")
            result["main"]["paired"] = paired_differences(result["main"]["runs"])
            result["main"]["search_epoch_cpu_ratio"] = search_epoch_ratio(result["main"]["runs"], args.search_epochs)
        args.out.write_text(json.dumps(result, indent=2))
        write_markdown(args.out, result)
        print(markdown(result))
        return result
    if args.part == "epoch-cost":  # its own key of the JSON; the main part's invocation stays in "config"
        start = time.perf_counter()
        load = os.getloadavg()
        cost = epoch_cost_part(args.targets, args.seeds, args.epochs, args.search_epochs)
        cost["config"] = {**config, "torch": torch.__version__, "wall_s": time.perf_counter() - start}
        cost["load"] = f"load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores)"
        result["epoch_cost"] = cost
        args.out.write_text(json.dumps(result, indent=2))
        write_markdown(args.out, result)
        print("\n".join(epoch_cost_markdown(cost)))
        return result
    result["config"] = {**config, "supernet": SUPERNET, "torch": torch.__version__, "machine": platform.machine()}
    start = time.perf_counter()
    if args.part in ("overhead", "all"):
        result["overhead"] = [step_overhead(net) for net in (SUPERNET, LARGE_SUPERNET)]
        for o in result["overhead"]:
            print(f"step time {o['supernet']}: ratio {o['ratio']:.3f} (target <= 1.15)", flush=True)
    if args.part in ("main", "all"):
        # rows of an earlier invocation stay unless this one reruns their (target, variant, seed)
        new = main_part(
            args.seeds, args.epochs, args.search_epochs, args.targets, args.variants, json.loads(args.dms_options)
        )
        redo = {(r["target"], r["variant"], r["seed"]) for r in new}
        old = [r for r in result.get("main", {}).get("runs", []) if (r["target"], r["variant"], r["seed"]) not in redo]
        runs = sorted(old + new, key=lambda r: (-r["target"], r["variant"], r["seed"]))
        configs = {**result.get("main", {}).get("configs", {}), **{f"{t}/{v}/{s}": config for t, v, s in sorted(redo)}}
        result["main"] = {
            "configs": configs,
            "runs": runs,
            "summary": summarise(runs, "variant"),
            "search_epoch_cpu_ratio": search_epoch_ratio(runs, args.search_epochs),
            "paired": paired_differences(runs),
        }
    if args.part in ("levers", "all"):
        result["levers"] = {
            "config": config,
            **levers_part(args.seeds, args.epochs, args.search_epochs, args.targets[0]),
        }
    result["config"]["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    write_markdown(args.out, result)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
