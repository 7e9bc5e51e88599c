"""The storage layout every plan reads: values in groups of :data:`GROUP`, a parameter padded to
whole groups, fields seen as ``(G, 32)`` (per element) or ``(G, 1)`` (per group).

A parameter's values are laid out in its memory order: the order of its storage for a dense
tensor (a channels_last weight keeps its format in flat buffers, and its gradient, which autograd
makes with the weight's strides, reads in place), the logical order otherwise. Element-wise rules
see the same values in any order; per-parameter sums are sums.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from flashcompile.codecs import GROUP


def group_count(numel: int) -> int:
    """Groups of :data:`GROUP` that hold ``numel`` values (the last one padded)."""
    return -(-numel // GROUP)


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of ``t`` from outermost to innermost in memory, or None where ``t`` is contiguous
    or not dense (a view with gaps or overlaps: its values go in logical order)."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d])))
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return None  # gaps or overlaps
        expected *= t.shape[d]
    return order


def flat(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """``t``'s values as one contiguous dim in ``order`` (:func:`memory_order` of its param): a
    view where ``t`` is laid out like the param, a copy otherwise (a strided 1-D ``t`` too)."""
    return (t if order is None else t.permute(order)).reshape(-1).contiguous()


def flat_view(t: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """As :func:`flat`, but a view wherever ``t`` is laid out like the param (no contiguous copy
    of a 1-D view: for a concatenation, which reads any strides)."""
    return (t if order is None else t.permute(order)).reshape(-1)


def unflat(values: torch.Tensor, like: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """Inverse of :func:`flat`: ``values`` (``like.numel()`` of them) shaped like ``like``, with
    ``like``'s strides where ``order`` is its memory order."""
    if order is None:
        return values.view(like.shape)
    inverse = [order.index(d) for d in range(len(order))]  # no sorted(key=): dynamo traces this
    return values.view([like.shape[d] for d in order]).permute(inverse)


def padded(values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Flat ``values`` zero-padded to whole groups, as ``(G, GROUP)`` (a copy, in ``dtype``)."""
    n = values.numel()
    out = values.new_zeros(group_count(n) * GROUP, dtype=dtype or values.dtype)
    out[:n] = values.reshape(-1)
    return out.view(-1, GROUP)


def groups(t: torch.Tensor, width: int, first: int, count: int) -> torch.Tensor:
    """Groups [first, first + count) of a contiguous field of ``width`` elements per group
    (``Field.width``) as a ``(count, width)`` tensor over the same memory.

    Not a view: dynamo guards a view's base, whose shape differs from param to param, and would
    recompile for each new base shape. A fresh tensor set to the same storage has no base.
    """
    out = t.new_empty(0)
    out.set_(t.untyped_storage(), t.storage_offset() + first * width, (count, width), (width, 1))
    torch._dynamo.mark_static(out, 1)  # the group size is a constant of the kernel; only G varies
    return out


def segment_ends(counts: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The ``ends`` of :func:`~flashcompile.compiler.segments.segment_totals` for parameters of ``counts``
    groups laid end to end, plus one empty parameter at the end: ``ends`` never has size 1, which
    dynamo would compile as a separate specialisation (one parameter alone vs a bucket)."""
    ends = list(itertools.accumulate(counts))
    return _upload([*ends, ends[-1]], torch.int64, torch.device(device))


def lane_counts(numels: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The ``_lanes`` of a masked plan's ``step`` (``(G, 1)``, uint8) for parameters of ``numels``
    values laid end to end, each from a group boundary: 32 in a whole group, the values of its
    last group in a parameter's last. 1 byte per 32 values."""
    counts = [group_count(n) for n in numels]
    lanes = torch.full((sum(counts),), GROUP, dtype=torch.uint8)
    for end, n in zip(itertools.accumulate(counts), numels):
        if n % GROUP:
            lanes[end - 1] = n % GROUP
    return groups(lanes.to(device), 1, 0, lanes.numel())


def last_group_lanes(numel: int) -> int:
    """Valid values in the last of a parameter's groups (:data:`GROUP` when none is padded)."""
    return numel - (group_count(numel) - 1) * GROUP


def scalar_vector(lanes: int, values: Sequence[float], device: torch.device) -> torch.Tensor:
    """The kernel's first argument on ``device``: ``[lanes, *values]``, where ``lanes`` is the
    valid values of the last group a call covers (:data:`GROUP` for calls over whole groups, or
    :func:`last_group_lanes` of one parameter) and ``values`` the plan's scalar prologue
    (``Plan.scalars``). Every kernel call builds its scalars here."""
    return _upload([lanes, *values], torch.float32, device)


def _upload(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``. On CUDA through pinned memory without blocking: a
    pageable copy would make the host wait for all queued GPU work at every call."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


# Groups encoded at a time: encoding in eager torch makes several fp32 temporaries of its input, so
# a parameter is encoded in chunks of 32M values (128 MiB per temporary), never all at once (a
# 2^32-element parameter would need tens of GiB for a moment).
CHUNK_GROUPS = 1 << 20


def encode_flat(codec, values: torch.Tensor,
                out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """One parameter's flat ``values`` (in its memory order) zero-padded to whole groups and
    encoded by ``codec``: one flat, padded tensor per field, written into ``out``'s tensors where
    given (a flat buffer's views: no second copy of the state). Codecs are group-local, so chunks
    of whole groups encode as the whole would."""
    values = values.reshape(-1)
    count = group_count(values.numel())
    if count == 0 or (out is None and count <= CHUNK_GROUPS):  # one chunk: no copy
        whole = [t.reshape(-1).contiguous() for t in codec.encode(padded(values, torch.float32))]
        return whole if out is None else [w if o is None else o for o, w in zip(out, whole)]
    fields = list(out) if out is not None else [None] * len(codec.fields)
    for first in range(0, count, CHUNK_GROUPS):
        last = min(count, first + CHUNK_GROUPS)
        part = codec.encode(padded(values[first * GROUP:last * GROUP], torch.float32))
        for k, t in enumerate(part):
            width = t.numel() // (last - first)
            if fields[k] is None:
                fields[k] = t.new_empty(count * width)
            fields[k][first * width:last * width].copy_(t.reshape(-1))
    return fields


def encode_zeros(codec, numel: int, device: torch.device,
                 out: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """:func:`encode_flat` of ``numel`` zeros without an fp32 tensor of them: every group of zeros
    encodes alike, so one group is encoded and its fields repeated."""
    one = codec.encode(torch.zeros(1, GROUP, dtype=torch.float32, device=device))
    count = group_count(numel)
    fields = list(out) if out is not None else [None] * len(one)
    for k, t in enumerate(one):
        repeated = t.reshape(1, -1).expand(count, -1)
        if fields[k] is None:
            fields[k] = repeated.reshape(-1).contiguous()
        else:
            fields[k].view(count, t.numel()).copy_(repeated)
    return fields


def decode_flat(codec, fields: Sequence[torch.Tensor], numel: int) -> torch.Tensor:
    """Inverse of :func:`encode_flat`: the first ``numel`` decoded values, flat (fp32)."""
    count = group_count(numel)
    views = [t.view(count, f.width) for f, t in zip(codec.fields, fields)]
    return codec.decode(*views).reshape(-1)[:numel]


def adopt_field(p: torch.Tensor, codec, field, key: str, given: torch.Tensor) -> torch.Tensor:
    """A stored field of ``p`` that someone set before its first step (a step pre-hook
    initialising states, as torch.optim allows), as the plan stores it: kept when laid out so;
    a single-field codec's values shaped like ``p``, from a float dtype the field holds exactly
    (no precision lost), encoded; anything else refused, since the kernel would read it as
    padded groups."""
    stored = group_count(p.numel()) * field.width
    if given.dtype == field.dtype and given.numel() == stored and given.is_contiguous():
        return given
    if (len(codec.fields) == 1 and given.shape == p.shape and given.is_floating_point()
            and torch.promote_types(given.dtype, field.dtype) == field.dtype):
        return encode_flat(codec, flat(given.detach().to(torch.float32), memory_order(p)))[0]
    raise ValueError(
        f"optimizer state {key!r} of the param of shape {tuple(p.shape)} was set to a "
        f"{given.dtype} tensor of shape {tuple(given.shape)}; this optimizer stores it as "
        f"{stored} {field.dtype} values (codec {codec.name!r}, padded to groups of {GROUP}). "
        "Leave it unset, or set it shaped like the param for a single-field codec "
        "(codecs='fp32')")
