"""Benchmark tasks shared by the growth and DMS benchmarks: a byte-level language model on the Python stdlib.

Every Python install ships its standard library's ``.py`` sources, so this is a real text corpus that needs
no download. The corpus is built by a rule that is the same everywhere: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` in sorted relative-path order, without ``site-packages`` /
``dist-packages`` (they differ per machine) and without test packages (``test``, ``tests``, ``idle_test``:
some distributions strip them). Every ``val_every``-th file is held out for validation, so validation text
comes from files the model never saw. The bytes are concatenated per split and cut at a fixed budget.
The corpus differs between Python versions; :func:`stdlib_corpus` returns its version and a SHA-256 so
results can be matched.

The model is the repository's registered :class:`examples.gpt_blocks.TinyGPT` (pre-norm GPT blocks, so
``DepthGrowth``, the curvature monitor, DMS and the ramp/copy operators all see its ``blocks`` stack), with a
256-byte vocabulary. :func:`train_lm` trains it with a real ``Trainer.fit`` (AdamW, linear warm-up then cosine
decay per optimizer step, one long epoch of pre-drawn random windows) and records a validation curve with the
training compute spent so far, counted in block-steps and in FLOPs (torch's ``FlopCounterMode`` on one
training step per depth, math attention kernel).

    from benchmarks.tasks import LMConfig, train_lm
    result = train_lm(LMConfig(depth=2, steps=100), seed=0)
    result["val_loss"], result["val_bpb"], result["flops"]

Run ``python benchmarks/tasks.py --depths 2 6 --seeds 0 1 2`` to check that the task discriminates depth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.gpt_blocks import TinyGPT  # also registers GPTBlock for growth
from lightning_depthgrow.dms.appliers import ARCH_GROUP_KEY
from lightning_depthgrow.growth.schedule import warmup_cosine as schedule_warmup_cosine

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


@dataclass(frozen=True)
class CorpusConfig:
    """Which bytes of the stdlib form the train and validation splits."""

    train_bytes: int = 2_000_000
    val_bytes: int = 200_000
    val_every: int = 10


@dataclass(frozen=True)
class LMConfig:
    """One language-model run: model size, optimisation and evaluation schedule.

    ``steps`` optimizer steps of ``batch_size`` windows of ``context`` bytes; validation every ``eval_every``
    steps (and at the end) on ``val_windows`` fixed windows of held-out files. ``grad_clip > 0`` clips the global
    gradient norm of the model's weights to it before each optimizer step (DMS's architecture ratios, in their own
    param group, are left out so the search's dynamics stay as they are); 0 leaves gradients alone.
    """

    depth: int = 2
    dim: int = 32
    heads: int = 4
    context: int = 128
    batch_size: int = 32
    steps: int = 500
    lr: float = 6e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    eval_every: int = 50
    val_windows: int = 128
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted relative-path order (see the module docstring for the rule)."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]) and path.is_file():
            files.append(rel)
    return [base / rel for rel in sorted(files, key=lambda p: p.as_posix())]


@lru_cache(maxsize=4)
def stdlib_corpus(config: CorpusConfig = CorpusConfig()) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train and validation bytes (``uint8`` tensors) split by file, plus a description of the corpus.

    File ``i`` (in sorted order) goes to validation when ``i % val_every == val_every - 1``. Each split is the
    concatenation of its files' bytes cut at ``train_bytes`` / ``val_bytes``.

    Example:
        >>> train, val, info = stdlib_corpus(CorpusConfig(train_bytes=1000, val_bytes=100))
        >>> train.dtype, len(train), len(val)
        (torch.uint8, 1000, 100)
    """
    splits: dict[str, bytearray] = {"train": bytearray(), "val": bytearray()}
    limits = {"train": config.train_bytes, "val": config.val_bytes}
    counts = {"train": 0, "val": 0}
    for i, path in enumerate(stdlib_files()):
        split = "val" if i % config.val_every == config.val_every - 1 else "train"
        if len(splits[split]) >= limits[split]:
            if all(len(splits[s]) >= limits[s] for s in splits):
                break
            continue
        splits[split] += path.read_bytes()
        counts[split] += 1
    for split, limit in limits.items():
        if len(splits[split]) < limit:
            raise ValueError(f"the stdlib holds only {len(splits[split])} {split} bytes, fewer than {limit}")
        del splits[split][limit:]
    train = torch.frombuffer(splits["train"], dtype=torch.uint8).clone()
    val = torch.frombuffer(splits["val"], dtype=torch.uint8).clone()
    digest = hashlib.sha256(bytes(splits["train"]) + bytes(splits["val"])).hexdigest()
    info = {
        "python": sys.version.split()[0],
        "train_files": counts["train"],
        "val_files": counts["val"],
        "sha256": digest,
        **asdict(config),
    }
    return train, val, info


class RandomWindows(Dataset):
    """``num_windows`` windows of ``context + 1`` bytes at offsets drawn once from ``seed`` (deterministic)."""

    def __init__(self, data: torch.Tensor, context: int, num_windows: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.data, self.context = data, context
        self.offsets = torch.randint(0, len(data) - context - 1, (num_windows,), generator=generator)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.offsets[index])
        return self.data[start : start + self.context + 1].long()


class EvenWindows(Dataset):
    """``num_windows`` windows spread evenly over ``data`` (the fixed validation set)."""

    def __init__(self, data: torch.Tensor, context: int, num_windows: int) -> None:
        self.data, self.context = data, context
        self.offsets = torch.linspace(0, len(data) - context - 1, num_windows).long()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(self.offsets[index])
        return self.data[start : start + self.context + 1].long()


def make_gpt(config: LMConfig, depth: int | None = None) -> TinyGPT:
    """The byte-level :class:`TinyGPT` of ``config`` (``depth`` overrides ``config.depth``).

    The MLP width is ``config.mlp_ratio`` when the config has one (a subclass such as
    ``benchmarks.bench_neuron_lm.WidthConfig``), else TinyGPT's default 4.0; ``LMConfig`` itself carries no
    ``mlp_ratio`` field so that the depth benchmark's recorded configurations (``--reuse``) stay as they were.
    """
    return TinyGPT(
        vocab_size=256,
        context=config.context,
        dim=config.dim,
        depth=config.depth if depth is None else depth,
        num_heads=config.heads,
        mlp_ratio=getattr(config, "mlp_ratio", 4.0),
    )


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy (nats per byte, mean over every position) of ``model`` on windows ``batch``
    (``[n, context + 1]`` bytes: the first ``context`` are the input, the last ``context`` the targets).

    Example:
        >>> config = LMConfig(depth=1, dim=8, heads=2, context=16, val_windows=4)
        >>> loss = lm_loss(make_gpt(config), torch.zeros(2, 17, dtype=torch.long))
        >>> loss.shape
        torch.Size([])
    """
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def val_batch(config: LMConfig) -> torch.Tensor:
    """The ``config.val_windows`` fixed validation windows (:class:`EvenWindows` over the held-out bytes) as one
    ``[val_windows, context + 1]`` batch: the windows ``train_lm`` validates on, for diagnostics after training.

    Example:
        >>> config = LMConfig(context=16, val_windows=4, corpus=CorpusConfig(train_bytes=1000, val_bytes=100))
        >>> val_batch(config).shape
        torch.Size([4, 17])
    """
    _, val, _ = stdlib_corpus(config.corpus)
    return torch.stack([w for w in EvenWindows(val, config.context, config.val_windows)])


class ByteLM(pl.LightningModule):
    """Next-byte prediction with AdamW and a warm-up + cosine schedule stepped per optimizer step.

    Logs ``train_loss`` and ``val_loss`` (nats per byte) and ``val_bpb`` (bits per byte).
    """

    def __init__(self, model: nn.Module, config: LMConfig) -> None:
        super().__init__()
        self.model, self.config = model, config
        self.example_input_array = torch.zeros(1, config.context, dtype=torch.long)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.model, batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=False)
        self.log("val_bpb", loss / math.log(2), prog_bar=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.config.grad_clip > 0:
            weights = [p for g in optimizer.param_groups if not g.get(ARCH_GROUP_KEY) for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(weights, self.config.grad_clip)

    def configure_optimizers(self) -> dict[str, Any]:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "pos_emb" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "pos_emb" not in n)]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.config.lr,
            betas=(0.9, 0.95),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lm_setup(config: LMConfig) -> dict[str, Any]:
    """``config`` as benchmarks record it (``setup["lm"]``): every field, but ``grad_clip`` only when clipping is on
    (files made before the option, all unclipped, stay comparable; a clipped file never matches an unclipped one)."""
    lm = asdict(config)
    if not config.grad_clip:
        del lm["grad_clip"]
    return lm


def warmup_cosine(config: LMConfig) -> Callable[[int], float]:
    """LR multiplier per step of ``config``'s schedule: linear warm-up to 1, cosine decay to ``min_lr_ratio`` at
    ``config.steps`` (the library's :func:`lightning_depthgrow.growth.schedule.warmup_cosine` with its fields)."""
    return schedule_warmup_cosine(config.steps, config.warmup_steps, config.min_lr_ratio)


def block_stack_depth(model: nn.Module) -> int:
    """Number of blocks in ``model.blocks`` (ramped blocks included)."""
    return len(model.blocks)


@lru_cache(maxsize=64)
def train_step_flops(config: LMConfig, depth: int) -> int:
    """FLOPs of one training step (forward + backward, one batch) of the ``depth``-block model.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` with the math attention kernel (the fused CPU
    kernels are not counted). Matrix products only, as torch counts them; norms, GELU and the optimizer
    are not included.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = make_gpt(config, depth)
    idx = torch.zeros(config.batch_size, config.context + 1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1)).backward()
    return int(counter.get_total_flops())


def equal_flops_steps(config: LMConfig, steps: int, grow_at: float, start_depth: int, final_depth: int) -> int:
    """Optimizer steps of the ``final_depth``-block model whose training FLOPs equal those of a run of ``steps`` steps
    that grows from ``start_depth`` to ``final_depth`` blocks after ``round(grow_at * steps)`` of them."""
    at_step = round(grow_at * steps)
    small, large = train_step_flops(config, start_depth), train_step_flops(config, final_depth)
    return round((at_step * small + (steps - at_step) * large) / large)


class ComputeCurve(Callback):
    """Counts training compute per optimizer step and records it with every validation result.

    Each step costs ``train_step_flops(config, depth)`` at the depth the step ran with, and ``depth``
    block-steps. After every validation a row ``{step, depth, block_steps, flops, val_loss, cpu_s, wall_s}``
    is appended to :attr:`rows`.
    """

    def __init__(self, config: LMConfig) -> None:
        self.config = config
        self.block_steps = 0
        self.flops = 0
        self.rows: list[dict[str, float]] = []
        self.depths: list[int] = []
        self._start = (0.0, 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        depth = block_stack_depth(pl_module.model)
        self.depths.append(depth)
        self.block_steps += depth
        self.flops += train_step_flops(self.config, depth)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.rows.append(
            {
                "step": trainer.global_step,
                "depth": block_stack_depth(pl_module.model),
                "block_steps": self.block_steps,
                "flops": self.flops,
                "val_loss": float(trainer.callback_metrics["val_loss"]),
                "wall_s": time.perf_counter() - self._start[0],
                "cpu_s": time.process_time() - self._start[1],
            }
        )


def train_lm(
    config: LMConfig,
    seed: int,
    callbacks: list[Callback] | None = None,
    model: nn.Module | None = None,
    module_class: Callable[[nn.Module, LMConfig], ByteLM] = ByteLM,
) -> dict[str, Any]:
    """Train one byte-level GPT with ``Trainer.fit`` and return its validation curve and compute.

    ``seed`` fixes the initial weights and the training windows (so two variants with the same seed see the
    same data in the same order). ``callbacks`` are added to the Trainer (e.g. a growth callback); ``model``
    replaces the default ``make_gpt(config)``; ``module_class`` (a ``ByteLM`` subclass, e.g. with another LR
    schedule, or a callable making one from the network and the config, e.g. a ``functools.partial`` of one) wraps
    it.

    Returns a dict with ``val_loss`` / ``val_bpb`` (final), ``curve`` (rows of :class:`ComputeCurve`),
    ``block_steps``, ``flops``, ``depth`` (final), ``params``, ``cpu_s``, ``wall_s``, ``depth_per_step``.
    """
    train, val, _ = stdlib_corpus(config.corpus)
    pl.seed_everything(seed, verbose=False)
    net = make_gpt(config) if model is None else model
    module = module_class(net, config)
    train_loader = DataLoader(
        RandomWindows(train, config.context, config.steps * config.batch_size, seed), batch_size=config.batch_size
    )
    val_loader = DataLoader(EvenWindows(val, config.context, config.val_windows), batch_size=64)
    curve = ComputeCurve(config)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=config.steps,
        max_epochs=1,
        val_check_interval=config.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[*(callbacks or []), curve],
    )
    start = (time.perf_counter(), time.process_time())
    trainer.fit(module, train_loader, val_loader)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    if not curve.rows or curve.rows[-1]["step"] != config.steps:
        trainer.validate(module, val_loader, verbose=False)
        curve.on_validation_end(trainer, module)
    final = curve.rows[-1]["val_loss"]
    return {
        "seed": seed,
        "val_loss": final,
        "val_bpb": final / math.log(2),
        "curve": curve.rows,
        "block_steps": curve.block_steps,
        "flops": curve.flops,
        "depth": block_stack_depth(net),
        "params": sum(p.numel() for p in net.parameters()),
        "cpu_s": cpu,
        "wall_s": wall,
        "depth_per_step": _run_lengths(curve.depths),
    }


@torch.no_grad()
def block_diagnostics(model: nn.Module, config: LMConfig) -> list[dict[str, float]]:
    """Per block of ``model.blocks``: how much it does, on the fixed validation windows.

    ``update_ratio``: ``||block(x) - x|| / ||x||`` (the relative residual update; near 0 = a block that does
    nothing); ``skip_loss_delta``: validation loss with the block skipped minus the loss with it (near 0 = the
    model does not use it).
    """
    batch = val_batch(config)
    was_training = model.training
    model.eval()

    def loss() -> float:
        return float(lm_loss(model, batch))

    ratios: list[float] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ratios.append(float((output - args[0]).norm() / args[0].norm()))

    handles = [block.register_forward_hook(record) for block in model.blocks]
    base = loss()
    for handle in handles:
        handle.remove()
    rows = []
    blocks = list(model.blocks)
    for i, ratio in enumerate(ratios):
        model.blocks[i] = nn.Identity()
        rows.append({"block": i, "update_ratio": ratio, "skip_loss_delta": loss() - base})
        model.blocks[i] = blocks[i]
    model.train(was_training)
    return rows


def _run_lengths(values: list[int]) -> list[list[int]]:
    """``[[value, count], ...]`` for consecutive equal values (a compact depth-per-step record)."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Does the stdlib byte-LM task discriminate depth?")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=LMConfig.steps)
    parser.add_argument("--dim", type=int, default=LMConfig.dim)
    parser.add_argument("--lr", type=float, default=LMConfig.lr)
    parser.add_argument("--batch-size", type=int, default=LMConfig.batch_size)
    parser.add_argument("--context", type=int, default=LMConfig.context)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = LMConfig(steps=args.steps, dim=args.dim, lr=args.lr, batch_size=args.batch_size, context=args.context)
    _, _, info = stdlib_corpus(base.corpus)
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        for depth in args.depths:
            result = train_lm(replace(base, depth=depth), seed)
            runs.setdefault(f"fixed_{depth}", []).append(result)
            print(
                f"seed {seed} depth {depth}: val_loss {result['val_loss']:.4f} ({result['val_bpb']:.3f} bpb) "
                f"cpu {result['cpu_s']:.1f}s wall {result['wall_s']:.1f}s; curve "
                + " ".join(f"{row['val_loss']:.3f}" for row in result["curve"]),
                flush=True,
            )
    summary = {}
    for name, results in runs.items():
        loss, std = mean_std([r["val_loss"] for r in results])
        summary[name] = {"val_loss_mean": loss, "val_loss_std": std, "val_bpb_mean": loss / math.log(2)}
        print(f"{name}: val_loss {loss:.4f} +- {std:.4f}")
    record = {"config": asdict(base), "corpus": info, "summary": summary, "runs": runs}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()


def merge_runs(out: Path, paths: list[Path], key: tuple[str, ...] = ("shape_name", "seed")) -> dict[str, Any]:
    """The results file ``out`` (an empty one if it does not exist) with the ``runs`` of each file of ``paths``
    merged in: a merged run replaces one with the same ``key`` values; ``config`` is taken from the first file
    that has one. Nothing is written."""
    result = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for path in paths:
        other = json.loads(path.read_text())
        result.setdefault("config", other["config"])
        keys = {tuple(r[k] for k in key) for r in other["runs"]}
        result["runs"] = [r for r in result["runs"] if tuple(r[k] for k in key) not in keys] + other["runs"]
    return result
