"""A tiny GPT-style causal language model whose blocks are registered for depth growth in a few lines.

This is the reference example of a *user-registered* block type. The library knows nothing about
:class:`GPTBlock`; one call tells it that the block is residual and which sub-modules to zero so that
a fresh copy computes the identity (the last projection of each of its two residual branches)::

    register_block(GPTBlock, zero_init=["attn.proj", "mlp.proj"], init_fn=gpt_init)

From then on ``find_block_stacks`` finds ``model.blocks``, ``insert_identity_block`` grows it, and the
curvature and DMS code treat it like any built-in family. (Hugging Face's own GPT-2, Llama, Mistral and Qwen2
need no registration: they have built-in adapters, see docs/adapters.md.)

Run ``python examples/gpt_blocks.py`` to train on a synthetic copy task for a few steps, grow the model
by one block (a verified insertion: undone with an error if the logits on the probe batch moved) and keep
training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_depthgrow import register_block


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (fused QKV projection, output projection ``proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    """``proj(act(fc(x)))`` with ``act = nn.GELU()``, a module (numerically ``F.gelu``) so that ``NeuronGrowth`` can
    watch ``fc`` with ``layers={"...mlp.fc": "...mlp.act"}``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GPTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, a ``blocks`` ModuleList of :class:`GPTBlock`, final norm, LM head.

    ``forward(idx)`` maps token ids ``[B, T]`` to next-token logits ``[B, T, vocab_size]``. Each block's MLP has
    ``int(dim * mlp_ratio)`` hidden units.
    """

    def __init__(
        self,
        vocab_size: int = 32,
        context: int = 16,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.ModuleList(GPTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(gpt_init)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.context:
            raise ValueError(f"sequence of length {idx.shape[1]} exceeds the context of {self.context} tokens")
        x = self.tok_emb(idx) + self.pos_emb[:, : idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt_init(module: nn.Module) -> None:
    """GPT-2 style init: normal(0, 0.02) weights, zero biases (also used for grown blocks)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


# The whole integration: which type is a residual block, and what to zero for an identity copy.
register_block(GPTBlock, zero_init=["attn.proj", "mlp.proj"], init_fn=gpt_init, name="examples.GPTBlock")


def copy_task_batch(batch: int, context: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences whose second half repeats the first: the model must learn to copy."""
    half = torch.randint(0, vocab_size, (batch, context // 2), generator=generator)
    return torch.cat([half, half], dim=1)


def main(steps: int = 60, grow_at: int = 30) -> None:
    from lightning_depthgrow.surgery import insert_identity_block, update_optimizer

    torch.manual_seed(0)
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    probe = copy_task_batch(4, model.context, 32, generator)
    for step in range(steps):
        if step == grow_at:
            model.eval()
            with torch.no_grad():
                before = model(probe)
                _, change = insert_identity_block(
                    model, "blocks", after_index=len(model.blocks) - 1, seed=step, check_input=probe
                )
                drift = (model(probe) - before).abs().max().item()
            model.train()
            update_optimizer(optimizer, change, model)
            print(f"step {step}: grew to {len(model.blocks)} blocks; max logit change {drift:.1e}")
        tokens = copy_task_batch(32, model.context, 32, generator)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
