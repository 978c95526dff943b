"""Benchmark: Differentiable Model Scaling on the byte-level stdlib LM, Hugging Face GPT-2 (issue 11, item 4).

The task is :mod:`benchmarks.tasks`' byte-level language model (Python stdlib sources, validation on held-out
files, loss in nats/byte). The model is a tiny random-init ``transformers.GPT2LMHeadModel`` (vocabulary 256,
``--dim`` embedding width, ``--heads`` heads, ``--layers`` blocks, MLP ``4 * dim``), wrapped so it maps token ids
to logits, trained by :class:`benchmarks.tasks.ByteLM` (AdamW, warm-up + cosine per step) in a real
``Trainer.fit``. Training is cut into epochs of ``--epoch-steps`` steps (DMS exports at an epoch start); every
variant of a seed sees the same pre-drawn windows in the same order (:class:`EpochSlices`).

Variants, per seed and FLOPs target ``r`` (``k`` = ``--search-epochs`` x ``--epoch-steps`` search steps, ``S`` =
``--steps``, ``F`` = the full model's training-step FLOPs, ``F_r`` = the exported model's):

- ``full``: the supernet, ``S`` steps (compute ``S F``): shows whether the benchmark discriminates model size.
- ``dms_b`` (pipeline b): DMS searches for ``k`` steps, exports (weights and AdamW state sliced), trains on to
  ``S`` steps. Compute ``B = k F + (S - k) F_r``.
- ``dms_a`` (pipeline a): the architecture ``dms_b``'s search found (``export_architecture``), rebuilt from a
  freshly initialised supernet (``build_architecture``) and trained from scratch for ``S - k`` steps with its own
  warm-up + cosine schedule, so search + training costs ``B`` as well (the search fraction ``k F / B`` is
  reported).
- ``uniform``: a GPT-2 scaled by hand to the exported model's FLOPs: depth ``round(L (F_r / F) ** (1/3))``, then
  the widest embedding width (a multiple of the heads, MLP ``4 x``) that fits, then the MLP width that lands on
  the FLOPs; trained from scratch for ``round(B / F_u)`` steps (equal total compute with pipelines a and b).
- ``torch_pruning``: the supernet trained ``k`` steps, then pruned by Torch-Pruning (``GroupTaylorImportance``)
  to the exported FLOPs, and trained on to ``S`` steps (fresh AdamW moments, the LR schedule continues): the same
  point in training and the same compute as ``dms_b``. When Torch-Pruning cannot prune the model the row holds
  the error instead.

FLOPs: torch's ``FlopCounterMode`` on the forward pass (``lightning_depthgrow.measure.count_flops``, math
attention kernel) times 3 for a training step; a search step costs the supernet's FLOPs (soft masks save
nothing). CPU seconds (``time.process_time``) are recorded too.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_lm.py --seeds 0 1 2 --targets 0.5

Writes ``benchmarks/results/dms_lm.json`` (after every run, so an interrupted invocation keeps what it did;
``--resume`` skips the runs already there with the same configuration) and ``benchmarks/results/dms_lm.md``.
``--no-pipeline-b`` runs the search alone (stopped one step after its export, on the same ``S``-step schedule) and
pipeline a; the uniform model then gets pipeline a's total compute (search + training): the search-length lever
(``--search-epochs 1``: ``dms_lm_search1.json``). ``--part report`` re-renders the markdown from the JSON,
``--merge A.json B.json`` first adds the runs of other invocations with the same settings (e.g. one process per
seed, or Torch-Pruning run on its own).

A cheaper search for pipeline a (``--no-pipeline-b``): ``--search-batch-size`` and ``--search-context`` give the
search its own DataLoader (fewer, shorter windows per step: the same number of architecture updates for a
fraction of the FLOPs; the resource model still counts FLOPs at ``--context``, so the 50% means the same model),
``--arch-lr`` the DMS architecture learning rate. ``--budget-steps N`` fixes the total compute at ``N`` training
steps of a model at exactly the target FLOPs: the search's FLOPs (counted at its own batch and context) are
subtracted and pipeline a trains what is left; the uniform model trains all of it. ``--no-pipeline-a
--no-pipeline-b`` runs the search alone (variant ``dms_search``: the export is the result) and ``--part screen
--merge A.json ...`` tabulates what such runs exported (``dms_lm_cheap_search_screen.md``). The recipe measured
(``dms_lm_cheap_search.md``)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_lm.py --seeds 3 4 5 --variants dms uniform \
        --no-pipeline-b --search-epochs 1 --epoch-steps 200 --budget-steps 1200 \
        --search-batch-size 8 --search-context 32 --out benchmarks/results/dms_lm_cheap_search.json

``--grad-clip C`` (default 0: off, as every run before it) clips the global gradient norm of the model's weights
to ``C`` before each optimizer step in every run (search, pipelines a and b, uniform, full, Torch-Pruning) through
``LMConfig.grad_clip`` (:class:`~benchmarks.tasks.ByteLM`; DMS's architecture-ratio param group is left out);
it is recorded in the settings (``settings.lm.grad_clip``; older JSONs, without it, count as 0 when merged or
resumed). The cheap search with ``--grad-clip 1.0`` (``dms_lm_clip.md``, protocol ``dms_lm_clip_protocol.md``;
one process per seed and variant, merged with ``--part report --merge``)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_dms_lm.py --seeds 20 --variants dms --targets 0.5 \
        --no-pipeline-b --search-epochs 1 --epoch-steps 200 --budget-steps 1200 --search-batch-size 8 \
        --search-context 32 --grad-clip 1.0 --out benchmarks/results/dms_lm_clip_dms_s20.json

``--part report --baseline OLD.json`` also tabulates each run beside the same (target, variant, seed) run of
``OLD.json`` and names the settings that differ (``dms_lm_clip_diag.md``: clipped against unclipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tasks import ByteLM, EvenWindows, LMConfig, RandomWindows, stdlib_corpus
from lightning_depthgrow.callbacks import event_log
from lightning_depthgrow.callbacks.dms import DifferentiableModelScaling
from lightning_depthgrow.dms import build_architecture, export_architecture
from lightning_depthgrow.measure import count_flops

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------- model
class GPT2Bytes(nn.Module):
    """A ``GPT2LMHeadModel`` as ``forward(idx) -> logits`` (what :class:`~benchmarks.tasks.ByteLM` calls)."""

    def __init__(self, config: transformers.GPT2Config) -> None:
        super().__init__()
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(input_ids=idx).logits


def gpt2_config(dim: int, layers: int, heads: int, inner: int, context: int) -> transformers.GPT2Config:
    """A tiny byte-level GPT-2 config (no dropout, no KV cache)."""
    return transformers.GPT2Config(
        vocab_size=256,
        n_positions=context,
        n_embd=dim,
        n_layer=layers,
        n_head=heads,
        n_inner=inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def make_gpt2(shape: dict[str, int], context: int) -> GPT2Bytes:
    return GPT2Bytes(gpt2_config(shape["dim"], shape["layers"], shape["heads"], shape["inner"], context))


def forward_flops(net: nn.Module, context: int) -> int:
    """Forward FLOPs of one window of ``context`` bytes (``FlopCounterMode``, math attention kernel)."""
    return count_flops(net, torch.zeros(1, context, dtype=torch.long)).total


def uniform_shape(supernet: dict[str, int], target_flops: float, context: int) -> dict[str, int]:
    """Hand scaling of ``supernet`` to ``target_flops`` (forward, per window): depth by the cube root of the FLOPs
    ratio, the widest embedding width (a multiple of the heads, MLP 4x) within the budget, then the MLP width
    that comes closest to it (FLOPs are linear in the MLP width: two counts give the line)."""
    full = forward_flops(make_gpt2(supernet, context), context)
    layers = max(1, round(supernet["layers"] * (target_flops / full) ** (1 / 3)))
    heads = supernet["heads"]

    def count(dim: int, inner: int) -> int:
        return forward_flops(
            make_gpt2({"dim": dim, "layers": layers, "heads": heads, "inner": inner}, context), context
        )

    dims = [d for d in range(heads, supernet["dim"] + 1, heads) if count(d, 4 * d) <= target_flops]
    dim = max(dims) if dims else heads
    lo, hi = count(dim, 1), count(dim, 4 * dim + 1)
    inner = max(1, round(1 + (target_flops - lo) * (4 * dim) / (hi - lo)))
    return {"dim": dim, "layers": layers, "heads": heads, "inner": inner}


def architecture_of(net: GPT2Bytes) -> dict[str, Any]:
    """Per kept block: heads and MLP units (read from the layers' widths)."""
    blocks = net.gpt.transformer.h

    def width(layer: nn.Module) -> int:  # output width of a Conv1D, a Linear or a SplitQKV (its q)
        return (
            layer.nf
            if hasattr(layer, "nf")
            else layer.q.out_features * 3
            if hasattr(layer, "q")
            else layer.out_features
        )

    return {
        "dim": net.gpt.transformer.wte.weight.shape[1],
        "layers": len(blocks),
        "heads": [width(b.attn.c_attn) // 3 // b.attn.head_dim for b in blocks],
        "inner": [width(b.mlp.c_fc) for b in blocks],
    }


# ----------------------------------------------------------------------------------------- data and training
class EpochSlices(Sampler[int]):
    """Epoch ``e`` reads windows ``e * n .. (e + 1) * n - 1`` of the pre-drawn windows (Lightning calls
    ``set_epoch``), so a run cut into epochs sees the same windows in the same order as one long epoch."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch, self.epoch = per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch * self.per_epoch, (self.epoch + 1) * self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch


class StepCost(Callback):
    """Training FLOPs and CPU seconds per optimizer step; the step FLOPs are counted again when the model's
    parameter count changes (an export or a pruning). Steps of a model with DMS gates cost the supernet's FLOPs."""

    def __init__(self, context: int, batch_size: int) -> None:
        self.context, self.batch_size = context, batch_size
        self.flops = 0
        self.steps = 0
        self.segments: list[list[int]] = []  # [train-step FLOPs, steps]
        self._key: int | None = None
        self._step_flops = 0
        self._cpu = 0.0
        self.cpu_s = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cpu = time.process_time()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        key = sum(p.numel() for n, p in pl_module.model.named_parameters() if "dms_gates" not in n)
        if key != self._key:
            self._key = key
            self._step_flops = 3 * self.batch_size * forward_flops(_plain(pl_module.model), self.context)
            self.segments.append([self._step_flops, 0])
        self.flops += self._step_flops
        self.steps += 1
        self.segments[-1][1] += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cpu_s = time.process_time() - self._cpu


def _plain(net: nn.Module) -> nn.Module:
    """``net`` without DMS gates (a copy with the gates removed when it has them): the soft masks of a search
    leave the layers' widths, so the FLOPs a search step costs are the supernet's."""
    from lightning_depthgrow.dms import find_gates, remove_gates

    if find_gates(net) is None:
        return net
    copy_ = copy.deepcopy(net)
    remove_gates(copy_)
    return copy_


@torch.no_grad()
def evaluate(net: nn.Module, config: LMConfig) -> tuple[float, float]:
    """Mean next-byte loss (nats/byte) and top-1 next-byte accuracy (%) on ``config.val_windows`` fixed windows
    of held-out files."""
    _, val, _ = stdlib_corpus(config.corpus)
    windows = torch.stack(list(EvenWindows(val, config.context, config.val_windows)))
    was = net.training
    net.eval()
    total = correct = 0.0
    for chunk in windows.split(64):
        logits = net(chunk[:, :-1]).reshape(-1, 256)
        target = chunk[:, 1:].reshape(-1)
        total += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += float((logits.argmax(-1) == target).sum())
    net.train(was)
    n = windows.shape[0] * config.context
    return total / n, 100.0 * correct / n


def fit(
    net: nn.Module,
    config: LMConfig,
    seed: int,
    epoch_steps: int,
    callbacks: list[Callback],
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``net`` for ``config.steps`` steps in epochs of ``epoch_steps``; the final validation loss and cost.
    ``stop_after``: stop after that many steps of the ``config.steps``-step schedule (a search that is not
    continued)."""
    train, _, _ = stdlib_corpus(config.corpus)
    pl.seed_everything(seed, verbose=False)
    module = ByteLM(net, config)
    windows = RandomWindows(
        train, config.context, math.ceil(config.steps / epoch_steps) * epoch_steps * config.batch_size, seed
    )
    loader = DataLoader(windows, batch_size=config.batch_size, sampler=EpochSlices(epoch_steps * config.batch_size))
    cost = StepCost(config.context, config.batch_size)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=stop_after or config.steps,
        max_epochs=math.ceil((stop_after or config.steps) / epoch_steps),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[*callbacks, cost],
    )
    trainer.fit(module, loader)
    if cost.steps != (stop_after or config.steps):
        raise RuntimeError(f"trained {cost.steps} steps, expected {stop_after or config.steps}")
    val_loss, val_acc = evaluate(module.model, config)
    return {
        "val_loss": val_loss,
        "val_acc": val_acc,
        "steps": cost.steps,
        "train_flops": cost.flops,
        "segments": cost.segments,
        "cpu_s": cost.cpu_s,
        "module": module,
        "first_batch_sum": int(windows[0].sum()),
    }


# ----------------------------------------------------------------------------------------- Torch-Pruning
class TorchPruningAt(Callback):
    """Torch-Pruning (``GroupTaylorImportance``) at the start of epoch ``epoch``, to ``target_flops`` (forward, per
    window), bisecting its pruning ratio on copies. GPT-2's ``Conv1D`` layers are first swapped for equal
    ``nn.Linear`` layers (Torch-Pruning does not know ``Conv1D``) and ``c_attn`` for :class:`SplitQKV`. One ratio
    for everything Torch-Pruning groups: the embedding width (the residual stream, with the tied LM head's input),
    MLP units, and whole heads (``head_pruning_ratio``; head dims stay)."""

    def __init__(self, epoch: int, target_flops: float, context: int, batches: int = 4) -> None:
        self.epoch, self.target_flops, self.context, self.batches = epoch, target_flops, context, batches
        self.report: dict[str, Any] = {}

    def _pruned(self, net: GPT2Bytes, ratio: float, data: list[torch.Tensor]) -> GPT2Bytes:
        import torch_pruning as tp

        conv1d_to_linear(net)
        blocks = list(net.gpt.transformer.h)
        for b in blocks:
            if not isinstance(b.attn.c_attn, SplitQKV):
                b.attn.c_attn = SplitQKV(b.attn.c_attn, b.attn.split_size)
        net.zero_grad()
        for batch in data:  # Taylor importance needs gradients
            logits = net(batch[:, :-1])
            F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)).backward()
        pruner = tp.pruner.MetaPruner(
            net,
            torch.zeros(1, self.context, dtype=torch.long),
            importance=tp.importance.GroupTaylorImportance(),
            pruning_ratio=ratio,
            ignored_layers=[net.gpt.lm_head],
            num_heads={m: b.attn.num_heads for b in blocks for m in b.attn.c_attn.projections()},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
        )
        pruner.step()
        for b in blocks:
            attn = b.attn
            attn.split_size = attn.c_attn.q.out_features
            attn.num_heads = attn.split_size // attn.head_dim
        net.gpt.lm_head.weight = net.gpt.transformer.wte.weight  # Torch-Pruning sliced both alike; tie them again
        net.zero_grad(set_to_none=True)
        return net

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        loader = trainer.train_dataloader
        data = [b for _, b in zip(range(self.batches), loader)]
        net = pl_module.model
        before = forward_flops(net, self.context)
        lo, hi = 0.0, 0.95
        for _ in range(8):
            mid = 0.5 * (lo + hi)
            if forward_flops(self._pruned(copy.deepcopy(net), mid, data), self.context) > self.target_flops:
                lo = mid
            else:
                hi = mid
        gaps = [
            (abs(forward_flops(self._pruned(copy.deepcopy(net), r, data), self.context) - self.target_flops), r)
            for r in (lo, hi)
        ]
        ratio = min(gaps)[1]
        pl_module.model = self._pruned(net, ratio, data)
        trainer.strategy.setup_optimizers(trainer)  # fresh AdamW moments; the LR schedule continues
        for config in trainer.lr_scheduler_configs:
            config.scheduler.last_epoch = trainer.global_step - 1
            config.scheduler.step()
        self.report = {
            "pruning_ratio": ratio,
            "flops_before": before,
            "flops_after": forward_flops(pl_module.model, self.context),
        }


class SplitQKV(nn.Module):
    """GPT-2's packed ``c_attn`` (``q | k | v`` in one Linear) as three Linears whose outputs are concatenated: the
    same function, in the form Torch-Pruning's head pruning knows (one projection per q, k, v)."""

    def __init__(self, packed: nn.Linear, split: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(packed.in_features, split) for _ in range(3))
        with torch.no_grad():
            for i, proj in enumerate(self.projections()):
                proj.weight.copy_(packed.weight[i * split : (i + 1) * split])
                proj.bias.copy_(packed.bias[i * split : (i + 1) * split])

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q, self.k, self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def conv1d_to_linear(net: nn.Module) -> None:
    """Replace every transformers ``Conv1D`` (``y = x W + b``, ``W`` stored ``(in, out)``) by an equal Linear."""
    from transformers.pytorch_utils import Conv1D

    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Conv1D:
                linear = nn.Linear(child.nx, child.nf)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)


# ----------------------------------------------------------------------------------------- variants
def run_full(supernet: dict[str, int], config: LMConfig, seed: int, epoch_steps: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    net = make_gpt2(supernet, config.context)
    out = fit(net, config, seed, epoch_steps, [])
    return _row(out, net, config, ratio=1.0)


def run_dms(
    supernet: dict[str, int],
    config: LMConfig,
    seed: int,
    epoch_steps: int,
    target: float,
    search_epochs: int,
    depth: bool = True,
    pipeline_a: bool = True,
    pipeline_b: bool = True,
    search_batch_size: int | None = None,
    search_context: int | None = None,
    arch_lr: float | None = None,
    budget: float | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]:
    """Pipeline b, then pipeline a on the architecture b's search found; returns (b, a, the architecture).
    ``depth=False`` searches widths and heads only (no depth gates); ``pipeline_a=False`` skips a (``None``);
    ``pipeline_b=False`` stops the run one step after the export (the search on the same ``S``-step schedule,
    not continued: b is ``None``, a is run; with ``pipeline_a=False`` too, the search's row is returned as b).

    Cheaper search (pipeline a only): ``search_batch_size`` / ``search_context`` windows per search step and
    bytes per window (the same number of architecture updates for a fraction of the FLOPs; the resource model
    still counts FLOPs at ``config.context``, so the target means the same model); ``arch_lr`` the DMS
    architecture learning rate (default: the library's). ``budget``: pipeline a's total training FLOPs, search
    included: a then trains the steps the budget leaves after the search's FLOPs (default: ``S - k`` steps)."""
    full = forward_flops(make_gpt2(supernet, config.context), config.context)
    search_config = replace(
        config,
        batch_size=search_batch_size or config.batch_size,
        context=search_context or config.context,
    )
    if search_config != config and pipeline_b:
        raise ValueError("a search on other batches than training's is for pipeline a only (--no-pipeline-b)")
    torch.manual_seed(seed)
    net = make_gpt2(supernet, config.context)
    options = {} if arch_lr is None else {"arch_lr": arch_lr}
    dms = DifferentiableModelScaling(
        target=target,
        search_epochs=search_epochs,
        depth=depth,
        example_input=torch.zeros(1, config.context, dtype=torch.long),
        **options,
    )
    k = search_epochs * epoch_steps
    out_b = fit(net, search_config, seed, epoch_steps, [dms], stop_after=None if pipeline_b else k + 1)
    module = out_b["module"]
    log = event_log(module)
    export = next(e for e in log if e.kind == "dms_export")
    arch = export_architecture(module, log)
    row_b = _row(out_b, module.model, config, ratio=target, full=full)
    row_b.update(
        searched_ratio=export.reason.get("searched_ratio"),
        fit_changed_elements=export.reason.get("changed_elements"),
        search_steps=search_epochs * epoch_steps,
        search_flops=out_b["segments"][0][0] * out_b["segments"][0][1],
        search_batch_size=search_config.batch_size,
        search_context=search_config.context,
        arch_lr=dms.arch_lr,
        dms_depth=depth,
    )
    if not pipeline_a:
        return row_b, None, arch["summary"]
    if not pipeline_b:
        row_b["search_cpu_s"] = out_b["cpu_s"] * k / (k + 1)
    torch.manual_seed(seed + 1000)  # a fresh supernet: new weights, the found architecture
    scratch = make_gpt2(supernet, config.context)
    build_architecture(scratch, arch)
    if forward_flops(scratch, config.context) != forward_flops(module.model, config.context):
        raise RuntimeError("the rebuilt architecture's FLOPs differ from the exported model's")
    search = row_b["search_flops"]
    if budget is None:
        steps_a = config.steps - search_epochs * epoch_steps
    else:
        steps_a = round((budget - search) / (3 * config.batch_size * forward_flops(scratch, config.context)))
    out_a = fit(scratch, replace(config, steps=steps_a), seed, epoch_steps, [])
    row_a = _row(out_a, scratch, config, ratio=target, full=full)
    search_cpu = row_b.get("search_cpu_s", out_b["cpu_s"] * k / config.steps)  # the search steps' share (approx.)
    row_a.update(
        search_flops=search,
        total_flops=search + out_a["train_flops"],
        search_fraction=search / (search + out_a["train_flops"]),
        search_cpu_s=search_cpu,
        total_cpu_s=search_cpu + out_a["cpu_s"],
        search_architecture=row_b["architecture"],
        search_batch_size=search_config.batch_size,
        search_context=search_config.context,
        arch_lr=dms.arch_lr,
        dms_depth=depth,
    )
    return (row_b if pipeline_b else None), row_a, arch["summary"]


def run_uniform(
    supernet: dict[str, int],
    config: LMConfig,
    seed: int,
    epoch_steps: int,
    target: float,
    flops_to: float,
    budget: float,
) -> dict[str, Any]:
    """The hand-scaled GPT-2 of ``flops_to`` forward FLOPs, trained for the steps that spend ``budget``."""
    full = forward_flops(make_gpt2(supernet, config.context), config.context)
    shape = uniform_shape(supernet, flops_to, config.context)
    torch.manual_seed(seed)
    net = make_gpt2(shape, config.context)
    step = 3 * config.batch_size * forward_flops(net, config.context)
    steps = round(budget / step)
    out = fit(net, replace(config, steps=steps), seed, epoch_steps, [])
    row = _row(out, net, config, ratio=target, full=full)
    row["shape"] = shape
    return row


def run_torch_pruning(
    supernet: dict[str, int],
    config: LMConfig,
    seed: int,
    epoch_steps: int,
    target: float,
    flops_to: float,
    search_epochs: int,
) -> dict[str, Any]:
    full = forward_flops(make_gpt2(supernet, config.context), config.context)
    torch.manual_seed(seed)
    net = make_gpt2(supernet, config.context)
    tp_callback = TorchPruningAt(search_epochs, flops_to, config.context)
    out = fit(net, config, seed, epoch_steps, [tp_callback])
    row = _row(out, out["module"].model, config, ratio=target, full=full)
    row.update(tp_callback.report)
    return row


def _row(
    out: dict[str, Any], net: nn.Module, config: LMConfig, ratio: float, full: int | None = None
) -> dict[str, Any]:
    f = forward_flops(net, config.context)
    return {
        "val_loss": out["val_loss"],
        "val_acc": out["val_acc"],
        "steps": out["steps"],
        "train_flops": out["train_flops"],
        "total_flops": out["train_flops"],
        "cpu_s": out["cpu_s"],
        "forward_flops": f,
        "flops_ratio": f / full if full else 1.0,
        "target": ratio,
        "flops_over_target": (f / full) / ratio if full else 1.0,
        "params": sum(p.numel() for p in net.parameters()),
        "architecture": architecture_of(net) if isinstance(net, GPT2Bytes) else None,
        "segments": out["segments"],
        "first_batch_sum": out["first_batch_sum"],
    }


# ----------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


PAIRS = [
    ("full", "uniform"),
    ("dms_a", "uniform"),
    ("dms_b", "uniform"),
    ("dms_b", "torch_pruning"),
    ("dms_a", "dms_b"),
    ("dms_b_width", "uniform"),  # the depth-free search (``--no-depth``)
    ("dms_a_width", "uniform"),
    ("dms_b_width", "dms_b"),
    ("dms_a_width", "dms_a"),
]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (target, variant): val loss, FLOPs ratio, exported / target, compute; per target: paired differences
    (loss of the first minus the second, same seed: negative = the first is better)."""
    ok = [r for r in runs if "val_loss" in r]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(f"{r['target']}/{r['variant']}", []).append(r)
    summary: dict[str, Any] = {}
    for label, rows in groups.items():
        s = {
            "val_loss": _mean_std([r["val_loss"] for r in rows]),
            "flops_ratio": _mean_std([r["flops_ratio"] for r in rows]),
            "flops_over_target": [min(r["flops_over_target"] for r in rows), max(r["flops_over_target"] for r in rows)],
            "total_flops": _mean_std([r["total_flops"] for r in rows]),
            "steps": _mean_std([r["steps"] for r in rows]),
            "cpu_s": _mean_std([r.get("total_cpu_s", r["cpu_s"]) for r in rows]),
            "n": len(rows),
        }
        if "search_fraction" in rows[0]:
            s["search_fraction"] = _mean_std([r["search_fraction"] for r in rows])
        if all("val_acc" in r for r in rows):
            s["val_acc"] = _mean_std([r["val_acc"] for r in rows])
        summary[label] = s
    by = {(r["target"], r["variant"], r["seed"]): r["val_loss"] for r in ok}
    acc = {(r["target"], r["variant"], r["seed"]): r["val_acc"] for r in ok if "val_acc" in r}
    paired: dict[str, Any] = {}
    for target in sorted({r["target"] for r in ok if r["target"] < 1.0}, reverse=True):
        for a, b in PAIRS:
            ta = 1.0 if a == "full" else target
            seeds = sorted({s for (_, _, s) in by})
            diffs = [by[(ta, a, s)] - by[(target, b, s)] for s in seeds if (ta, a, s) in by and (target, b, s) in by]
            if diffs:
                paired[f"{target}: {a} - {b}"] = {
                    "diff": _mean_std(diffs),
                    "per_seed": diffs,
                    "first_better": sum(d < 0 for d in diffs),
                    "n": len(diffs),
                }
                acc_diffs = [
                    acc[(ta, a, s)] - acc[(target, b, s)] for s in seeds if (ta, a, s) in acc and (target, b, s) in acc
                ]
                if len(acc_diffs) == len(diffs):  # accuracy points, positive = the first is better
                    paired[f"{target}: {a} - {b}"].update(acc_diff=_mean_std(acc_diffs), acc_per_seed=acc_diffs)
    return {"groups": summary, "paired": paired}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    s = summarise(result["runs"])
    lines = [
        "# DMS benchmark: byte-level stdlib LM, Hugging Face GPT-2",
        "",
        "Generated by `benchmarks/bench_dms_lm.py` (see its docstring for the variants and how compute is "
        "equalised). Loss: nats/byte on held-out stdlib files (lower is better).",
        "",
        f"Configuration: {json.dumps({k: v for k, v in cfg.items() if k not in ('corpus',)})}",
        "",
        "| target | variant | val loss (mean ± std) | accuracy % | FLOPs / full | FLOPs / target (min-max) | steps "
        "| training compute / full run | search / total | CPU s | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full_compute = None
    for label, g in s["groups"].items():
        if label.endswith("/full"):
            full_compute = g["total_flops"][0]
    for label, g in sorted(s["groups"].items(), key=lambda kv: (-float(kv[0].split("/")[0]), kv[0])):
        target, variant = label.split("/")
        frac = f"{g['search_fraction'][0]:.3f}" if "search_fraction" in g else ""
        compute = f"{g['total_flops'][0] / full_compute:.3f}" if full_compute else ""
        lo, hi = g["flops_over_target"]
        acc = f"{g['val_acc'][0]:.2f} ± {g['val_acc'][1]:.2f}" if "val_acc" in g else ""
        lines.append(
            f"| {target} | {variant} | {g['val_loss'][0]:.4f} ± {g['val_loss'][1]:.4f} | {acc} "
            f"| {g['flops_ratio'][0]:.3f} | {lo:.3f}-{hi:.3f} | {g['steps'][0]:.0f} | {compute} | {frac} "
            f"| {g['cpu_s'][0]:.0f} | {g['n']} |"
        )
    lines += [
        "",
        "## Paired differences (same seed; loss of the first minus the second, negative = first better)",
        "",
        "| pair | difference (mean ± std) | per seed | first better | accuracy points (first - second) "
        "| per seed | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, p in s["paired"].items():
        per = ", ".join(f"{d:+.4f}" for d in p["per_seed"])
        acc = f"{p['acc_diff'][0]:+.2f} ± {p['acc_diff'][1]:.2f}" if "acc_diff" in p else ""
        acc_per = ", ".join(f"{d:+.2f}" for d in p.get("acc_per_seed", []))
        lines.append(
            f"| {label} | {p['diff'][0]:+.4f} ± {p['diff'][1]:.4f} | {per} | {p['first_better']} | {acc} "
            f"| {acc_per} | {p['n']} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| target | variant | seed | val loss | accuracy % | FLOPs / target | steps | CPU s | embed | blocks "
        "| heads per block | MLP per block |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["runs"], key=lambda r: (-r["target"], r["variant"], r["seed"])):
        a = r.get("architecture")
        if a:
            lines.append(
                f"| {r['target']} | {r['variant']} | {r['seed']} | {r['val_loss']:.4f} "
                f"| {format(r['val_acc'], '.2f') if 'val_acc' in r else ''} | {r['flops_over_target']:.3f} "
                f"| {r['steps']} | {r.get('total_cpu_s', r['cpu_s']):.0f} | {a['dim']} | {a['layers']} "
                f"| {a['heads']} | {a['inner']} |"
            )
    errors = [r for r in result["runs"] if "error" in r]
    if errors:
        lines += ["", "## Runs that failed", ""]
        for r in errors:
            lines.append(f"- {r['target']} {r['variant']} seed {r['seed']}: {r['error']}")
    if result.get("baseline"):
        lines += baseline_markdown(result)
    if result.get("notes"):
        lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


def baseline_markdown(result: dict[str, Any]) -> list[str]:
    """The runs of ``result`` next to the same (target, variant, seed) runs of ``result["baseline"]`` (another
    JSON, e.g. the same recipe without ``--grad-clip``): what one setting changed, run by run."""
    base = result["baseline"]
    theirs = {(r["target"], r["variant"], r["seed"]): r for r in base["runs"] if "val_loss" in r}
    lines = [
        "",
        f"## Against `{base['file']}` (same target, variant and seed; its settings differ in {base['differs']})",
        "",
        "| target | variant | seed | val loss | baseline val loss | difference | accuracy % | baseline accuracy % "
        "| difference (points) | blocks, heads, MLP | baseline blocks, heads, MLP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def shape(r: dict[str, Any]) -> str:
        a = r["architecture"]
        return f"{a['layers']}, {a['heads']}, {a['inner']}" + ("" if a["dim"] == 64 else f" (width {a['dim']})")

    for r in sorted(result["runs"], key=lambda r: (-r["target"], r["variant"], r["seed"])):
        b = theirs.get((r["target"], r["variant"], r["seed"]))
        if b is None or "val_loss" not in r:
            continue
        lines.append(
            f"| {r['target']} | {r['variant']} | {r['seed']} | {r['val_loss']:.4f} | {b['val_loss']:.4f} "
            f"| {r['val_loss'] - b['val_loss']:+.4f} | {r['val_acc']:.2f} | {b['val_acc']:.2f} "
            f"| {r['val_acc'] - b['val_acc']:+.2f} | {shape(r)} | {shape(b)} |"
        )
    return lines


def screen_markdown(results: list[dict[str, Any]]) -> str:
    """What each search-only run (``--no-pipeline-a --no-pipeline-b``) exported, per setting and seed: the
    cheap first check of a search lever (does it find the shape?) before any paired training run."""
    lines = [
        "# DMS LM: what a cheaper search exports (search only, no training after it)",
        "",
        "Generated by `benchmarks/bench_dms_lm.py --part screen` from search-only runs (`--no-pipeline-a "
        "--no-pipeline-b`). Search cost in training steps of a model at exactly the target FLOPs (batch "
        "32, context 128; the search's FLOPs by `FlopCounterMode` at its own batch and context).",
        "",
        "| search steps | batch | context | arch_lr | seed | search cost (target-model steps) | blocks | heads "
        "| MLP | 2 blocks at width 64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        settings = result["config"]["settings"]
        lm = settings["lm"]
        full = forward_flops(make_gpt2(settings["supernet"], lm["context"]), lm["context"])
        for r in sorted(result["runs"], key=lambda r: r["seed"]):
            step = 3 * lm["batch_size"] * r["target"] * full
            a = r["architecture"]
            lines.append(
                f"| {r['search_steps']} | {r['search_batch_size']} | {r['search_context']} "
                f"| {r['arch_lr']:g} | {r['seed']} | {r['search_flops'] / step:.1f} | {a['layers']} | {a['heads']} "
                f"| {a['inner']} | {'yes' if a['layers'] == 2 else 'no'} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main
def _settings(result: dict[str, Any]) -> dict[str, Any]:
    """``result``'s settings, ``grad_clip`` 0 filled in for JSONs written before ``--grad-clip`` existed (they
    ran unclipped), so they still merge and resume with unclipped runs and never with clipped ones."""
    settings = result["config"]["settings"]
    settings["lm"].setdefault("grad_clip", 0.0)
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["run", "report", "screen"], default="run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["full", "dms", "uniform", "torch_pruning"],
        choices=["full", "dms", "uniform", "torch_pruning"],
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--epoch-steps", type=int, default=100)
    parser.add_argument("--search-epochs", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=LMConfig.lr)
    parser.add_argument("--val-windows", type=int, default=512)
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=0.0,
        help="clip the global gradient norm of the model's weights to this before each optimizer step, in every "
        "run (search, pipelines a and b, uniform, full, Torch-Pruning; DMS's architecture ratios are left out: "
        "LMConfig.grad_clip); 0 = off",
    )
    parser.add_argument(
        "--no-depth",
        action="store_true",
        help="DMS searches widths and heads only (no depth gates); its rows are dms_b_width / dms_a_width",
    )
    parser.add_argument("--no-pipeline-a", action="store_true", help="DMS: run pipeline b only")
    parser.add_argument(
        "--no-pipeline-b",
        action="store_true",
        help="DMS: search, export, then pipeline a only (the search stops one step after the export; the uniform "
        "model gets pipeline a's total compute)",
    )
    parser.add_argument(
        "--search-batch-size",
        type=int,
        default=None,
        help="windows per search step (pipeline a only; default: --batch-size)",
    )
    parser.add_argument(
        "--search-context",
        type=int,
        default=None,
        help="bytes per window during the search (pipeline a only; default: --context)",
    )
    parser.add_argument("--arch-lr", type=float, default=None, help="DMS arch_lr (default: the library's)")
    parser.add_argument(
        "--budget-steps",
        type=int,
        default=None,
        help="pipeline a only: total compute = this many training steps of a model at exactly the target FLOPs; "
        "pipeline a trains what the search leaves of it, the uniform model all of it (the search runs on a "
        "schedule of this many steps)",
    )
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="report: add the runs of these JSONs")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="report: also tabulate each run next to the same (target, variant, seed) run of this JSON",
    )
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out with this configuration")
    parser.add_argument("--out", type=Path, default=RESULTS / "dms_lm.json")
    args = parser.parse_args(argv)
    cheap = {args.search_batch_size, args.search_context, args.budget_steps} != {None}
    if cheap and not args.no_pipeline_b:
        parser.error("--search-batch-size, --search-context and --budget-steps are for pipeline a: add --no-pipeline-b")
    torch.set_num_threads(1)
    if args.part == "screen":  # the exports of search-only runs (--merge), one table
        results = [json.loads(path.read_text()) for path in args.merge]
        text = screen_markdown(results)
        args.out.with_suffix(".md").write_text(text)
        args.out.write_text(json.dumps({"searches": results}, indent=2))  # every merged run, in full
        print(text)
        return {}
    if args.part == "report":
        result = json.loads(args.out.read_text()) if args.out.exists() else None
        for path in args.merge:  # runs of other invocations with the same settings (e.g. one process per seed)
            other = json.loads(path.read_text())
            if result is None:
                result = other
                result["config"]["merged"] = [path.name]
                continue
            if _settings(other) != _settings(result):
                raise ValueError(f"{path} was run with other settings than {args.out}")
            keys = {(r["target"], r["variant"], r["seed"]) for r in other["runs"]}
            result["runs"] = [r for r in result["runs"] if (r["target"], r["variant"], r["seed"]) not in keys]
            result["runs"] += other["runs"]
            result["config"].setdefault("merged", []).append(path.name)
        result["summary"] = summarise(result["runs"])
        if args.baseline:
            base = json.loads(args.baseline.read_text())
            ours, theirs = _settings(result), _settings(base)
            differs = {
                k: [theirs.get(k), ours.get(k)] for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)
            }
            differs.update(
                {f"lm.{k}": [theirs["lm"].get(k), v] for k, v in ours["lm"].items() if theirs["lm"].get(k) != v}
            )
            differs.pop("lm", None)
            result["baseline"] = {
                "file": args.baseline.name,
                "differs": json.dumps(differs),
                "runs": [
                    {k: r.get(k) for k in ("target", "variant", "seed", "val_loss", "val_acc", "architecture")}
                    for r in base["runs"]
                ],
            }
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
        return result
    supernet = {"dim": args.dim, "layers": args.layers, "heads": args.heads, "inner": 4 * args.dim}
    config = LMConfig(
        dim=args.dim,
        heads=args.heads,
        context=args.context,
        batch_size=args.batch_size,
        steps=args.budget_steps or args.steps,
        lr=args.lr,
        val_windows=args.val_windows,
        grad_clip=args.grad_clip,
    )
    _, _, corpus = stdlib_corpus(config.corpus)
    settings = {
        "supernet": supernet,
        "lm": {k: v for k, v in asdict(config).items() if k not in ("depth", "dim", "heads", "corpus")},
        "epoch_steps": args.epoch_steps,
        "search_epochs": args.search_epochs,
        "search": {
            "batch_size": args.search_batch_size or args.batch_size,
            "context": args.search_context or args.context,
            "arch_lr": args.arch_lr,
            "budget_steps": args.budget_steps,
        },
    }
    result: dict[str, Any] = {"runs": []}
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        if _settings(old) == settings:
            result = old
    result["config"] = {
        "settings": settings,
        "corpus": corpus,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
    }
    done = {(r["target"], r["variant"], r["seed"]) for r in result["runs"]}

    def save(row: dict[str, Any]) -> None:
        result["runs"] = [
            r
            for r in result["runs"]
            if (r["target"], r["variant"], r["seed"]) != (row["target"], row["variant"], row["seed"])
        ] + [row]
        result["summary"] = summarise(result["runs"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))
        shown = (
            f"{row['val_loss']:.4f} (FLOPs/target {row['flops_over_target']:.3f}, {row['cpu_s']:.0f} CPU s)"
            if "val_loss" in row
            else row["error"]
        )
        print(f"seed {row['seed']} target {row['target']} {row['variant']}: {shown}", flush=True)

    start = time.perf_counter()
    for seed in args.seeds:
        if "full" in args.variants and (1.0, "full", seed) not in done:
            save({"seed": seed, "variant": "full", **run_full(supernet, config, seed, args.epoch_steps)})
        for target in args.targets:
            rows = {r["variant"]: r for r in result["runs"] if r["seed"] == seed and r["target"] == target}
            suffix = "_width" if args.no_depth else ""
            search_only = args.no_pipeline_a and args.no_pipeline_b  # the search and its export alone
            wanted = (set() if args.no_pipeline_b else {"dms_b" + suffix}) | (
                set() if args.no_pipeline_a else {"dms_a" + suffix}
            )
            if search_only:
                wanted = {"dms_search" + suffix}
            full_fwd = forward_flops(make_gpt2(supernet, config.context), config.context)
            step_at_target = 3 * config.batch_size * target * full_fwd
            budget_a = args.budget_steps * step_at_target if args.budget_steps else None
            if "dms" in args.variants and not wanted <= set(rows):
                row_b, row_a, _ = run_dms(
                    supernet,
                    config,
                    seed,
                    args.epoch_steps,
                    target,
                    args.search_epochs,
                    depth=not args.no_depth,
                    pipeline_a=not args.no_pipeline_a,
                    pipeline_b=not args.no_pipeline_b,
                    search_batch_size=args.search_batch_size,
                    search_context=args.search_context,
                    arch_lr=args.arch_lr,
                    budget=budget_a,
                )
                if search_only:
                    save({"seed": seed, "variant": "dms_search" + suffix, **row_b})
                    continue
                if row_b is not None:
                    save({"seed": seed, "variant": "dms_b" + suffix, **row_b})
                    rows["dms_b" + suffix] = row_b
                if row_a is not None:
                    save({"seed": seed, "variant": "dms_a" + suffix, **row_a})
                    rows["dms_a" + suffix] = row_a
            b = rows.get("dms_b") or rows.get("dms_a")  # without b: a's search + training is the budget
            flops_to = b["forward_flops"] if b else target * full_fwd
            budget = budget_a or (b["total_flops"] if b else None)
            if "uniform" in args.variants and (target, "uniform", seed) not in done and budget is not None:
                save(
                    {
                        "seed": seed,
                        "variant": "uniform",
                        **run_uniform(supernet, config, seed, args.epoch_steps, target, flops_to, budget),
                    }
                )
            if "torch_pruning" in args.variants and (target, "torch_pruning", seed) not in done:
                try:
                    row = run_torch_pruning(
                        supernet, config, seed, args.epoch_steps, target, flops_to, args.search_epochs
                    )
                except Exception as err:  # reported in the results, not hidden
                    traceback.print_exc()
                    row = {"target": target, "error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
                save({"seed": seed, "variant": "torch_pruning", **row})
    result["config"]["wall_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
