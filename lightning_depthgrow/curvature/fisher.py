"""Opt-in, cheaper and always non-negative: the per-block trace of the **empirical Fisher**, not of the Hessian.

``tr(F_BB)`` with ``F = (1/N) sum_n g_n g_n^T``, ``g_n`` the gradient of sample ``n``'s loss, is
``(1/N) sum_n ||g_{n,B}||^2``: a mean of per-sample squared gradient norms, computed exactly for the samples given
(no random probes) from per-sample gradients (``torch.func.vmap`` over samples of ``grad``, in chunks): about
the cost of one backward pass over the batch, against one second backward *per probe* for the Hessian trace.

It is a **different quantity**. The Hessian is ``F_GN + sum_n (dl_n/df) d^2 f`` (Gauss-Newton part plus a term
weighted by the residuals); the empirical Fisher approximates the Gauss-Newton part only where the model's
predictive distribution matches the labels (near a good fit), and it is never negative, so it cannot show
negative curvature. Use it as a cheap positive "how sharp is this block" score, not as a Hessian estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .blocks import resolve_blocks
from .estimators import TraceEstimate
from .hvp import LossFn, _clone_inference_tensors, _LossModule
from .state import estimation_mode, preserve_model_state


def _batch_size(batch: Any) -> int:
    sizes = set()

    def visit(x: Any) -> None:
        if isinstance(x, Tensor) and x.dim() > 0:
            sizes.add(x.shape[0])
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(batch)
    if len(sizes) != 1:
        raise ValueError(
            "empirical_fisher_trace splits each batch into samples along dim 0 of its tensors; their leading sizes "
            f"are {sorted(sizes)} (need exactly one batch size)."
        )
    return sizes.pop()


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch


def _tensor_dims(batch: Any) -> Any:
    # vmap in_dims: 0 for every batched tensor, None for everything else.
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        return {k: _tensor_dims(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_tensor_dims(v) for v in batch)
    return None


def _unsqueeze(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.unsqueeze(0)
    if isinstance(batch, Mapping):
        return {k: _unsqueeze(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_unsqueeze(v) for v in batch)
    return batch


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    blocks: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    sample_chunk: int = 32,
) -> dict[str, TraceEstimate]:
    """Per-block trace of the empirical Fisher ``(1/N) sum_n g_n g_n^T`` over every sample of ``batches``.

    ``loss_fn(model, batch)`` is the same mean-reduced loss as for :func:`estimate_curvature`; it is called on
    single samples (every tensor of a batch sliced along dim 0, kept as a batch of one), so sample ``n``'s loss is
    ``loss_fn(model, batch[n:n+1])``. Each block's :class:`TraceEstimate` is the mean of ``||g_{n,B}||^2`` over
    the samples, its ``stderr`` the standard error of that mean over samples (how much another batch of the same
    size would move it; there is no probe noise). The model is left as it was. Models whose samples interact in
    the forward pass (BatchNorm in train mode) are refused: a sample alone would see other statistics.

    Args:
        model: the model (its parameters are only read).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, a mean over the samples of the batch.
        batches: batches whose tensors share one leading (sample) dimension.
        blocks: as for :func:`estimate_curvature` (``None``: :func:`discover_blocks`).
        sample_chunk: samples per vmapped gradient call (memory: ``sample_chunk`` parameter-sized gradients).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> loss_fn = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])
        >>> fisher = empirical_fisher_trace(net, loss_fn, data)
        >>> sorted(fisher), all(t.mean > 0 and t.num_probes == 16 for t in fisher.values())
        (['0', '2'], True)
    """
    from torch.func import functional_call, grad, vmap

    if isinstance(sample_chunk, bool) or not isinstance(sample_chunk, int) or sample_chunk < 1:
        raise ValueError(f"sample_chunk must be an int >= 1, got {sample_chunk!r}")
    if isinstance(batches, (Tensor, Mapping)):
        raise TypeError("batches must be a list of batches; to use one batch pass [batch].")
    batches = [_clone_inference_tensors(b) for b in batches]
    if not batches:
        raise ValueError("batches is empty; pass at least one batch.")
    coupled = [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    if coupled:
        raise ValueError(
            f"empirical_fisher_trace needs samples that do not interact, but the model has {coupled[0]} in train "
            "mode (batch statistics couple the samples). Use estimate_curvature (the Hessian trace) for this model."
        )
    groups = resolve_blocks(model, blocks)
    names = list(dict.fromkeys(n for members in groups.values() for n in members))
    params = dict(model.named_parameters())
    wrapper = _LossModule(model, loss_fn)
    keys = [f"model.{n}" for n in names]
    primals = {key: params[n].detach() for key, n in zip(keys, names)}
    squared: dict[str, list[Tensor]] = {key: [] for key in keys}

    def sample_loss(theta: dict[str, Tensor], sample: Any) -> Tensor:
        return functional_call(wrapper, theta, (_unsqueeze(sample),))

    with torch.inference_mode(False), preserve_model_state(model, parameters=False), estimation_mode(model):
        for batch in batches:
            n = _batch_size(batch)
            per_sample = vmap(grad(sample_loss), in_dims=(None, _tensor_dims(batch)), randomness="different")
            for start in range(0, n, sample_chunk):
                grads = per_sample(primals, _slice(batch, start, min(n, start + sample_chunk)))
                for key in keys:
                    g = grads[key]
                    squared[key].append(g.reshape(g.shape[0], -1).pow(2).sum(1, dtype=torch.float64))
    per_param = {n: torch.cat(squared[key]) for n, key in zip(names, keys)}
    return {
        block: TraceEstimate.from_values(torch.stack([per_param[n] for n in members]).sum(0).tolist())
        for block, members in groups.items()
    }
