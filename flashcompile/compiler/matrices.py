"""The matrix stage between a rule's two element-wise phases (``orthogonalize``: Muon).

The phase before the stage leaves each parameter's stage argument, bf16, in a ``(G, 32)`` buffer laid
out as the parameters' flat storage (each parameter from a group boundary, in its memory order).
:class:`Matrices` knows where each parameter's matrix lies in it; :func:`orthogonalize` runs the
Newton-Schulz iteration on every matrix, batched over parameters of one shape (one batched matrix
product per iteration for a batch), and writes each result back in place, where the phase after
the stage reads it. A batch holds at most :data:`BATCH_ELEMENTS` values: the stacked copy and the
iteration's products are temporaries of the step, which a model's worth of same-shape matrices
(32 layers of 4096 x 4096) would make gigabytes; small matrices, where batching saves launches,
still go all in one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from flashcompile.codecs import GROUP, layout
from flashcompile.language.dsl import lr_ratio, newton_schulz

# values in one stacked batch: 64 MiB of bf16 (GPT-2's 48 matrices of 768 x 768 in one batch; two
# 4096 x 4096 matrices)
BATCH_ELEMENTS = 1 << 25


class Matrices:
    """Where the matrices of ``params`` (2-D, laid end to end in this order, each from a group
    boundary) lie in a stage buffer, and each one's shape ratio (``dsl.LR_RATIOS[ratio]``) as the
    phase after the stage reads it: ``ratios`` (fp32, one per parameter, and a 0 for the empty
    parameter ``ends`` closes with) ending at ``ends`` (:func:`layout.segment_ends`)."""

    def __init__(self, params: Sequence[torch.Tensor], ratio: int, device: torch.device):
        for p in params:
            if p.dim() != 2:
                raise ValueError(
                    f"orthogonalize needs 2-D parameters (a matrix each); got one of shape "
                    f"{tuple(p.shape)}. Optimize it with another rule: a param group of its own "
                    "(e.g. AdamW for embeddings' vectors, biases and norms)")
        self.shapes = [tuple(p.shape) for p in params]
        self.orders = [layout.memory_order(p) for p in params]
        counts = [layout.group_count(p.numel()) for p in params]
        self.starts = [GROUP * s for s in itertools.accumulate([0, *counts[:-1]])]
        self.ends = layout.segment_ends(counts, device)
        self.ratios = torch.tensor([*(lr_ratio(ratio, shape) for shape in self.shapes), 0.0],
                                   dtype=torch.float32, device=device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, shape in enumerate(self.shapes):
            by_shape.setdefault(shape, []).append(i)
        self.batches = [same[k:k + per] for shape, same in by_shape.items()
                        for per in [max(1, BATCH_ELEMENTS // (shape[0] * shape[1]))]
                        for k in range(0, len(same), per)]

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's matrix in the stage buffer, shaped (and strided) like the parameter."""
        flat = buffer.view(-1)
        return [layout.unflat(flat[start:start + shape[0] * shape[1]],
                              torch.empty(shape, device="meta"), order)
                for start, shape, order in zip(self.starts, self.shapes, self.orders)]


def orthogonalize(buffer: torch.Tensor, matrices: Matrices, values: Sequence[float],
                  slots: Sequence[int]) -> None:
    """Run the stage in place on ``buffer`` (bf16 ``(G, 32)``): ``values[slot]`` are the kernel
    scalars ``_s[slot]`` of steps, a, b, c and eps (the host list the step uploaded)."""
    steps, a, b, c, eps = (values[slot] for slot in slots)
    views = matrices.views(buffer)
    for batch in matrices.batches:
        if len(batch) == 1:
            x = views[batch[0]]
            x.copy_(newton_schulz(x, steps, a, b, c, eps))
            continue
        stacked = torch.stack([views[i] for i in batch])
        out = newton_schulz(stacked, steps, a, b, c, eps)
        for k, i in enumerate(batch):
            views[i].copy_(out[k])
