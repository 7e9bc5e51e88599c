"""Two small decoder-only transformers for the training benchmarks: GPT-2 and Llama shaped.

They exist to measure memory and step time with real forward and backward passes, so they keep the
parameter shapes and layer kinds of the originals (GPT-2: LayerNorm, fused QKV, GELU MLP, tied
embedding; Llama 3.2: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP, tied
embedding)
and nothing else (no dropout, no KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    kind: str  # "gpt2" or "llama"
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    hidden: int
    context: int


CONFIGS = {
    "gpt2_124m": Config("gpt2", 50257, 768, 12, 12, 12, 3072, 1024),
    "llama_1b": Config("llama", 128256, 2048, 16, 32, 8, 8192, 2048),  # Llama 3.2 1B shapes
    "llama_3b": Config("llama", 128256, 3072, 28, 24, 8, 8192, 2048),  # Llama 3.2 3B shapes
    "tiny_gpt2": Config("gpt2", 256, 64, 2, 4, 4, 256, 64),
    "tiny_llama": Config("llama", 256, 64, 2, 4, 2, 176, 64),
}


def _rms_norm(dim: int) -> nn.Module:
    if hasattr(nn, "RMSNorm"):
        return nn.RMSNorm(dim, eps=1e-5)
    raise RuntimeError("the Llama-shaped model needs torch.nn.RMSNorm (torch >= 2.4)")


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c, self.head_dim = c, c.dim // c.heads
        kv = c.kv_heads * self.head_dim
        if c.kind == "gpt2":
            self.qkv = nn.Linear(c.dim, c.dim + 2 * kv)
        else:
            self.qkv = nn.Linear(c.dim, c.dim + 2 * kv, bias=False)
        self.out = nn.Linear(c.dim, c.dim, bias=c.kind == "gpt2")

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None):
        b, t, _ = x.shape
        kv = self.c.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.c.dim, kv, kv], dim=-1)
        q = q.view(b, t, self.c.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.c.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.c.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.c.kv_heads != self.c.heads)
        return self.out(y.transpose(1, 2).reshape(b, t, self.c.dim))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        norm = (lambda: nn.LayerNorm(c.dim)) if c.kind == "gpt2" else (lambda: _rms_norm(c.dim))
        self.norm1, self.attn, self.norm2 = norm(), Attention(c), norm()
        if c.kind == "gpt2":
            self.up, self.down = nn.Linear(c.dim, c.hidden), nn.Linear(c.hidden, c.dim)
        else:
            self.gate_up = nn.Linear(c.dim, 2 * c.hidden, bias=False)
            self.down = nn.Linear(c.hidden, c.dim, bias=False)
        self.kind = c.kind

    def forward(self, x, rotary):
        x = x + self.attn(self.norm1(x), rotary)
        h = self.norm2(x)
        if self.kind == "gpt2":
            h = F.gelu(self.up(h), approximate="tanh")
        else:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
            h = F.silu(gate) * up
        return x + self.down(h)


class Transformer(nn.Module):
    """A decoder-only language model; ``forward(tokens)`` returns the next-token loss."""

    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.pos = nn.Embedding(c.context, c.dim) if c.kind == "gpt2" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim) if c.kind == "gpt2" else _rms_norm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2 and Llama 3.2 1B/3B
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        t = inputs.shape[1]
        x = self.embed(inputs)
        rotary = None
        if self.pos is not None:
            x = x + self.pos(torch.arange(t, device=tokens.device))
        else:
            half = self.c.dim // self.c.heads // 2
            freq = 500000.0 ** (-torch.arange(half, device=tokens.device) / half)
            angle = torch.arange(t, device=tokens.device)[:, None] * freq
            rotary = (angle.cos(), angle.sin())
        for block in self.blocks:
            x = block(x, rotary)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build(name: str, device: torch.device | str = "cpu") -> Transformer:
    if name not in CONFIGS:
        raise ValueError(f"no model {name!r}; known: {sorted(CONFIGS)}")
    with torch.device(device):
        return Transformer(CONFIGS[name])
