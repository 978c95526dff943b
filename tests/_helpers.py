"""What the tests share: a tiny timm ViT, a classifier LightningModule, random data, a quiet Trainer, a hash.

The tests own these (no test imports ``examples.*``): the examples may change for the demo's sake, the tests'
models must not. ``tests/conftest.py`` serves them as fixtures; test files of other areas still import them
from here directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_depthgrow import register_block
from lightning_depthgrow.dms.resource import _set_keep
from lightning_depthgrow.events import event_log
from lightning_depthgrow.surgery.ramp import ramped_blocks

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``python examples/<script> --quick --out <out> <args>`` in a fresh process (one thread, the repository on the
    path, ``out`` as the working directory), asserting that it exits cleanly; its stdout and stderr as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary, unless ``kwargs`` say otherwise."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def tensor_hash(module: nn.Module, parameters_only: bool = False) -> str:
    """SHA-256 over names and bytes of every parameter (and buffer, unless ``parameters_only``), in order."""
    tensors = module.named_parameters() if parameters_only else module.state_dict().items()
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def make_vit(
    depth: int = 2, embed_dim: int = 16, num_heads: int = 2, mlp_ratio: float = 2.0, **kwargs: Any
) -> nn.Module:
    """A tiny timm VisionTransformer over ``[B, 1, 1, 40]`` signals: ``(1, 4)`` patches, 10 tokens, 10 classes."""
    options: dict[str, Any] = dict(
        pretrained=False,
        img_size=(1, 40),
        patch_size=(1, 4),
        in_chans=1,
        num_classes=10,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )
    options.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **options)


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around ``model``: AdamW with a decay/no-decay split and a per-step cosine LR."""

    def __init__(self, model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.05, max_epochs: int = 10) -> None:
        super().__init__()
        self.model, self.lr, self.weight_decay, self.max_epochs = model, lr, weight_decay, max_epochs
        self.example_input_array = torch.zeros(2, 1, 1, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(0.05 * total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_module(depth: int = 2, embed_dim: int = 16, seed: int = 0, max_epochs: int = 4, **kwargs: Any) -> Classifier:
    """A seeded :class:`Classifier` around a tiny :func:`make_vit`."""
    torch.manual_seed(seed)
    return Classifier(make_vit(depth=depth, embed_dim=embed_dim, num_heads=2, **kwargs), max_epochs=max_epochs)


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """``n`` random ``[1, 1, 40]`` signals with random labels, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# ---------------------------------------------------------------- a user-registered block type


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused ``qkv``, output projection ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class GPTBlock(nn.Module):
    """Pre-norm transformer block ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` with a 4x GELU MLP."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(dim), CausalSelfAttention(dim, num_heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, a ``blocks`` ModuleList of :class:`GPTBlock`, final norm, LM head."""

    def __init__(self, vocab_size: int = 32, context: int = 16, dim: int = 32, depth: int = 2, num_heads: int = 2):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.ModuleList(GPTBlock(dim, num_heads) for _ in range(depth))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


register_block(GPTBlock, zero_init=["attn.proj", "mlp.proj"], name="tests.GPTBlock")


class ImageClassifier(pl.LightningModule):
    """Plain SGD cross-entropy around an image ``model`` taking ``[B, 3, 16, 16]``, with a seeded example input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RankRecord(Callback):
    """At the end of training, writes each rank's parameter hash, event log and ramps to ``out/rank<r>.json``
    (multi-process tests compare the ranks with :func:`rank_records`)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        events = [{k: e.to_dict()[k] for k in ("kind", "spec", "step")} for e in event_log(pl_module)]
        record = {"hash": tensor_hash(pl_module), "events": events, "ramped": ramped_blocks(pl_module)}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def rank_records(out: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """The records :class:`RankRecord` wrote, by rank."""
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


class PairBlock(nn.Module):
    """A residual block that returns ``(hidden, cache)``: the generic depth gate cannot scale it (DMS must refuse)."""

    def __init__(self, width: int = 40) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + self.fc(x), None


class PairNet(nn.Module):
    """Two :class:`PairBlock` in ``blocks``, each block's hidden state fed to the next."""

    def __init__(self, width: int = 40) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([PairBlock(width), PairBlock(width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)[0]
        return x


#: A fixed probe batch for the tiny ViT (:func:`make_module`), for logits compared across growth steps.
PROBE = torch.randn(8, 1, 1, 40, generator=torch.Generator().manual_seed(5))
#: Every hook dict of an ``nn.Module``: equal to a plain module's after ``fit`` when nothing was left behind.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class Logits(Callback):
    """The module's eval-mode logits on :data:`PROBE` at the end of every training batch, by global step."""

    def __init__(self) -> None:
        self.seen: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.seen[trainer.global_step] = pl_module(PROBE).clone()
        pl_module.train(was)


def set_keep(gates: Any, keep: dict[str, list[int]]) -> None:
    """Make DMS ``gates``' hard masks keep exactly ``keep`` (gate name -> kept indices): importance 1 for the kept
    elements, the ratio that keeps k of n (the export fit's own :func:`~lightning_depthgrow.dms.resource._set_keep`)."""
    with torch.no_grad():
        for name, gate in gates.gates.items():
            importance = torch.arange(gate.n, dtype=torch.float) * 1e-3 / gate.n
            importance[keep[name]] += 1.0
            gate.importance.copy_(importance)
            _set_keep(gate, len(keep[name]))
    assert gates.keep() == keep
