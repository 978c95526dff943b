"""Curvature estimation against the real PyHessian and curvlinops packages, in the same run, on the same model,
loss and batch.

For each model shape (``vit4``: timm ViT, 4 blocks, embed 64; ``deit``: the DeiT-tiny shape, 6 blocks, embed 192;
both on 32x32 images, patch 8, 10 classes, batch 32, cross-entropy) and each of ``--seeds`` seeds (model init and
batch), one process measures, interleaved round by round so that every method sees the same machine load:

* a training step (forward + backward + AdamW);
* **ours, default**: ``hutchinson_trace`` over the discovered blocks on a ``HessianOperator`` (double backward,
  one graph build per call, probes looped), ``--probes`` probes per call;
* **ours, forward-over-reverse**: the same with ``backend="forward_over_reverse"``, ``probe_chunk=8`` (vmapped
  ``jvp(grad)`` in chunks of 8 probes: the "chunked vmapped forward-over-reverse" lever);
* **PyHessian** (the ``pyhessian`` package): ``hessian(model, criterion, data=(x, y))`` (its constructor builds the
  gradient graph once), then per probe PyHessian's own Rademacher draw and ``hessian_vector_product`` on that graph,
  each probe's value read per block with its ``group_product`` (PyHessian's single-batch ``trace()`` loop,
  reading per-block values as well); and ``hessian.trace(maxIter=probes, tol=0)`` as the library ships it
  (whole model only);
* **curvlinops** (``curvlinops-for-pytorch``): ``HessianLinearOperator(model, CrossEntropyLoss(), params,
  [(x, y)], check_deterministic=False) @ V`` for ``V`` of ``--probes`` Rademacher columns (vmapped
  forward-over-reverse over all columns at once), per-block values read from the product;
* **ours, empirical Fisher** (a *different quantity*, opt-in): ``empirical_fisher_trace``, per-sample squared
  gradient norms per block, exact for the batch (its standard error is over samples, not probes);
* a **hand-written** baseline (not a library): a fresh forward and ``create_graph`` backward for *every* probe.
  It is expected to be slower than everything else: it is here to show the benchmark tells methods apart.

The figure that matters is the **time to per-block traces of 10 % relative standard error**. Every method above
draws Rademacher probes of the same Hessian, so the number of probes a block needs, ``n_B = (cv_B / 0.1)^2`` with
``cv_B = std / |mean|`` of one probe's value ``v^T (Hv)_B``, is the same for all of them; it is measured from
``--cv-probes`` probes. The target is every residual block (``blocks.*``; ``stem`` and ``head`` are listed too,
but at initialisation the head's trace is near zero and no method gets it to 10 % in reasonable time). Each
method's time to target = its setup (graph build) + ``n`` probes at its measured cost per probe (whole chunks for
vmapped methods). The same with ``n`` of the median residual block is reported as well. Variance reduction changes
``n``: the library's opt-in Hutch++-style deflation (``hutchinson_trace(..., deflation_rank=k)``: a rank-``k`` range
sketch ``Q = orth(H S)``, exact ``tr(D_B Q Q^T H)`` per block, Hutchinson on the rest) is run on every seed with
``--cv-probes`` probes; its time to target = graph build + ``2k`` sketch products + ``n_deflated`` probes, each at
the default probe cost plus the measured projection overhead.

Further levers, measured on the same probes (each kept in the library only if it pays; see
``benchmarks/results/curvature_levers.md``):

* **batched probes** (``--batched-chunks 4,8``): ``chunk`` probes per reverse-over-reverse call
  (``torch.autograd.grad(..., is_grads_batched=True)``, vmap over probes) against one probe per call; per-probe
  time ratio, and whether the vmapped path really ran (it falls back to a loop when an op has no batching rule).
* **control variates** (``--control-variates ef,ggn``): with ``G = A A^T / N`` of low rank, per block
  ``z_B^T (Hz)_B - c_B (z_B^T (Gz)_B - tr(G_BB))`` is unbiased for ``tr(H_BB)`` for any ``c_B`` independent of the
  probe. ``z_B^T (Gz)_B = (1/N) sum_m (A_m,B . z_B)(A_m . z)`` costs dot products only and ``tr(G_BB)`` is exact.
  ``ef``: the empirical Fisher (``A`` = per-sample gradients, one vmapped backward). ``ggn``: the exact
  Gauss-Newton matrix of softmax cross-entropy (``A`` = per-sample gradients for every label ``c`` scaled by
  ``sqrt(p_c)``: C vmapped backwards). ``c_B = 1`` and ``c_B`` = the regression coefficient over the *other*
  probes (leave-one-out, so each value stays unbiased). Time to target = graph build + the per-sample gradients +
  ``n_cv`` probes at the default probe cost plus the measured dot-product overhead.
* **cross-block share** (``--block-only-probes 8``): variance of ``z_B^T H_BB z_B`` with probes zero outside
  the block over that of a full-space probe: what is left once the cross-block coupling is removed. Removing it
  exactly costs one product per block, so the per-product ratio is that share times the number of blocks.

Top eigenvalue (``--eigen``): a quadratic loss ``0.5 theta^T A theta`` with a known spectrum (top eigenvalue 10,
second ``10 * ratio``, a bulk in [-3, 5)), 40 seeds per ratio, through the real autograd paths of each library:
our default (Lanczos, residual stop), PyHessian's ``eigenvalues()`` defaults (power iteration, 100 iterations,
relative change < 1e-3), our old default (power iteration, 20 iterations), and curvlinops' ``to_scipy()`` with
``scipy.sparse.linalg.eigsh(k=1, which="LM", tol=1e-3)``. Counted: seeds within 1 % of the exact value, and
Hessian-vector products used.

Adaptive restricted probes (``--adaptive``: a replay with measured variances and probe costs, because 10 % at
initialisation needs thousands to millions of probes; ``--adaptive-direct``: real runs, no replay). The direct mode
trains each seed's model ``--train-steps`` AdamW steps on a learnable synthetic task (class patterns plus noise) so
that the traces are away from zero, then, on one held-out batch, in one process and in an order rotated per seed,
runs to ``--direct-rtol`` relative standard error on every residual block: real PyHessian (its ``hessian(...)``
constructor, its own Rademacher draw, ``hessian_vector_product`` and per-block ``group_product``, the library's
stopping rule checked every 4 probes), ours plain ``hutchinson_trace(..., rtol)`` and ours ``adaptive=True``; each
timed from graph build to estimate, at most ``--direct-cap`` probes (reported when hit).

Only ratios measured in the same run are meaningful (the machine is shared). Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_curvature.py            # CPU, ~10 min
    python benchmarks/bench_curvature.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_depthgrow.curvature import (
    HessianOperator,
    TraceEstimate,
    discover_blocks,
    empirical_fisher_trace,
    estimate_curvature,
    hutchinson_trace,
    rademacher,
    top_eigenvalue,
)

RESULTS = Path(__file__).resolve().parent / "results" / "curvature.json"
SHAPES = {
    "vit4": dict(embed_dim=64, depth=4, num_heads=2),
    "deit": dict(embed_dim=192, depth=6, num_heads=3),
}
TARGET_RSE = 0.1
CHUNK = 8  # probes per vmapped call (ours forward-over-reverse, curvlinops)


def make_model(shape: str, seed: int, device: str) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, **SHAPES[shape]
    )
    return model.to(device).train()


def make_batch(batch_size: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Median wall time of each ``fn()``: one warm-up each, then ``repeats`` rounds that run every fn once."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Layout:
    """Blocks of the model as parameter indices and as slices of the flattened parameter vector."""

    def __init__(self, model: nn.Module) -> None:
        groups = discover_blocks(model)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        position = {n: i for i, n in enumerate(self.names)}
        self.index = {b: [position[n] for n in members] for b, members in groups.items()}
        self.dim = sum(p.numel() for p in self.params)
        offsets, start = [], 0
        for p in self.params:
            offsets.append((start, start + p.numel()))
            start += p.numel()
        self.offsets = offsets
        self.targets = [b for b in self.index if b.startswith("blocks.")]


def train_step_fn(model: nn.Module, batch: tuple):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()

    return step


def ours_fn(model: nn.Module, batch: tuple, layout: Layout, backend: str, probes: int, chunk: int):
    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with HessianOperator(model, loss_fn, [batch], layout.names, backend, probe_chunk=chunk) as op:
            hutchinson_trace(op, layout.index, probes, generator=generator, chunk_size=chunk)

    return run


def graph_build_fn(model: nn.Module, batch: tuple, layout: Layout):
    """Our setup: forward + ``create_graph`` backward (what one estimate call does once)."""

    def run() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            torch.autograd.grad(loss_fn(model, batch), layout.params, create_graph=True)

    return run


def pyhessian_fns(model: nn.Module, batch: tuple, layout: Layout, probes: int):
    """(PyHessian constructor = its graph build; per-block probes on its graph; its own ``trace()``)."""
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product

    criterion = nn.CrossEntropyLoss()
    holder: dict = {}

    def setup() -> None:
        holder.pop("h", None)
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH):  # any double backward through attention needs the math kernel
            holder["h"] = hessian(model, criterion, data=batch, cuda=batch[0].is_cuda)
        model.train()  # PyHessian switches to eval(); these models have no dropout, so it is the same function

    def per_block() -> None:
        h = holder["h"]
        for _ in range(probes):
            v = [torch.randint_like(p, high=2) for p in h.params]  # PyHessian's trace(): Rademacher draw
            for v_i in v:
                v_i[v_i == 0] = -1
            hv = hessian_vector_product(h.gradsH, h.params, v)
            for idx in layout.index.values():
                group_product([hv[i] for i in idx], [v[i] for i in idx]).item()

    def own_trace() -> None:
        # tol=-inf: never stops early (with tol=0 it stops at once when its running mean is negative).
        holder["h"].trace(maxIter=probes, tol=-math.inf)

    def cleanup() -> None:
        holder.clear()
        model.zero_grad(set_to_none=True)  # PyHessian leaves graph-attached .grad behind

    return setup, per_block, own_trace, cleanup


def curvlinops_fn(model: nn.Module, batch: tuple, layout: Layout, probes: int):
    from curvlinops import HessianLinearOperator

    with sdpa_kernel(SDPBackend.MATH):
        operator = HessianLinearOperator(
            model, nn.CrossEntropyLoss(), layout.params, [batch], check_deterministic=False
        )
    g = torch.Generator().manual_seed(0)

    def run() -> None:
        done = 0
        while done < probes:
            k = min(CHUNK, probes - done)
            v = (torch.randint(0, 2, (layout.dim, k), generator=g) * 2 - 1).to(batch[0].device, torch.float32)
            with sdpa_kernel(SDPBackend.MATH):
                hv = operator @ v
            prod = (hv * v).sum(1)
            for idx in layout.index.values():
                sum(prod[layout.offsets[i][0] : layout.offsets[i][1]].sum() for i in idx).item()
            done += k

    return run


def fisher_fn(model: nn.Module, batch: tuple):
    def run() -> None:
        empirical_fisher_trace(model, loss_fn, [batch])

    return run


def handwritten_fn(model: nn.Module, batch: tuple, layout: Layout, probes: int):
    """Not a library: a fresh forward and ``create_graph`` backward for every probe."""

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(probes):
                v = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in layout.params]
                grads = torch.autograd.grad(loss_fn(model, batch), layout.params, create_graph=True)
                hv = torch.autograd.grad(grads, layout.params, grad_outputs=v)
                for idx in layout.index.values():
                    sum((hv[i] * v[i]).sum() for i in idx).item()

    return run


def probe_values(model: nn.Module, batch: tuple, layout: Layout, n: int, seed: int) -> dict[str, list[float]]:
    with HessianOperator(model, loss_fn, [batch], layout.names) as op:
        est = hutchinson_trace(op, layout.index, n, generator=torch.Generator().manual_seed(10_000 + seed))
    return {b: list(t.values) for b, t in est.items()}


def probes_needed(values: list[float], mean: float | None = None) -> float:
    """``(std / (0.1 |mean|))^2``: probes for a 10 % relative standard error. ``mean`` (default: of ``values``)
    lets two unbiased estimators of the same trace share one mean, so that their ratio is their variance ratio."""
    mean = statistics.fmean(values) if mean is None else mean
    std = statistics.stdev(values)
    return math.inf if mean == 0 else (std / (TARGET_RSE * abs(mean))) ** 2


def deflated_values(model: nn.Module, batch: tuple, layout: Layout, n: int, rank: int, seed: int) -> dict:
    """Per-block probe values of the library's Hutch++-style estimator (``deflation_rank=rank``)."""
    with HessianOperator(model, loss_fn, [batch], layout.names) as op:
        generator = torch.Generator().manual_seed(20_000 + seed)
        est = hutchinson_trace(op, layout.index, n, generator=generator, deflation_rank=rank)
    return {b: list(t.values) for b, t in est.items()}


def projection_fn(layout: Layout, rank: int, device: str):
    """The per-probe overhead of deflation: ``h - (h Q^T) Q`` over all parameters, without any product."""
    g = torch.Generator().manual_seed(0)
    basis = [torch.randn(rank, p.numel(), generator=g).to(device) for p in layout.params]
    products = [torch.randn(1, p.numel(), generator=g).to(device) for p in layout.params]

    def run() -> None:
        coefficients = sum(h @ q.T for h, q in zip(products, basis))
        [h - coefficients @ q for h, q in zip(products, basis)]

    return run


def batched_fn(model: nn.Module, batch: tuple, layout: Layout, probes: int, chunk: int, holder: dict):
    """Ours, double backward with ``chunk`` probes per reverse-over-reverse call
    (``torch.autograd.grad(..., is_grads_batched=True)``); records whether the vmapped path really ran."""

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with HessianOperator(model, loss_fn, [batch], layout.names, probe_chunk=chunk) as op:
            hutchinson_trace(op, layout.index, probes, generator=generator, chunk_size=chunk)
            holder[chunk] = op._batched_ok

    return run


def per_sample_gradients(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[N, P]``: row ``i`` is the gradient of sample ``i``'s cross-entropy with label ``labels[i]``
    (``torch.func.vmap`` of ``grad`` over the samples: one vmapped backward)."""
    from torch.func import functional_call, grad, vmap

    primals = {n: p.detach() for n, p in zip(layout.names, layout.params)}

    def sample_loss(theta: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    with sdpa_kernel(SDPBackend.MATH):
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(primals, x, labels)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in layout.names], dim=1)


def control_variate_factors(model: nn.Module, batch: tuple, layout: Layout, kind: str):
    """Yield ``[M_j, P]`` pieces of a factor ``A`` with ``G = A A^T / N`` (N = batch size), one piece at a time.

    ``"ef"``: the empirical Fisher, rows = per-sample gradients (M = N). ``"ggn"``: the exact Gauss-Newton matrix of
    softmax cross-entropy, ``(1/N) sum_i sum_c p_ic g_i(c) g_i(c)^T`` with ``g_i(c)`` sample ``i``'s gradient for
    label ``c`` (``diag(p) - p p^T = sum_c p_c (p - e_c)(p - e_c)^T``): one piece of N rows per class (M = N C).
    """
    x, y = batch
    if kind == "ef":
        yield per_sample_gradients(model, x, y, layout)
        return
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        probs = torch.softmax(model(x), dim=-1)
    for c in range(probs.shape[1]):
        labels = torch.full_like(y, c)
        yield per_sample_gradients(model, x, labels, layout) * probs[:, c : c + 1].sqrt()


def control_variate_setup_fn(model: nn.Module, batch: tuple, layout: Layout, kind: str):
    """What an estimate would pay once for the control variate: the factor ``A`` (per-sample gradients)."""

    def run() -> None:
        for piece in control_variate_factors(model, batch, layout, kind):
            del piece

    return run


def control_variate_overhead_fn(layout: Layout, rows: int, device: str):
    """Per-probe overhead of a control variate with ``rows`` factor rows: ``A_B z_B`` for every block (the factor
    kept as one contiguous ``[rows, |B|]`` matrix per block, one matrix-vector product each), their sum ``A z`` and
    the per-block dot products (no Hessian product)."""
    g = torch.Generator().manual_seed(0)
    sizes = [sum(layout.params[i].numel() for i in idx) for idx in layout.index.values()]
    factors = [torch.randn(rows, size, generator=g).to(device) for size in sizes]
    pieces = [(torch.randint(0, 2, (size,), generator=g) * 2 - 1).to(device, torch.float32) for size in sizes]

    def run() -> None:
        per_block = [(a @ z).double() for a, z in zip(factors, pieces)]
        u = sum(per_block)
        [float((ub * u).sum()) for ub in per_block]

    return run


def control_variate_values(model: nn.Module, batch: tuple, layout: Layout, n: int, seed: int, kind: str) -> tuple:
    """Per block, ``z_k,B^T (G z_k)_B`` for the same ``n`` probes as :func:`probe_values`, and ``tr(G_BB)`` exactly."""
    shapes = [p.shape for p in layout.params]
    probes = rademacher(shapes, n, torch.float32, batch[0].device, torch.Generator().manual_seed(10_000 + seed))
    z = torch.cat([v.reshape(n, -1) for v in probes], dim=1)  # [n, P], probe k of probe_values
    del probes
    spans = {b: [layout.offsets[i] for i in idx] for b, idx in layout.index.items()}
    quad = {b: torch.zeros(n, dtype=torch.float64) for b in spans}
    trace = {b: 0.0 for b in spans}
    size = batch[0].shape[0]
    for piece in control_variate_factors(model, batch, layout, kind):
        u = (piece @ z.T).double()  # [M_j, n]
        for b, span in spans.items():
            ub = sum(piece[:, a:c] @ z[:, a:c].T for a, c in span).double()
            quad[b] += (ub * u).sum(0).cpu() / size
            trace[b] += sum(float(piece[:, a:c].double().pow(2).sum()) for a, c in span) / size
    return {b: q.tolist() for b, q in quad.items()}, trace


def block_pair_values(model: nn.Module, batch: tuple, layout: Layout, n: int, seed: int) -> dict[str, dict]:
    """``[b][c]``: per probe, ``z_b^T (H z_c)_b`` with ``z_c`` the probe restricted to block ``c`` (one product per
    block per probe; the first ``n`` probes of :func:`probe_values`). ``b == c``: the block-only value, of variance
    ``2 ||offdiag H_bb||_F^2``; ``b != c``: mean zero, mean square ``||H_bc||_F^2``. A full-space probe's variance
    is their sum, ``2 ||offdiag H_bb||_F^2 + sum_c ||H_bc||_F^2``."""
    out: dict[str, dict[str, list[float]]] = {b: {c: [] for c in layout.index} for b in layout.index}
    generator = torch.Generator().manual_seed(10_000 + seed)
    with HessianOperator(model, loss_fn, [batch], layout.names) as op:
        for _ in range(n):
            z = rademacher(op.param_shapes, 1, op.dtype, op.device, generator)
            for c, idx in layout.index.items():
                inside = set(idx)
                hz = op.matmat([v if i in inside else torch.zeros_like(v) for i, v in enumerate(z)])
                for b, idx_b in layout.index.items():
                    out[b][c].append(math.fsum(float((z[i].double() * hz[i].double()).sum()) for i in idx_b))
    return out


def best_sign_design(pairs: dict, full_var: dict, needed: dict, targets: list[str], groups: int) -> dict:
    """The best assignment of blocks to ``groups`` sign groups for a shared-probe design, chosen on the data
    (optimistic: selection on the same probes).

    ``groups`` products ``H (sum_g s_kg z_g)`` with orthogonal ``+-1`` patterns ``s`` over the groups, sharing one
    probe ``z``, give per block ``z_b^T H_bb z_b + sum_{c in b's group} z_b^T H_bc z_c``: the coupling to other
    groups cancels exactly. Per product its variance is ``groups * (var_only_b + sum_same-group ||H_bc||^2)`` against
    ``var_full_b`` for plain Hutchinson. Returned: the best assignment for the worst target block and, separately,
    for the median one, with their products to target over plain Hutchinson's."""
    import itertools

    blocks = list(pairs)
    var_only = {b: statistics.variance(pairs[b][b]) for b in blocks}
    mass = {b: {c: statistics.fmean(v * v for v in pairs[b][c]) for c in blocks if c != b} for b in blocks}
    best: dict[str, tuple] = {}
    for tail in itertools.product(range(groups), repeat=len(blocks) - 1):
        group = dict(zip(blocks, (0, *tail)))
        ratio = {
            b: groups * (var_only[b] + sum(m for c, m in mass[b].items() if group[c] == group[b])) / full_var[b]
            for b in blocks
        }
        scores = {
            "worst": max(needed[b] * ratio[b] for b in targets) / max(needed[b] for b in targets),
            "median": statistics.median(needed[b] * ratio[b] for b in targets)
            / statistics.median(needed[b] for b in targets),
        }
        for key, score in scores.items():
            if key not in best or score < best[key][0]:
                best[key] = (score, group, ratio)
    return {
        "products_to_target_over_plain": best["worst"][0],
        "groups_for_worst_block": best["worst"][1],
        "variance_per_product_over_plain_per_block": best["worst"][2],
        "products_to_target_median_block_over_plain": best["median"][0],
        "groups_for_median_block": best["median"][1],
    }


def lagging_block_model(record: dict) -> dict:
    """Modelled (not run) products to 10 % RSE when, once every residual block but the hardest has converged, the
    probes are restricted to the hardest block: plain probes until the second-hardest block needs no more, then
    block-only probes (variance measured under ``block_only``) until the stratified standard error of the hardest
    block's mean reaches 10 %. Returned over plain Hutchinson's products for that block."""
    need = record["probes_needed_per_block"]
    targets = sorted((b for b in need if b.startswith("blocks.")), key=lambda b: need[b])
    worst = targets[-1]
    n1 = math.ceil(need[targets[-2]])
    full = record["block_stats"][worst]["std_plain"] ** 2
    only = record["block_only"]["variance_block_only_over_full_space_per_block"][worst] * full
    goal = (TARGET_RSE * record["block_stats"][worst]["pooled_mean"]) ** 2
    lo, hi = 0, 10**12
    while lo < hi:  # smallest n2 with (n1 full + n2 only) / (n1 + n2)^2 <= goal
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if (n1 * full + mid * only) <= goal * (n1 + mid) ** 2 else (mid + 1, hi)
    return {
        "block": worst,
        "plain_probes": n1,
        "restricted_probes": lo,
        "products_over_plain": (n1 + lo) / math.ceil(need[worst]),
    }


def antithetic_holdout(args: argparse.Namespace) -> None:
    """Held-out check of the best 2-group sign designs stored in ``args.antithetic_holdout`` (a curvature.json).

    The splits were chosen on the stored block-pair probes; here fresh probes (another generator stream) are
    used in antithetic pairs ``z`` and ``z'`` (``z`` with the signs of one group flipped), each pair's value is the
    mean of its two probes' values, and the products to 10 % RSE (two per pair) are compared with plain
    Hutchinson's from the stored run (same model, batch and pooled mean)."""
    stored = json.loads(args.antithetic_holdout.read_text())
    out: dict = {"source": str(args.antithetic_holdout), "pairs": args.holdout_pairs, "shapes": {}}
    for shape, result in stored["shapes"].items():
        rows = []
        for record in result["seeds"]:
            seed = record["seed"]
            model = make_model(shape, seed, args.device)
            batch = make_batch(args.batch_size, seed, args.device)
            layout = Layout(model)
            pooled = {b: s["pooled_mean"] for b, s in record["block_stats"].items()}
            needed = record["probes_needed_per_block"]
            targets = layout.targets
            row: dict = {"seed": seed}
            for criterion in ("worst", "median"):
                groups = record["block_only"]["best_2_group_design"][f"groups_for_{criterion}_block"]
                flip = {i for b, idx in layout.index.items() if groups[b] == 1 for i in idx}
                generator = torch.Generator().manual_seed(30_000 + seed)
                pair_values: dict[str, list[float]] = {b: [] for b in layout.index}
                with HessianOperator(model, loss_fn, [batch], layout.names) as op:
                    for _ in range(args.holdout_pairs):
                        z = rademacher(op.param_shapes, 1, op.dtype, op.device, generator)
                        z2 = [-v if i in flip else v for i, v in enumerate(z)]
                        values = []
                        for probe in (z, z2):
                            hz = op.matmat(probe)
                            values.append(
                                {
                                    b: math.fsum(float((probe[i].double() * hz[i].double()).sum()) for i in idx)
                                    for b, idx in layout.index.items()
                                }
                            )
                        for b in layout.index:
                            pair_values[b].append(0.5 * (values[0][b] + values[1][b]))
                products = {b: 2 * probes_needed(pair_values[b], pooled[b]) for b in layout.index}
                row[criterion] = {
                    "groups": groups,
                    "products_to_target_over_plain": max(products[b] for b in targets)
                    / max(needed[b] for b in targets),
                    "products_to_target_median_block_over_plain": statistics.median(products[b] for b in targets)
                    / statistics.median(needed[b] for b in targets),
                    "variance_per_product_over_plain_per_block": {
                        b: 2 * statistics.variance(pair_values[b]) / record["block_stats"][b]["std_plain"] ** 2
                        for b in layout.index
                    },
                }
            row["lagging_block_model"] = lagging_block_model(record)
            rows.append(row)
            print(
                f"[{shape} seed {seed}] held-out antithetic pairs, products to target / plain: split for the worst "
                f"block {row['worst']['products_to_target_over_plain']:.2f}, split for the median block (median) "
                f"{row['median']['products_to_target_median_block_over_plain']:.2f}"
            )
        out["shapes"][shape] = {
            "seeds": rows,
            "summary": {
                "products_to_target_over_plain[split for the worst block]": mean_std(
                    [r["worst"]["products_to_target_over_plain"] for r in rows]
                ),
                "products_to_target_median_block_over_plain[split for the median block]": mean_std(
                    [r["median"]["products_to_target_median_block_over_plain"] for r in rows]
                ),
                "products_to_target_over_plain[modelled: restricted probes for the lagging block]": mean_std(
                    [r["lagging_block_model"]["products_over_plain"] for r in rows]
                ),
            },
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")


def adaptive_schedule(
    need: dict[str, float], fraction, check_every: int = 4, min_phase: int = 16
) -> list[tuple[tuple[str, ...] | None, int]]:
    """Replay of ``hutchinson_trace(..., rtol=0.1, adaptive=True)`` over the blocks of ``need`` with their true
    variances: the phases it runs, as ``(support, probes)`` (support ``None``: full-space probes).

    ``need[b]``: plain probes block ``b`` needs for 10 % (``var_full / (0.1 tr)^2``); ``fraction(b, S)``: the
    variance of ``b``'s value under probes zero outside the blocks ``S``, over the full-space one. A block has
    converged once its stratified error ``sum_k n_k var_k / N^2`` is below ``(0.1 tr)^2``, i.e.
    ``N^2 >= need_b * sum_k n_k f_k``. Checks every ``check_every`` probes; a new phase (support = the lagging
    blocks) starts at a check once the current one has ``min_phase`` probes, as in the library."""
    blocks = list(need)
    done = {b: [0.0, 0.0] for b in blocks}  # N_b and sum_k n_k f_k
    lagging, support, phases, phase_n = set(blocks), None, [], 0

    def probes_until_converged(b: str) -> int:
        f, (n, a) = fraction(b, support), done[b]
        # smallest x >= 0 with (n + x)^2 >= need (a + x f): x^2 + (2n - need f) x + n^2 - need a >= 0
        q, c = 2 * n - need[b] * f, n * n - need[b] * a
        x = 0.0 if c >= 0 and q >= 0 else (-q + math.sqrt(max(q * q - 4 * c, 0.0))) / 2
        return max(check_every, math.ceil(x / check_every) * check_every)

    while lagging:
        step = min(probes_until_converged(b) for b in lagging)
        if phase_n < min_phase:
            step = min(step, math.ceil((min_phase - phase_n) / check_every) * check_every)
        active = blocks if support is None else support
        for b in active:
            done[b][0] += step
            done[b][1] += step * fraction(b, support)
        phase_n += step
        if phases and phases[-1][0] == (None if support is None else tuple(support)):
            phases[-1] = (phases[-1][0], phases[-1][1] + step)
        else:
            phases.append((None if support is None else tuple(support), step))
        lagging = {b for b in lagging if done[b][0] ** 2 < need[b] * done[b][1]}
        if lagging and phase_n >= min_phase and len(lagging) < len(active):
            support, phase_n = sorted(lagging), 0
    return phases


def replay_validation(seeds: int = 100) -> dict:
    """The replay against the estimator itself, where both can run: a dense 60 x 60 matrix of four blocks shaped
    like a ViT's at initialisation (a hub of large trace coupled to every block, small traces elsewhere; the
    matrix of ``tests/test_curvature_adaptive.py``), exact variances for the replay, ``seeds`` real runs of
    ``hutchinson_trace(..., adaptive=True)`` and of plain rtol, products counted."""
    from lightning_depthgrow.curvature import DenseOperator

    g = torch.Generator().manual_seed(0)
    n, size = 60, 15
    a = 0.15 * torch.randn(n, n, generator=g, dtype=torch.float64)
    a[:size, size:] += 0.6 * torch.randn(size, n - size, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    a += torch.diag(torch.tensor([3.0] * size + [0.6] * size + [0.35] * size + [0.2] * size, dtype=torch.float64))
    names = ["hub", "b1", "b2", "b3"]
    part = {b: slice(size * i, size * (i + 1)) for i, b in enumerate(names)}
    only = {
        b: 2 * (a[part[b], part[b]] - torch.diag(a[part[b], part[b]].diagonal())).pow(2).sum().item() for b in names
    }
    mass = {b: {c: a[part[b], part[c]].pow(2).sum().item() for c in names if c != b} for b in names}
    trace = {b: a[part[b], part[b]].trace().item() for b in names}
    full = {b: only[b] + sum(mass[b].values()) for b in names}

    def fraction(b: str, support) -> float:
        return 1.0 if support is None else (only[b] + sum(m for c, m in mass[b].items() if c in support)) / full[b]

    op = DenseOperator(a, [(size,)] * 4)
    blocks = {b: [i] for i, b in enumerate(names)}
    out = {}
    for rtol in (0.1, 0.05):
        need = {b: full[b] / (rtol * trace[b]) ** 2 for b in names}
        replayed = sum(count for _, count in adaptive_schedule(need, fraction))
        real = {}
        for adaptive in (False, True):
            used = []
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                est = hutchinson_trace(
                    op, blocks, 10**7, rtol=rtol, generator=generator, chunk_size=4, adaptive=adaptive
                )
                used.append(max(t.num_probes for t in est.values()))
            real["adaptive" if adaptive else "plain"] = statistics.fmean(used)
        out[str(rtol)] = {
            "replayed_adaptive_products": replayed,
            "run_adaptive_products_mean": real["adaptive"],
            "replayed_plain_products": max(math.ceil(v / 4) * 4 for v in need.values()),
            "run_plain_products_mean": real["plain"],
            "seeds": seeds,
        }
        print(f"[replay check, rtol {rtol}] {out[str(rtol)]}")
    return out


def probe_fn(op: HessianOperator, index: dict, blocks: tuple[str, ...] | None, probes: int):
    """What one probe of ``hutchinson_trace`` costs on support ``blocks`` (``None``: full space): the Rademacher draw,
    the product (``matmat`` or ``matmat_subset``, i.e. ``grad(g_S . v_S, params_S)``) and the per-block dots."""
    support = list(range(len(op.param_shapes))) if blocks is None else sorted({i for b in blocks for i in index[b]})
    shapes = [op.param_shapes[i] for i in support]
    read = list(index) if blocks is None else list(blocks)
    row = {param: r for r, param in enumerate(support)}
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        for _ in range(probes):
            v = rademacher(shapes, 1, op.dtype, op.device, generator)
            hv = op.matmat(v) if blocks is None else op.matmat_subset(v, support)
            dots = torch.stack([(h.mul_(x)).sum(dtype=torch.float64) for x, h in zip(v, hv)])
            [float(dots[[row[i] for i in index[b]]].sum()) for b in read]

    return run


def bench_adaptive(shape: str, args: argparse.Namespace) -> dict:
    """Time to per-block traces at 10 % relative standard error on every residual block: PyHessian, ours plain and
    ours adaptive (``hutchinson_trace(..., adaptive=True)``).

    10 % needs 10^3-10^7 probes per block at initialisation (hours to days per seed on CPU), so no method is run to
    it. Measured per seed: each block's full-space probe variance (``--cv-probes`` probes, as the main benchmark),
    the share of it that each other block's coupling carries (``--block-only-probes`` probes x blocks, as the main
    benchmark's ``block_only``), and, interleaved round by round in one process, the cost of a PyHessian probe, of
    our full-space probe and of our probe on every support the adaptive schedule uses. The adaptive schedule is then
    replayed with those variances (:func:`adaptive_schedule`: the library's rule, exact variances), and each time to
    target is setup + probes x measured cost."""
    per_seed = []
    for seed in range(args.seeds):
        model = make_model(shape, seed, args.device)
        batch = make_batch(args.batch_size, seed, args.device)
        layout = Layout(model)
        values = probe_values(model, batch, layout, args.cv_probes, seed)
        need = {b: probes_needed(values[b]) for b in layout.targets}
        pairs = block_pair_values(model, batch, layout, args.block_only_probes, seed)
        only = {b: statistics.variance(pairs[b][b]) for b in layout.targets}
        mass = {b: {c: statistics.fmean(v * v for v in pairs[b][c]) for c in layout.index if c != b} for b in only}

        def fraction(b: str, support, only=only, mass=mass) -> float:
            if support is None:
                return 1.0
            return (only[b] + sum(m for c, m in mass[b].items() if c in support)) / (only[b] + sum(mass[b].values()))

        phases = adaptive_schedule(need, fraction)
        n_plain = max(math.ceil(need[b] / 4) * 4 for b in layout.targets)
        pyh_setup, pyh_probes, _, pyh_cleanup = pyhessian_fns(model, batch, layout, args.probes)
        pyh_setup()
        op = HessianOperator(model, loss_fn, [batch], layout.names)
        targets = {b: layout.index[b] for b in layout.targets}
        fns = {
            "ours_graph_build": graph_build_fn(model, batch, layout),
            "pyhessian_setup": pyh_setup,
            "pyhessian_probes": pyh_probes,
            "ours_probes_full": probe_fn(op, layout.index, None, args.probes),
        }
        for support, _ in phases:
            if support is not None:
                fns[f"ours_probes[{','.join(support)}]"] = probe_fn(op, targets, support, args.probes)
        seconds = timed_interleaved(fns, args.device, args.repeats)
        op.close()
        pyh_cleanup()
        per_probe = {name: t / args.probes for name, t in seconds.items() if "probes" in name}
        cost = {
            None if support is None else support: per_probe[
                "ours_probes_full" if support is None else f"ours_probes[{','.join(support)}]"
            ]
            for support, _ in phases
        }
        to_target = {
            "pyhessian": seconds["pyhessian_setup"] + n_plain * per_probe["pyhessian_probes"],
            "ours_plain": seconds["ours_graph_build"] + n_plain * per_probe["ours_probes_full"],
            "ours_adaptive": seconds["ours_graph_build"] + sum(n * cost[support] for support, n in phases),
        }
        n_adaptive = sum(n for _, n in phases)
        record = {
            "seed": seed,
            "probes_needed_plain_per_block": need,
            "variance_fraction_of_last_phase_per_block": {
                b: fraction(b, phases[-1][0]) for b in (phases[-1][0] or layout.targets)
            },
            "phases": [{"support": "full" if s is None else list(s), "probes": n} for s, n in phases],
            "products_plain": n_plain,
            "products_adaptive": n_adaptive,
            "seconds": seconds,
            "time_to_target_s": to_target,
            "ratios": {
                "time_to_target_over_pyhessian[ours_adaptive]": to_target["ours_adaptive"] / to_target["pyhessian"],
                "time_to_target_over_pyhessian[ours_plain]": to_target["ours_plain"] / to_target["pyhessian"],
                "products_adaptive_over_plain": n_adaptive / n_plain,
                "time_adaptive_over_plain": to_target["ours_adaptive"] / to_target["ours_plain"],
                "probe_full_over_pyhessian_probe": per_probe["ours_probes_full"] / per_probe["pyhessian_probes"],
                "restricted_probe_over_full[last phase]": cost[phases[-1][0]] / per_probe["ours_probes_full"],
            },
        }
        per_seed.append(record)
        print(
            f"[adaptive {shape} seed {seed}] plain {n_plain} probes; adaptive phases "
            + ", ".join(f"{'full' if s is None else '+'.join(s)}: {n}" for s, n in phases)
        )
        for key, value in record["ratios"].items():
            print(f"    {key:<62}{value:8.3f}")
        del model
    summary = {key: mean_std([r["ratios"][key] for r in per_seed]) for key in per_seed[0]["ratios"]}
    return {"shape": SHAPES[shape], "summary": summary, "seeds": per_seed}


def make_task(seed: int, device: str, signal: float = 0.3):
    """A learnable synthetic image task: class ``y`` images are ``signal * mu_y`` plus unit noise, with fixed
    random patterns ``mu`` (seeded). ``draw(generator, n)`` gives a batch ``(x, y)``."""
    g = torch.Generator().manual_seed(2000 + seed)
    mu = torch.randn(10, 3, 32, 32, generator=g)

    def draw(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=generator)
        x = signal * mu[y] + torch.randn(n, 3, 32, 32, generator=generator)
        return x.to(device), y.to(device)

    return draw


def train_briefly(model: nn.Module, draw, steps: int, batch_size: int, seed: int) -> list[float]:
    """``steps`` AdamW steps (lr 1e-3) on a fixed stream of fresh batches; the loss every 50 steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(3000 + seed)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, draw(generator, batch_size))
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return losses


def _below(values: list[float], rtol: float) -> bool:
    """The library's stopping rule for one block (``hutchinson_trace``'s ``rtol`` check): ``stderr < rtol |mean|``."""
    est = TraceEstimate.from_values(values)
    return est.stderr == 0.0 or (math.isfinite(est.stderr) and est.stderr < rtol * abs(est.mean))


def pyhessian_to_target(model: nn.Module, batch: tuple, targets: dict, rtol: float, cap: int, seed: int) -> dict:
    """Real PyHessian run to ``rtol`` on every block of ``targets``: its ``hessian(...)`` constructor (the gradient
    graph), then per probe its own Rademacher draw, ``hessian_vector_product`` and per-block ``group_product``
    (``pyhessian.utils``), with the library's stopping rule checked every 4 probes (at most ``cap`` probes)."""
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product

    torch.manual_seed(50_000 + seed)  # PyHessian draws from the global generator
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with sdpa_kernel(SDPBackend.MATH):
        h = hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=batch[0].is_cuda)
    values: dict[str, list[float]] = {b: [] for b in targets}
    n = 0
    while n < cap:
        v = [torch.randint_like(p, high=2) for p in h.params]
        for v_i in v:
            v_i[v_i == 0] = -1
        hv = hessian_vector_product(h.gradsH, h.params, v)
        for b, idx in targets.items():
            values[b].append(group_product([hv[i] for i in idx], [v[i] for i in idx]).item())
        n += 1
        if n % 4 == 0 and all(_below(values[b], rtol) for b in targets):
            break
    seconds = time.perf_counter() - start
    del h
    model.train()  # PyHessian switches to eval(); these models have no dropout, so it is the same function
    model.zero_grad(set_to_none=True)  # PyHessian leaves graph-attached .grad behind
    estimates = {b: TraceEstimate.from_values(v) for b, v in values.items()}
    return {"seconds": seconds, "products": n, "estimates": estimates}


def ours_to_target(
    model: nn.Module, batch: tuple, layout: Layout, targets: dict, rtol: float, cap: int, seed: int, adaptive: bool
) -> dict:
    """``hutchinson_trace(HessianOperator(...), targets, cap, rtol=rtol, adaptive=adaptive)``, graph build included."""
    generator = torch.Generator().manual_seed((40_000 if adaptive else 30_000) + seed)
    start = time.perf_counter()
    with HessianOperator(model, loss_fn, [batch], layout.names) as op:
        estimates = hutchinson_trace(op, targets, cap, rtol=rtol, generator=generator, adaptive=adaptive)
    seconds = time.perf_counter() - start
    # Products: the block probed in every phase has them all (full-space phase 1, then nested supports).
    return {"seconds": seconds, "products": max(e.num_probes for e in estimates.values()), "estimates": estimates}


def direct_stream(
    model: nn.Module, batch: tuple, layout: Layout, targets: dict, seed: int, stream: int, args: argparse.Namespace
) -> dict:
    """One run of each method to ``--direct-rtol`` (probe streams ``seed + 100 * stream``), in an order rotated by
    ``seed + stream``: times, products, whether the cap was hit, per-block estimates, and the agreement of the
    estimates, ``(mean_a - mean_b) / sqrt(se_a^2 + se_b^2)`` per block (independent probes)."""
    methods = ("pyhessian", "ours_plain", "ours_adaptive")
    order = [methods[(i + seed + stream) % len(methods)] for i in range(len(methods))]
    rtol, cap, probe_seed = args.direct_rtol, args.direct_cap, seed + 100 * stream
    runs = {}
    for name in order:
        if name == "pyhessian":
            runs[name] = pyhessian_to_target(model, batch, targets, rtol, cap, probe_seed)
        else:
            runs[name] = ours_to_target(model, batch, layout, targets, rtol, cap, probe_seed, name == "ours_adaptive")
    record: dict = {"stream": stream, "order": order, "methods": {}}
    for name, run in runs.items():
        est = run["estimates"]
        rse = {b: e.stderr / abs(e.mean) if e.mean else math.inf for b, e in est.items()}
        record["methods"][name] = {
            "seconds": run["seconds"],
            "products": run["products"],
            "hit_cap": not all(r < rtol or est[b].stderr == 0.0 for b, r in rse.items()),
            "seconds_per_product": run["seconds"] / run["products"],
            "per_block": {
                b: {
                    "mean": e.mean,
                    "stderr": e.stderr,
                    "rse": rse[b],
                    "probes": e.num_probes,
                    "phase_probes": [int(p[2]) for p in e.phases] if e.phases else [e.num_probes],
                }
                for b, e in est.items()
            },
        }

    def agreement(a: str, b: str) -> dict[str, float]:
        ea, eb = runs[a]["estimates"], runs[b]["estimates"]
        return {k: (ea[k].mean - eb[k].mean) / math.hypot(ea[k].stderr, eb[k].stderr) for k in ea}

    record["z_adaptive_vs_plain"] = agreement("ours_adaptive", "ours_plain")
    record["z_pyhessian_vs_plain"] = agreement("pyhessian", "ours_plain")
    return record


def bench_adaptive_direct(shape: str, args: argparse.Namespace) -> dict:
    """Real runs to ``--direct-rtol`` on every residual block, no replay: PyHessian, ours plain, ours adaptive.

    Per seed: the model (init seed) is trained ``--train-steps`` AdamW steps on a learnable synthetic task
    (:func:`make_task`), so that the traces are away from zero and the target is reachable in hundreds of probes;
    then the three methods run on one held-out batch of that task, in one process, in an order rotated per seed,
    each timed from its graph build to its estimate (at most ``--direct-cap`` probes), ``--direct-streams`` times
    with fresh probes (the time to target is a random stopping time: the per-seed ratios use the mean over
    streams). 100 steps (the default): the loss is 0.35-0.7 and the residual blocks' traces on the held-out batch
    are well away from zero; after 300-400 steps (loss ~0.1) some fall to within their noise of zero (one-probe
    CV of the worst block 15-176), out of reach of any method."""
    methods = ("pyhessian", "ours_plain", "ours_adaptive")
    per_seed = []
    for seed in range(args.seeds):
        model = make_model(shape, seed, args.device)
        draw = make_task(seed, args.device)
        losses = train_briefly(model, draw, args.train_steps, args.batch_size, seed)
        batch = draw(torch.Generator().manual_seed(4000 + seed), args.batch_size)
        layout = Layout(model)
        targets = {b: layout.index[b] for b in layout.targets}
        streams = [
            direct_stream(model, batch, layout, targets, seed, stream, args) for stream in range(args.direct_streams)
        ]

        def mean_of(name: str, key: str, streams=streams) -> float:
            return statistics.fmean(st["methods"][name][key] for st in streams)

        seconds = {name: mean_of(name, "seconds") for name in methods}
        products = {name: mean_of(name, "products") for name in methods}
        record: dict = {"seed": seed, "train_losses_every_50": losses, "streams": streams}
        record["mean_seconds"], record["mean_products"] = seconds, products
        record["ratios"] = {
            "time_to_target_over_pyhessian[ours_adaptive]": seconds["ours_adaptive"] / seconds["pyhessian"],
            "time_to_target_over_pyhessian[ours_plain]": seconds["ours_plain"] / seconds["pyhessian"],
            "time_adaptive_over_plain": seconds["ours_adaptive"] / seconds["ours_plain"],
            "products_adaptive_over_plain": products["ours_adaptive"] / products["ours_plain"],
            "products_plain_over_pyhessian": products["ours_plain"] / products["pyhessian"],
            "seconds_per_product_plain_over_pyhessian": (seconds["ours_plain"] / products["ours_plain"])
            / (seconds["pyhessian"] / products["pyhessian"]),
        }
        per_seed.append(record)
        print(f"[direct {shape} seed {seed}] train loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        for st in streams:
            print(f"  stream {st['stream']}, order {st['order']}")
            for name in methods:
                m = st["methods"][name]
                worst = max(m["per_block"].values(), key=lambda r: r["rse"])["rse"]
                print(
                    f"    {name:<14}{m['seconds']:8.2f} s {m['products']:5d} products"
                    f"{' (cap)' if m['hit_cap'] else ''}, worst block RSE {worst:.3f}"
                )
            z = st["z_adaptive_vs_plain"]
            print("    z adaptive vs plain: " + ", ".join(f"{b} {v:+.2f}" for b, v in z.items()))
        for key, value in record["ratios"].items():
            print(f"    {key:<62}{value:8.3f}")
        del model
    summary = {key: mean_std([r["ratios"][key] for r in per_seed]) for key in per_seed[0]["ratios"]}
    capped = {name: sum(st["methods"][name]["hit_cap"] for r in per_seed for st in r["streams"]) for name in methods}
    z_all = [abs(v) for r in per_seed for st in r["streams"] for v in st["z_adaptive_vs_plain"].values()]
    return {
        "shape": SHAPES[shape],
        "summary": summary,
        "runs_hitting_cap": capped,
        "max_abs_z_adaptive_vs_plain": max(z_all),
        "seeds": per_seed,
    }


def controlled(values: list[float], cv: list[float], trace: float, coefficient: str) -> list[float]:
    """``h_k - c (g_k - tr G)``: unbiased for ``tr H`` when ``c`` does not depend on probe ``k``. ``coefficient``:
    ``"one"`` (c = 1), ``"loo"`` (c = the regression coefficient of h on g over the *other* probes)."""
    if coefficient == "one":
        return [h - (g - trace) for h, g in zip(values, cv)]
    out = []
    for k in range(len(values)):
        h = values[:k] + values[k + 1 :]
        g = cv[:k] + cv[k + 1 :]
        var_g = statistics.variance(g)
        c = statistics.covariance(h, g) / var_g if var_g > 0 else 0.0
        out.append(values[k] - c * (cv[k] - trace))
    return out


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def memory_worker(kind: str, shape: str, device: str, batch_size: int) -> None:
    """Print the peak memory (bytes) of one training step or one default estimate, above the setup."""
    model = make_model(shape, 0, device)
    batch = make_batch(batch_size, 0, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = proc_status_bytes("VmRSS")
    if kind == "train":
        train_step_fn(model, batch)()
    else:
        estimate_curvature(model, loss_fn, [batch])
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = proc_status_bytes("VmHWM")  # this process image only
    print(peak - base)


def peak_memory(kind: str, shape: str, device: str, batch_size: int) -> int:
    cmd = [sys.executable, __file__, "--memory-worker", kind, "--shapes", shape, "--device", device]
    out = subprocess.run([*cmd, "--batch-size", str(batch_size)], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else math.nan,
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }


def bench_shape(shape: str, args: argparse.Namespace) -> dict:
    k = args.probes
    per_seed = []
    for seed in range(args.seeds):
        model = make_model(shape, seed, args.device)
        batch = make_batch(args.batch_size, seed, args.device)
        layout = Layout(model)
        train_model = make_model(shape, seed, args.device)  # AdamW changes weights: keep them off the measured model
        pyh_setup, pyh_probes, pyh_trace, pyh_cleanup = pyhessian_fns(model, batch, layout, k)
        pyh_setup()
        fns = {
            "train_step": train_step_fn(train_model, batch),
            "ours_graph_build": graph_build_fn(model, batch, layout),
            "ours_default": ours_fn(model, batch, layout, "double_backward", k, 1),
            "ours_forward_over_reverse": ours_fn(model, batch, layout, "forward_over_reverse", k, CHUNK),
            "pyhessian_setup": pyh_setup,
            "pyhessian_probes": pyh_probes,
            "pyhessian_trace": pyh_trace,
            "curvlinops": curvlinops_fn(model, batch, layout, k),
            "handwritten_rebuild_per_probe": handwritten_fn(model, batch, layout, k),
            "ours_empirical_fisher": fisher_fn(model, batch),
            "deflation_projection_per_probe": projection_fn(layout, max(1, args.deflation_rank), args.device),
        }
        batched_ok: dict[int, bool] = {}
        for chunk in args.batched_chunks:
            fns[f"ours_batched_{chunk}"] = batched_fn(model, batch, layout, k, chunk, batched_ok)
        for kind in args.control_variates:
            fns[f"cv_setup_{kind}"] = control_variate_setup_fn(model, batch, layout, kind)
        fns["cv_overhead_per_probe_32_rows"] = control_variate_overhead_fn(layout, args.batch_size, args.device)
        seconds = timed_interleaved(fns, args.device, args.repeats)
        pyh_cleanup()
        values = probe_values(model, batch, layout, args.cv_probes, seed)
        r = args.deflation_rank
        deflated = deflated_values(model, batch, layout, args.cv_probes, r, seed) if r > 0 else {}
        # Every estimator here is unbiased for the same trace: judge all against the pooled mean, so that their
        # probe counts compare as their variances (a noisy mean of near-zero traces would otherwise dominate).
        pooled = {b: statistics.fmean(values[b] + deflated.get(b, [])) for b in values}
        needed = {b: probes_needed(v, pooled[b]) for b, v in values.items()}
        n = max(math.ceil(needed[b]) for b in layout.targets)
        n_median = math.ceil(statistics.median(needed[b] for b in layout.targets))
        chunks = math.ceil(n / CHUNK) * CHUNK / k
        per_probe = {
            "ours_default": (seconds["ours_default"] - seconds["ours_graph_build"]) / k,
            "ours_forward_over_reverse": seconds["ours_forward_over_reverse"] / k,
            "pyhessian": seconds["pyhessian_probes"] / k,
            "pyhessian_trace_whole_model": seconds["pyhessian_trace"] / k,
            "curvlinops": seconds["curvlinops"] / k,
            "handwritten_rebuild_per_probe": seconds["handwritten_rebuild_per_probe"] / k,
        }
        to_target = {
            "ours_default": seconds["ours_graph_build"] + n * per_probe["ours_default"],
            "ours_forward_over_reverse": chunks * seconds["ours_forward_over_reverse"],
            "pyhessian": seconds["pyhessian_setup"] + n * per_probe["pyhessian"],
            "curvlinops": chunks * seconds["curvlinops"],
            "handwritten_rebuild_per_probe": n * per_probe["handwritten_rebuild_per_probe"],
        }
        # The same for the median residual block (the worst block's trace may be close to zero at init).
        median_ours = seconds["ours_graph_build"] + n_median * per_probe["ours_default"]
        median_pyh = seconds["pyhessian_setup"] + n_median * per_probe["pyhessian"]
        record = {
            "seed": seed,
            "seconds": seconds,
            "per_probe_s": per_probe,
            "probes_needed_per_block": {b: (v if math.isfinite(v) else None) for b, v in needed.items()},
            "probes_to_target": n,
            "probes_to_target_median_block": n_median,
            "time_to_target_s": to_target,
            "ratios": {
                "probe_over_train_step[ours_default]": per_probe["ours_default"] / seconds["train_step"],
                "probe_over_train_step[pyhessian]": per_probe["pyhessian"] / seconds["train_step"],
                "time_to_target_over_pyhessian[ours_default]": to_target["ours_default"] / to_target["pyhessian"],
                "time_to_target_over_pyhessian[ours_forward_over_reverse]": to_target["ours_forward_over_reverse"]
                / to_target["pyhessian"],
                "time_to_target_over_pyhessian[curvlinops]": to_target["curvlinops"] / to_target["pyhessian"],
                "time_to_target_over_pyhessian[handwritten]": to_target["handwritten_rebuild_per_probe"]
                / to_target["pyhessian"],
                "time_to_target_median_block_over_pyhessian[ours_default]": median_ours / median_pyh,
                "pyhessian_per_block_over_own_trace": per_probe["pyhessian"] / per_probe["pyhessian_trace_whole_model"],
            },
        }
        fisher = empirical_fisher_trace(model, loss_fn, [batch])
        record["empirical_fisher_different_quantity"] = {
            "over_train_step": seconds["ours_empirical_fisher"] / seconds["train_step"],
            "over_pyhessian_time_to_target": seconds["ours_empirical_fisher"] / to_target["pyhessian"],
            "relative_stderr_over_samples": {b: t.stderr / t.mean for b, t in fisher.items()},
        }
        record["block_stats"] = {
            b: {
                "pooled_mean": pooled[b],
                "std_plain": statistics.stdev(values[b]),
                "std_deflated": statistics.stdev(deflated[b]) if deflated else None,
            }
            for b in values
        }
        if deflated:
            needed_d = {b: probes_needed(v, pooled[b]) for b, v in deflated.items()}
            n_d = max(math.ceil(needed_d[b]) for b in layout.targets)
            n_d_median = math.ceil(statistics.median(needed_d[b] for b in layout.targets))
            p_d = per_probe["ours_default"] + seconds["deflation_projection_per_probe"]

            sketch_s = seconds["ours_graph_build"] + 2 * r * per_probe["ours_default"]

            record["deflation"] = {
                "rank": r,
                "probes_needed_per_block": {b: (v if math.isfinite(v) else None) for b, v in needed_d.items()},
                "probes_to_target": n_d,
                "probes_to_target_median_block": n_d_median,
                "products_to_target_including_sketch": n_d + 2 * r,
            }
            record["ratios"]["time_to_target_over_pyhessian[ours_deflated]"] = (sketch_s + n_d * p_d) / to_target[
                "pyhessian"
            ]
            record["ratios"]["time_to_target_median_block_over_pyhessian[ours_deflated]"] = (
                sketch_s + n_d_median * p_d
            ) / median_pyh
            record["ratios"]["probes_to_target_deflated_over_plain"] = n_d / n
            record["ratios"]["probes_to_target_median_block_deflated_over_plain"] = n_d_median / n_median
            record["ratios"]["variance_deflated_over_plain[median over residual blocks]"] = statistics.median(
                (record["block_stats"][b]["std_deflated"] / record["block_stats"][b]["std_plain"]) ** 2
                for b in layout.targets
            )
        # Lever: several probes per reverse-over-reverse call (is_grads_batched), against one probe per call.
        record["batched_probes"] = {
            str(chunk): {
                "vmapped_path_ran": batched_ok.get(chunk, False),
                "per_probe_over_looped": (seconds[f"ours_batched_{chunk}"] - seconds["ours_graph_build"])
                / k
                / per_probe["ours_default"],
            }
            for chunk in args.batched_chunks
        }
        for chunk in args.batched_chunks:
            record["ratios"][f"per_probe_batched_{chunk}_over_looped"] = record["batched_probes"][str(chunk)][
                "per_probe_over_looped"
            ]
        # Lever: control variates z_B^T (G z)_B - tr(G_BB) from a low-rank G (empirical Fisher / exact GGN).
        record["control_variates"] = {}
        for kind in args.control_variates:
            cv, cv_trace = control_variate_values(model, batch, layout, args.cv_probes, seed, kind)
            rows = args.batch_size * (1 if kind == "ef" else 10)
            overhead = seconds["cv_overhead_per_probe_32_rows"] * rows / args.batch_size  # linear in the rows
            p_cv = per_probe["ours_default"] + overhead
            setup_cv = seconds["ours_graph_build"] + seconds[f"cv_setup_{kind}"]
            entry: dict = {"rows": rows, "per_probe_overhead_s": overhead, "setup_s": seconds[f"cv_setup_{kind}"]}
            for coefficient in ("one", "loo"):
                res = {b: controlled(values[b], cv[b], cv_trace[b], coefficient) for b in values}
                need = {b: probes_needed(res[b], pooled[b]) for b in values}
                n_c = max(math.ceil(need[b]) for b in layout.targets)
                n_c_median = math.ceil(statistics.median(need[b] for b in layout.targets))
                ratio = {b: statistics.variance(res[b]) / statistics.variance(values[b]) for b in values}
                entry[coefficient] = {
                    "variance_over_plain_per_block": ratio,
                    "probes_to_target": n_c,
                    "probes_to_target_median_block": n_c_median,
                }
                name = f"{kind}_c_{coefficient}"
                record["ratios"][f"variance_cv_over_plain[{name}, median over residual blocks]"] = statistics.median(
                    ratio[b] for b in layout.targets
                )
                record["ratios"][f"time_to_target_over_pyhessian[ours_cv_{name}]"] = (
                    setup_cv + n_c * p_cv
                ) / to_target["pyhessian"]
                record["ratios"][f"time_to_target_median_block_over_pyhessian[ours_cv_{name}]"] = (
                    setup_cv + n_c_median * p_cv
                ) / median_pyh
            entry["correlation_per_block"] = {b: statistics.correlation(values[b], cv[b]) for b in values}
            entry["trace_G_per_block"] = cv_trace
            record["control_variates"][kind] = entry
        # Why no cheap lever reaches 0.5: the share of a probe's variance that is cross-block coupling. Removing it
        # exactly (orthogonal sign patterns over blocks sharing one probe) costs one product per block.
        if args.block_only_probes > 1:
            pairs = block_pair_values(model, batch, layout, args.block_only_probes, seed)
            full_var = {b: statistics.variance(values[b]) for b in values}
            share = {b: statistics.variance(pairs[b][b]) / full_var[b] for b in values}
            # Consistency: block-only variance + cross-block mean squares should rebuild the full-space variance.
            rebuilt = {
                b: (
                    statistics.variance(pairs[b][b])
                    + sum(statistics.fmean(v * v for v in pairs[b][c]) for c in values if c != b)
                )
                / full_var[b]
                for b in values
            }
            record["block_only"] = {
                "probes": args.block_only_probes,
                "variance_block_only_over_full_space_per_block": share,
                "rebuilt_variance_over_measured_per_block": rebuilt,
                "cross_block_mean_square": {
                    b: {c: statistics.fmean(v * v for v in pairs[b][c]) for c in values if c != b} for b in values
                },
                "products_per_block_only_sample": len(layout.index),
            }
            med = statistics.median(share[b] for b in layout.targets)
            record["ratios"]["variance_block_only_over_full_space[median over residual blocks]"] = med
            record["ratios"]["variance_per_product_block_only_over_plain[median over residual blocks]"] = med * len(
                layout.index
            )
            for g in (2, 4):
                design = best_sign_design(pairs, full_var, needed, layout.targets, g)
                record["block_only"][f"best_{g}_group_design"] = design
                record["ratios"][f"products_to_target_best_{g}_group_sign_design_over_plain"] = design[
                    "products_to_target_over_plain"
                ]
                record["ratios"][f"products_to_target_median_block_best_{g}_group_sign_design_over_plain"] = design[
                    "products_to_target_median_block_over_plain"
                ]
        per_seed.append(record)
        print(f"[{shape} seed {seed}] probes to 10% RSE on every residual block: {n} (median block {n_median})")
        for key, value in record["ratios"].items():
            print(f"    {key:<62}{value:8.3f}")
        if "deflation" in record:
            products = record["deflation"]["products_to_target_including_sketch"]
            print(
                f"    deflation rank {args.deflation_rank}: {products} products vs {n} plain (median block: "
                f"{n_d_median} vs {n_median})"
            )
        del model, train_model

    summary = {key: mean_std([r["ratios"][key] for r in per_seed]) for key in per_seed[0]["ratios"]}
    default_estimate = statistics.fmean(
        r["seconds"]["ours_graph_build"] + 8 * r["per_probe_s"]["ours_default"] for r in per_seed
    )
    train = statistics.fmean(r["seconds"]["train_step"] for r in per_seed)
    summary["estimate_default_over_1000_steps"] = {"mean": default_estimate / (1000 * train), "std": 0.0, "n": 1}
    memory = {
        "train_step_peak_bytes": peak_memory("train", shape, args.device, args.batch_size),
        "estimate_default_peak_bytes": peak_memory("estimate", shape, args.device, args.batch_size),
    }
    memory["estimate_over_train_step"] = memory["estimate_default_peak_bytes"] / memory["train_step_peak_bytes"]
    n_params = sum(p.numel() for p in make_model(shape, 0, "cpu").parameters())
    return {"shape": SHAPES[shape], "params": n_params, "summary": summary, "memory": memory, "seeds": per_seed}


# ---------------------------------------------------------------- top eigenvalue on close spectra


class Quadratic(nn.Module):
    """``forward`` returns the parameter vector; with :func:`quadratic_loss` the Hessian is exactly ``A``."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta + 0 * x.sum()


class QuadraticLoss(nn.Module):
    reduction = "mean"  # what curvlinops reads to normalise over the data (one data point here)

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * out @ self.matrix @ out + 0 * target.sum()


def close_spectrum(seed: int, ratio: float, n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bulk = torch.rand(n - 2, generator=g, dtype=torch.float64) * 8.0 - 3.0
    values = torch.cat([torch.tensor([10.0, 10.0 * ratio], dtype=torch.float64), bulk])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((q * values) @ q.T).float()


def bench_eigen(ratios: list[float], seeds: int) -> dict:
    import scipy.sparse.linalg as sla
    from curvlinops import HessianLinearOperator

    pyh_module = sys.modules["pyhessian.hessian"]  # the module (the package exports the class under that name)
    calls = {"n": 0}
    original = pyh_module.hessian_vector_product

    def counted(*a, **kw):  # count PyHessian's products without changing them
        calls["n"] += 1
        return original(*a, **kw)

    out = {}
    for ratio in ratios:
        rows: dict[str, dict[str, list]] = {
            m: {"ok": [], "products": []} for m in ("ours_default", "pyhessian", "ours_old_default", "curvlinops_eigsh")
        }
        for seed in range(seeds):
            matrix = close_spectrum(seed, ratio)
            model, criterion = Quadratic(matrix.shape[0], seed), QuadraticLoss(matrix)
            data = (torch.zeros(1), torch.zeros(1))

            def loss(m: nn.Module, batch: tuple, criterion: nn.Module = criterion) -> torch.Tensor:
                return criterion(m(batch[0]), batch[1])

            def record(method: str, value: float, products: int, rows: dict = rows) -> None:
                rows[method]["ok"].append(abs(value - 10.0) <= 0.1)
                rows[method]["products"].append(products)

            with HessianOperator(model, loss, [data]) as op:
                used: dict[str, int] = {}
                value = top_eigenvalue(op, generator=torch.Generator().manual_seed(seed), iterations=used)["model"]
                record("ours_default", value, used["model"])
                used = {}
                old = top_eigenvalue(op, None, 20, 1e-3, torch.Generator().manual_seed(seed), "power", used)
                record("ours_old_default", old["model"], used["model"])
            calls["n"] = 0
            pyh_module.hessian_vector_product = counted
            try:
                torch.manual_seed(seed)
                eigenvalues, _ = pyh_module.hessian(model, criterion, data=data, cuda=False).eigenvalues()
            finally:
                pyh_module.hessian_vector_product = original
            model.zero_grad(set_to_none=True)
            record("pyhessian", eigenvalues[0], calls["n"])
            operator = HessianLinearOperator(model, criterion, [model.theta], [data], check_deterministic=False)
            scipy_op = operator.to_scipy()
            count = {"n": 0}

            def matvec(v, _op=scipy_op, _count=count):
                _count["n"] += 1
                return _op @ v

            wrapped = sla.LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
            value = sla.eigsh(wrapped, k=1, which="LM", tol=1e-3, v0=torch.ones(matrix.shape[0]).numpy())[0][0]
            record("curvlinops_eigsh", float(value), count["n"])
        out[str(ratio)] = {
            m: {
                "within_1pct": sum(r["ok"]),
                "seeds": len(r["ok"]),
                "products_mean": statistics.fmean(r["products"]),
                "products_max": max(r["products"]),
            }
            for m, r in rows.items()
        }
        print(f"[eigen |l2/l1| = {ratio}]")
        for m, r in out[str(ratio)].items():
            print(
                f"    {m:<20} within 1%: {r['within_1pct']}/{r['seeds']}   products mean {r['products_mean']:.1f} "
                f"max {r['products_max']}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="vit4,deit")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--probes", type=int, default=8, help="probes per timed call")
    parser.add_argument("--cv-probes", type=int, default=48, help="probes to measure each block's variance")
    parser.add_argument("--deflation-rank", type=int, default=16, help="0 skips the deflation lever")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batched-chunks",
        type=lambda t: [int(c) for c in t.split(",") if c],
        default=[4, 8],
        help="probes per batched reverse-over-reverse call to time against one per call ('' skips)",
    )
    parser.add_argument(
        "--control-variates",
        type=lambda t: [c for c in t.split(",") if c],
        default=["ef", "ggn"],
        help="control variates to measure: ef (empirical Fisher), ggn (exact Gauss-Newton); '' skips",
    )
    parser.add_argument(
        "--block-only-probes", type=int, default=12, help="probes (x blocks products) for the cross-block share"
    )
    parser.add_argument(
        "--antithetic-holdout", type=Path, help="held-out check of the sign designs stored in this curvature.json"
    )
    parser.add_argument("--holdout-pairs", type=int, default=24, help="antithetic probe pairs per split")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="only the time to 10%% RSE of PyHessian, ours plain and ours adaptive (curvature_adaptive.json)",
    )
    parser.add_argument(
        "--adaptive-direct",
        action="store_true",
        help="real runs (no replay) to --direct-rtol on every residual block after --train-steps of training: "
        "PyHessian, ours plain, ours adaptive (curvature_adaptive_direct.json)",
    )
    parser.add_argument("--direct-rtol", type=float, default=0.1, help="relative standard error target")
    parser.add_argument("--direct-cap", type=int, default=400, help="most probes per method and seed")
    parser.add_argument("--direct-streams", type=int, default=1, help="runs of each method per seed (own probes)")
    parser.add_argument("--train-steps", type=int, default=100, help="AdamW steps before the direct runs")
    parser.add_argument("--no-eigen", action="store_true", help="skip the top-eigenvalue part")
    parser.add_argument("--eigen-seeds", type=int, default=40)
    parser.add_argument("--memory-worker", choices=["train", "estimate"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.shapes, args.device, args.batch_size)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    torch.set_num_threads(1) if args.device == "cpu" else None
    if args.antithetic_holdout:
        antithetic_holdout(args)
        return
    if args.adaptive_direct:
        start = time.perf_counter()
        out = {
            "device": args.device,
            "batch_size": args.batch_size,
            "seeds": args.seeds,
            "rtol": args.direct_rtol,
            "cap": args.direct_cap,
            "streams_per_seed": args.direct_streams,
            "train_steps": args.train_steps,
            "torch_threads": torch.get_num_threads(),
            "load_average_start": list(os.getloadavg()),
            "target": {"time_to_target_over_pyhessian[ours_adaptive]": 0.5},
            "shapes": {shape: bench_adaptive_direct(shape, args) for shape in filter(None, args.shapes.split(","))},
        }
        out["load_average_end"] = list(os.getloadavg())
        out["wall_s"] = time.perf_counter() - start
        output = RESULTS.with_name("curvature_adaptive_direct.json") if args.output == RESULTS else args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(out, indent=2))
        for shape, result in out["shapes"].items():
            capped = result["runs_hitting_cap"]
            print(f"== adaptive direct, {shape}: mean ± std over {args.seeds} seeds; runs capped {capped}")
            for key, value in result["summary"].items():
                print(f"    {key:<62}{value['mean']:8.3f} ± {value['std']:.3f}")
            print(f"    max |z| adaptive vs plain {result['max_abs_z_adaptive_vs_plain']:.2f}")
        print(f"wrote {output} in {out['wall_s']:.0f} s")
        return
    if args.adaptive:
        start = time.perf_counter()
        out = {
            "device": args.device,
            "batch_size": args.batch_size,
            "seeds": args.seeds,
            "cv_probes": args.cv_probes,
            "block_only_probes": args.block_only_probes,
            "probes_per_timed_call": args.probes,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "target": {"time_to_target_over_pyhessian[ours_adaptive]": 0.5},
            "replay_validation": replay_validation(),
            "shapes": {shape: bench_adaptive(shape, args) for shape in filter(None, args.shapes.split(","))},
        }
        out["wall_s"] = time.perf_counter() - start
        output = RESULTS.with_name("curvature_adaptive.json") if args.output == RESULTS else args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(out, indent=2))
        for shape, result in out["shapes"].items():
            print(f"== adaptive, {shape}: mean ± std over {args.seeds} seeds")
            for key, value in result["summary"].items():
                print(f"    {key:<62}{value['mean']:8.3f} ± {value['std']:.3f}")
        print(f"wrote {output} in {out['wall_s']:.0f} s")
        return
    import curvlinops  # noqa: F401  (fail early when the bench extra is missing)
    import pyhessian  # noqa: F401

    start = time.perf_counter()
    report = {
        "device": args.device,
        "batch_size": args.batch_size,
        "probes_per_call": args.probes,
        "cv_probes": args.cv_probes,
        "seeds": args.seeds,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "target_relative_stderr": TARGET_RSE,
        "targets": {
            "time_to_target_over_pyhessian": 0.5,
            "estimate_default_over_1000_steps": 0.03,
            "estimate_over_train_step_memory": 4.0,
            "top_eigenvalue_within_1pct": "40/40",
        },
        "shapes": {},
    }
    for shape in filter(None, args.shapes.split(",")):
        report["shapes"][shape] = bench_shape(shape, args)
    if not args.no_eigen:
        report["eigen"] = bench_eigen([0.84, 0.9], args.eigen_seeds)
    report["wall_s"] = time.perf_counter() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    for shape, result in report["shapes"].items():
        print(f"== {shape}: {result['params'] / 1e6:.2f}M params, mean ± std over {args.seeds} seeds")
        for key, value in result["summary"].items():
            print(f"    {key:<62}{value['mean']:8.3f} ± {value['std']:.3f}")
        print(f"    peak memory estimate / train step {result['memory']['estimate_over_train_step']:.2f}")
    print(f"wrote {args.output} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
