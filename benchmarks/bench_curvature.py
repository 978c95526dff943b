"""Cost of curvature estimation on a DeiT-tiny-shaped ViT, against a training step and a PyHessian baseline.

Measures, in one run on one machine (so only ratios matter):

* one training step (forward + backward + AdamW step);
* one Hutchinson probe over all blocks for each HVP backend and probe chunk (``hutchinson_trace`` on a
  ``HessianOperator``: probe generation, products and dot products), amortised over ``--probes`` probes,
  including the forward/backward that builds the gradient graph once per call;
* the two parts of a double-backward probe alone: building the gradient graph (forward + ``create_graph``
  backward) and one second backward on a prebuilt graph. ``second_backward + graph_build / probes`` is the
  floor of a probe without any estimator overhead;
* the share of matrix multiplications (``aten::mm/addmm/bmm`` self time, ``torch.profiler``) in a training
  step and in one second backward: the second backward runs twice the training step's matmuls, which
  bounds ``probe / training step`` from below;
* a textbook PyHessian-style baseline written here: per probe, a fresh forward, ``grad(create_graph=True)``
  and ``grad(gradsH, params, grad_outputs=v)`` (as PyHessian's ``dataloader_hv_product``);
* the default ``estimate_curvature`` call as a fraction of 1,000 training steps;
* peak memory of an estimate and of a training step (CUDA: ``max_memory_allocated``; CPU: RSS high-water
  of a fresh subprocess above its RSS after setup).

Usage::

    python benchmarks/bench_curvature.py            # CPU, ~2 min
    python benchmarks/bench_curvature.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_depthgrow.curvature import HessianOperator, estimate_curvature, hutchinson_trace

RESULTS = Path(__file__).resolve().parent / "results" / "curvature.json"


def make_model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",  # DeiT-tiny shape: embed 192, 3 heads; here 6 blocks on 32x32 images
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=6,
        num_classes=10,
    )
    return model.to(device).train()


def make_batch(batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, device: str, repeats: int) -> dict[str, float]:
    """Median wall time of each ``fn()``; one warm-up each, then rounds that run every fn once.

    Interleaving makes every measure see the same machine load (a shared CPU drifts over minutes).
    """
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


def train_step_fn(model: torch.nn.Module, batch: tuple, device: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        optimizer.step()

    return step


def ours_fn(model: torch.nn.Module, batch: tuple, backend: str, probes: int, chunk: int):
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with HessianOperator(model, loss_fn, [batch], names, backend, probe_chunk=chunk) as op:
            hutchinson_trace(op, None, probes, generator=generator, chunk_size=chunk)

    return run


def pyhessian_fn(model: torch.nn.Module, batch: tuple, probes: int):
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        with sdpa_kernel(SDPBackend.MATH):  # needed for any double backward through attention
            for _ in range(probes):
                v = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=False)
                sum((h * u).sum() for h, u in zip(hv, v)).item()  # v^T Hv, as PyHessian's trace loop

    return run


def graph_parts_fns(model: torch.nn.Module, batch: tuple):
    """(build the gradient graph, one second backward on a prebuilt graph), both with the math kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    v = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)

    def build() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)

    def second_backward() -> None:
        torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)

    return build, second_backward


def matmul_profile(fns: dict) -> dict[str, dict[str, float]]:
    """Self CPU time (s) of matrix multiplications and of everything, per fn, from one profiled call each."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, fn in fns.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e6
        calls = sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        out[name] = {"matmul_s": matmul, "total_s": total, "matmul_calls": calls}
    return out


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def memory_worker(kind: str, device: str, batch_size: int) -> None:
    """Print the peak memory (bytes) of one training step or one default estimate, above the setup."""
    model = make_model(device)
    batch = make_batch(batch_size, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = proc_status_bytes("VmRSS")
    if kind == "train":
        train_step_fn(model, batch, device)()
    else:
        estimate_curvature(model, loss_fn, [batch])
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        # VmHWM belongs to this process image (ru_maxrss would include the parent's RSS, kept across exec).
        peak = proc_status_bytes("VmHWM")
    print(peak - base)


def peak_memory(kind: str, device: str, batch_size: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", kind, "--device", device, "--batch-size", str(batch_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probes", type=int, default=8, help="probes per timed Hutchinson call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-worker", choices=["train", "estimate"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.device, args.batch_size)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")

    model = make_model(args.device)
    batch = make_batch(args.batch_size, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    k = args.probes
    train_model = make_model(args.device)  # AdamW steps change weights: keep them off the measured model

    def default_estimate() -> None:
        estimate_curvature(model, loss_fn, [batch])

    build, second_backward = graph_parts_fns(model, batch)
    train_step = train_step_fn(train_model, batch, args.device)
    default_key = "probe_s[double_backward,chunk=1]"  # the library default (DEFAULT_PROBE_CHUNK)
    per_call = timed_interleaved(
        {
            "train_step_s": train_step,
            "graph_build_s": build,
            "second_backward_s": second_backward,
            default_key: ours_fn(model, batch, "double_backward", k, 1),
            f"probe_s[double_backward,chunk={k}]": ours_fn(model, batch, "double_backward", k, k),
            f"probe_s[forward_over_reverse,chunk={k}]": ours_fn(model, batch, "forward_over_reverse", k, k),
            "probe_s[pyhessian_baseline]": pyhessian_fn(model, batch, k),
            "estimate_default_s": default_estimate,
        },
        args.device,
        args.repeats,
    )
    rows = {key: v / k if key.startswith("probe_s[") else v for key, v in per_call.items()}
    best_ours = min(v for key, v in rows.items() if key.startswith("probe_s[") and "baseline" not in key)
    default_probe = rows[default_key]
    floor = rows["second_backward_s"] + rows["graph_build_s"] / k
    ratios = {
        "probe_over_train_step[default]": default_probe / rows["train_step_s"],
        "probe_over_train_step[best]": best_ours / rows["train_step_s"],
        "probe_over_train_step[floor: 2nd backward + build/probes]": floor / rows["train_step_s"],
        "second_backward_over_train_step": rows["second_backward_s"] / rows["train_step_s"],
        "ours_over_pyhessian[default]": default_probe / rows["probe_s[pyhessian_baseline]"],
        "ours_over_pyhessian[floor]": floor / (rows["second_backward_s"] + rows["graph_build_s"]),
        "estimate_default_over_1000_steps": rows["estimate_default_s"] / (1000 * rows["train_step_s"]),
    }
    profile = (
        matmul_profile({"train_step": train_step, "second_backward": second_backward}) if args.device == "cpu" else {}
    )
    memory = {"train_step_peak_bytes": peak_memory("train", args.device, args.batch_size)}
    memory["estimate_default_peak_bytes"] = peak_memory("estimate", args.device, args.batch_size)
    memory["estimate_over_train_step"] = memory["estimate_default_peak_bytes"] / memory["train_step_peak_bytes"]
    targets = {
        "probe_over_train_step[default]": 2.0,
        "ours_over_pyhessian[default]": 0.7,
        "estimate_default_over_1000_steps": 0.03,
    }

    print(
        f"DeiT-tiny-shaped ViT: 6 blocks, embed 192, {n_params / 1e6:.2f}M params, batch {args.batch_size}, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, {k} probes per call"
    )
    print(f"{'measure':<58}{'value':>14}")
    for key, value in rows.items():
        print(f"{key:<58}{value * 1e3:>11.1f} ms")
    for key, value in ratios.items():
        target = f"  (target <= {targets[key]})" if key in targets else ""
        print(f"{key:<58}{value:>14.3f}{target}")
    for name, prof in profile.items():
        share = prof["matmul_s"] / prof["total_s"]
        print(
            f"{'profile[' + name + '] matmul ms / calls / share':<48}{prof['matmul_s'] * 1e3:>11.1f} ms "
            f"{prof['matmul_calls']:>5} {share:>6.0%}"
        )
    for key, value in memory.items():
        shown = f"{value / 2**20:>11.1f} MiB" if key.endswith("bytes") else f"{value:>14.2f}"
        print(f"{key:<48}{shown}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"name": "vit_tiny_patch16_224", "depth": 6, "img_size": 32, "patch_size": 8, "params": n_params},
        "device": args.device,
        "batch_size": args.batch_size,
        "probes_per_call": k,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "seconds": rows,
        "ratios": ratios,
        "targets": targets,
        "memory": memory,
        "profile": profile,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
