"""The models ``flashcompile train-bench`` trains, each with its batches and its loss.

Real architectures from the libraries users train them from (HF transformers' GPT-2 built from its
config, torchvision's ResNet-50 and ViT-B/16; no weights are downloaded), plus two tiny models with
the same layer kinds for CPU smoke runs. Data is synthetic but learnable, so losses fall and can be
compared between setups: a fixed set of batches, cycled (images: random pixels, random labels, to
memorise; text: a random half sequence followed by its copy, which a causal model learns to copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    # (generator, device, batch) -> one batch; loss(model, batch) -> scalar
    batch: Callable[[torch.Generator, torch.device, int], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    default_batch: int
    unit: str  # what a batch counts: "tokens" or "images"
    per_item: int  # tokens per sequence, or 1 image
    channels_last: bool = False


def _hf_gpt2() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config())


def _tiny_gpt2() -> nn.Module:
    from flashcompile.tools.bench_models import build

    return build("tiny_gpt2")


def _copy_task(vocab: int, length: int):
    def batch(gen: torch.Generator, device: torch.device, size: int) -> tuple:
        half = torch.randint(0, vocab, (size, length // 2), generator=gen)
        return (torch.cat([half, half], dim=1).to(device),)
    return batch


def _hf_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens, use_cache=False).loss


def _own_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    return model(batch[0])  # bench_models.Transformer returns its next-token loss


def _images(size: int, classes: int):
    def batch(gen: torch.Generator, device: torch.device, count: int) -> tuple:
        x = torch.randn(count, 3, size, size, generator=gen)
        y = torch.randint(0, classes, (count,), generator=gen)
        return x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    return batch


def _classify(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    x = x if torch.is_autocast_enabled() or dtype == torch.float32 else x.to(dtype)
    return nn.functional.cross_entropy(model(x).float(), y)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()
    return build


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


MODELS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(_hf_gpt2, _copy_task(50257, 1024), _hf_loss, 8, "tokens", 1024),
    "resnet50": ModelSpec(_torchvision("resnet50"), _images(224, 1000), _classify, 64, "images",
                          1, channels_last=True),
    "vit_b_16": ModelSpec(_torchvision("vit_b_16"), _images(224, 1000), _classify, 64, "images",
                          1),
    "tiny_gpt2": ModelSpec(_tiny_gpt2, _copy_task(256, 64), _own_loss, 4, "tokens", 64),
    "tiny_cnn": ModelSpec(_tiny_cnn, _images(16, 10), _classify, 8, "images", 1,
                          channels_last=True),
}
