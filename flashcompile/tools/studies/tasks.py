"""Training tasks for the studies: real data that needs no download, small models, shared batches.

* ``digits``: scikit-learn's 8x8 digits (1797 images, 10 classes), standardised, 75/25 split, and an
  MLP 64-128-128-10.
* ``chars``: character-level language modelling on the text of Python's interactive help topics
  (``pydoc_data.topics``, about 465k characters of English prose and code), 90/10 split, and a
  small pre-LayerNorm causal transformer.

Every run of a task draws its initial weights and its batch order from the seed alone, so runs with
different optimizers see the same initialisation and the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Task:
    """A dataset, a model factory and how to draw batches and evaluate."""

    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    make_model: Callable[[], nn.Module]
    batch_size: int
    draw: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.train
        idx = torch.randint(len(x), (self.batch_size,), generator=gen).to(x.device)
        return self.draw(x, y, idx)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in fp32 whatever the model's dtype (bf16 logits would round the loss)."""
        logits = model(x).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(mean test loss, test accuracy in percent) on the held-out split (chars: next-character
        loss and accuracy over fixed windows of the held-out text)."""
        x, y = self.test
        logits = model(x).float()
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        accuracy = (logits.argmax(-1) == y).float().mean().item() * 100
        return F.cross_entropy(logits, y).item(), accuracy


def digits(device: str = "cpu", hidden: int = 128) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)

    def t(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    def make_model() -> nn.Module:
        return MLP(hidden).to(device)

    return Task("digits", (t(scaler.transform(x_tr), torch.float32), t(y_tr, torch.long)),
                (t(scaler.transform(x_te), torch.float32), t(y_te, torch.long)), make_model, 64,
                lambda x, y, idx: (x[idx], y[idx]))


class MLP(nn.Module):
    """64-hidden-hidden-10 with GELU; casts its fp32 input to its own dtype (bf16 runs)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype))


def text() -> str:
    """The help topics of Python's ``pydoc`` (standard library), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def chars(device: str = "cpu", context: int = 64, width: int = 64, layers: int = 2,
          batch_size: int = 32) -> Task:
    data = text()
    vocab = sorted(set(data))
    ids = torch.tensor([vocab.index(c) for c in data], dtype=torch.long)
    split = int(0.9 * len(ids))
    train, held_out = ids[:split].to(device), ids[split:].to(device)

    def draw(x, _y, idx):
        idx = idx % (len(x) - context - 1)
        windows = idx[:, None] + torch.arange(context + 1, device=x.device)
        seq = x[windows]
        return seq[:, :-1], seq[:, 1:]

    # 256 fixed windows of the held-out text (about 16k predicted characters)
    test = draw(held_out, None, torch.randint(len(held_out), (256,),
                                              generator=torch.Generator().manual_seed(1234)).to(device))

    def make_model() -> nn.Module:
        return CharTransformer(len(vocab), context, width, layers).to(device)

    return Task("chars", (train, train), test, make_model, batch_size, draw)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """GPT-style: token + position embeddings, pre-LN blocks, final LN, untied head."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if "proj" in name else 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


TASKS = {"digits": digits, "chars": chars}
# Larger models for GPU runs (``--size gpu``): about 3.2M parameters for chars.
GPU_SIZES = {"digits": {"hidden": 512},
             "chars": {"context": 256, "width": 256, "layers": 4, "batch_size": 64}}
