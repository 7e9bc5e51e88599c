"""torch.distributed: DDP, FSDP2 (DTensor parameters) and distributed checkpoints (DCP).

DDP. Each rank holds the whole model and its own optimizer state; DDP all-reduces (averages) the
gradients inside backward and writes the result into ``p.grad`` before ``step()`` reads it, so
training is the same as one process stepping on the averaged gradient. How the gradient reaches
the optimizer's storage:

* per-tensor steps read ``p.grad`` where DDP left it (DDP's bucket view with
  ``gradient_as_bucket_view=True``, else a tensor DDP copied the averaged bucket into);
* flat buckets (CUDA default) make ``p.grad`` a view into the bucket's gradient buffer. With
  ``gradient_as_bucket_view=False`` (DDP's default) autograd accumulates into that view and DDP
  copies the averaged gradient back into it in place: the kernel reads it with no copy. With
  ``True`` DDP points ``p.grad`` at its own bucket at each backward; the next step copies it into
  the flat buffer (one gradient copy) and points ``p.grad`` back, which DDP accepts.

Gradient release cannot run under DDP (it would step on the unreduced gradient).

FSDP2 (``fully_shard``). Parameters become DTensors sharded on dim 0 (``torch.chunk`` rows: the last
ranks may get fewer rows, or none). The optimizer steps each rank's local shard (``p.to_local()``, a
view of FSDP2's storage, so the update lands in place) with its local gradient shard, and keeps the
state of that shard only, laid out as for any tensor: flat, padded to whole groups of 32, so a
group never straddles two parameters or two ranks. FSDP2 all-gathers only the 16-bit weights; the
residual and the 8-bit states never leave their rank. Ranks with an empty shard still count steps.
FSDP2 needs one dtype per ``fully_shard`` unit: cast the whole model (``cast_model(model,
keep_fp32=None)``) or give fp32-kept norm layers their own unit. Rules that reduce over the whole
parameter (LAMB, LARS: ``norm``, ``sum_all``) sum over each local shard, then all-reduce those sums
over the sharding ranks (:func:`shard_sums`) before any weight moves; ranks with an empty shard
still take part.

DTensor parameters never go in :class:`flashcompile.runtime.arena.Bucket` (it re-points ``p.data``, and
FSDP2 all-gathers from its own storage); :mod:`flashcompile.runtime.shards` steps them in one launch per
param group, dtype and device (flat mode, the CUDA default), or with gradient release one launch
per FSDP2 unit, right after FSDP2 reduce-scatters its gradients.

Checkpoints. ``Optimizer.state_dict()`` exports a DTensor parameter's state as DTensors placed like
the parameter, which ``torch.distributed.checkpoint`` saves and reshards to any number of ranks:

* per-element fields (8-bit codes, the weight split's residual, fp32 values): shaped like the
  parameter, so they reshard element by element; packed codes (4-bit, two to a byte) likewise,
  one code per element (``packing.py``);
* per-group fields (the fp16 scales), ``rows`` layout: when the parameter is sharded on dim 0 only
  and each row holds whole groups (``numel / shape[0]`` a multiple of 32: every weight matrix whose
  input size is), shaped ``(rows, row_len / 32)``. A shard is whole rows on any number of ranks, so
  its groups are the same groups of the parameter: loads are exact on any world size;
* per-group fields, ``elements`` layout, otherwise (biases, norm weights, odd row lengths, other
  placements): each group's scale repeated for each of its elements, shaped like the parameter. On
  load, a group whose elements all carry one scale keeps its codes (exact: always so where the
  sharding is unchanged); a group that collects elements of differently scaled saved groups is
  decoded element by element and re-encoded (within the codec's error bound of the saved value).

Checkpoint bytes per value of an 8-bit state: 1.0625 (rows) or 3 (elements), of a 4-bit state
the same (a byte per code); the residual: 1.
``get_state_dict``/``set_state_dict`` create a fresh optimizer's state by stepping it at lr 0 with
zero gradients; that call only allocates the state (no step is counted, so bias corrections and
Rprop's step sizes start as without a checkpoint). The keys are the in-memory ones (``exp_avg.codes``, ``exp_avg.scale``, ``param.residual``), so
``StateDictOptions(flatten_optimizer_state_dict=True)`` works too. ``load_state_dict`` also takes
this layout for plain (non-DTensor) parameters, e.g. a DCP checkpoint converted with
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from flashcompile.codecs import GROUP, PARAM, Codec, layout, packing
from flashcompile.compiler.plan import Plan, state_key
from flashcompile.runtime import interop

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor: if nothing imported
    it, nothing is one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def initialising_state() -> bool:
    """Whether ``Optimizer.step`` was called by DCP's ``_init_optim_state`` (the zero-gradient,
    lr 0 step that ``get_state_dict``/``set_state_dict`` take to create a fresh optimizer's state)."""
    module = sys.modules.get("torch.distributed.checkpoint.state_dict")
    init = getattr(module, "_init_optim_state", None)
    frame = sys._getframe(2)
    for _ in range(6):  # step's callers: torch.optim's hook wrapper, no_grad, then DCP
        if frame is None or init is None:
            return False
        if frame.f_code is init.__code__:
            return True
        frame = frame.f_back
    return False


def check_sharded(p: torch.Tensor, traced) -> None:
    """A rule that reduces over the whole parameter (``norm``, ``sum_all``) needs one sharded mesh
    dimension to all-reduce its sums over (:func:`shard_sums`); refuse other layouts. A matrix
    stage (``orthogonalize``) needs the whole matrix: refuse sharded params."""
    from flashcompile.language.dsl import Orthogonalize, SumAll

    if not is_dtensor(p):
        return
    if traced.rule.shaped and any(pl.is_shard() or pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"{traced.rule.name} steps each parameter in its own shape (means along its rows and "
            f"columns); the param of shape {tuple(p.shape)} is sharded ({p.placements}), and "
            "gathering it inside the step is not supported yet. Keep such params out of "
            "fully_shard (or replicate them), or optimize them with an element-wise rule")
    if any(out.has(Orthogonalize) for out in traced.outputs) and any(
            pl.is_shard() or pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"{traced.rule.name} orthogonalizes each parameter as a whole matrix; the param of "
            f"shape {tuple(p.shape)} is sharded ({p.placements}), and gathering it inside the "
            "step is not supported yet. Keep such params out of fully_shard (or replicate them), "
            "or optimize them with an element-wise rule")
    if not any(out.has(SumAll) for out in traced.outputs):
        return
    sharded = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if len(sharded) > 1 or any(pl.is_partial() for pl in p.placements):
        raise ValueError(
            f"{traced.rule.name} reduces over the whole parameter (norm or sum_all); the param of "
            f"shape {tuple(p.shape)} is placed {p.placements}: only one sharded mesh dimension "
            "(FSDP2's, or HSDP's shard dimension) is supported"
        )


def shard_sums(p: torch.Tensor):
    """For a DTensor sharded over one mesh dimension: a function that all-reduces per-parameter
    sums (in place) over that dimension's ranks, so each rank's norm covers the whole parameter.
    None for anything else (a plain tensor, or a replicated DTensor already holds it all)."""
    if not is_dtensor(p):
        return None
    sharded = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
    if not sharded:
        return None
    group = p.device_mesh.get_group(sharded[0])

    def combine(totals: torch.Tensor) -> None:
        torch.distributed.all_reduce(totals, group=group)

    return combine


def to_local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def like(p: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``local`` (this rank's part of a tensor of ``shape``, default ``p``'s) as a DTensor placed like
    the DTensor ``p``; for a plain ``p``, ``local`` itself."""
    if not is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    shape = tuple(p.shape) if shape is None else tuple(shape)
    stride = tuple(torch.empty(shape, device="meta").stride())
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def local_part(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``value`` laid out as the DTensor ``p`` is: a DTensor is redistributed to
    ``p``'s placements where they differ; a full tensor is sliced. For a plain ``p``: ``value``."""
    if is_dtensor(value):
        if not is_dtensor(p):
            return value.full_tensor()
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if not is_dtensor(p) or value.dim() == 0:
        return value
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(value.shape, p.device_mesh, p.placements)
    return value[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def groups_per_row(p: torch.Tensor) -> int | None:
    """Groups per row where the checkpoint's ``rows`` layout applies (else None): ``p`` is sharded on
    dim 0 only (or not at all) and each of its rows holds whole groups of 32."""
    if p.dim() == 0 or p.numel() == 0:
        return None
    if is_dtensor(p) and any(pl.is_shard() and not pl.is_shard(0) for pl in p.placements):
        return None
    row = p.numel() // p.shape[0]
    return row // GROUP if row % GROUP == 0 else None


def export_state(p: torch.Tensor, plan: Plan, state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint layout (module docstring) of ``p``'s state: views of the stored fields except
    ``elements``-layout scales (repeated per element)."""
    local = to_local(p)
    n = local.numel()
    per_row = groups_per_row(p)
    out = {k: v for k, v in state.items() if k not in plan.owned_fields}  # step, scalar states
    for key, f in plan.owned_fields.items():
        t = state[key]
        if f.per_value:
            out[key] = like(p, t[:n].view(local.shape))
        elif not f.per_group:  # packed codes: one per element
            out[key] = like(p, _unpacked(t, f)[:n].view(local.shape))
        elif per_row is not None:
            out[key] = like(p, t.view(-1, per_row), (p.shape[0], per_row))
        else:
            out[key] = like(p, t.repeat_interleave(GROUP)[:n].view(local.shape))
    return out


def is_checkpoint_layout(p: torch.Tensor, plan: Plan, saved: Mapping[str, Any]) -> bool:
    """Whether a plain param's saved state has the checkpoint layout rather than the flat one: some
    field is shaped like the param (or its rows of groups) instead of flat. A flat field of the
    wrong size is a wrong state, which the flat check names, not another layout."""
    fields = plan.owned_fields
    if not set(fields) <= set(saved):
        return False
    per_row = groups_per_row(p)
    layouts = {tuple(p.shape)} | ({(p.shape[0], per_row)} if per_row else set())
    flat = [layout.group_count(p.numel()) * f.width for f in fields.values()]
    return any(tuple(saved[k].shape) in layouts and tuple(saved[k].shape) != (m,)
               for k, m in zip(fields, flat))


def import_state(p: torch.Tensor, plan: Plan, saved: Mapping[str, Any], pid: Any,
                 rule_states: Mapping[str, str]) -> dict[str, Any]:
    """``p``'s stored state from the checkpoint layout, or from torch.optim's (param-shaped fp32
    states, as a torch optimizer under FSDP2 saves them), for this rank's shard. Checks shapes and
    dtypes before returning; re-encodes ``elements``-layout groups whose saved scales differ."""
    local = to_local(p).detach()
    parts = {k: local_part(v, p) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
    if interop.is_torch_format(rule_states, parts, local):
        return interop.import_state(local, plan, parts, pid)
    host = {"step", *(k for k, fact in rule_states.items() if fact == "scalar")}
    expected = plan.owned_fields
    if set(parts) != set(expected) | host:
        raise ValueError(
            f"state of param {pid} ({tuple(p.shape)}) has keys {sorted(parts)}, but "
            f"{plan.key.rule.name} with these codecs stores {sorted(set(expected) | host)}: it was "
            "saved by a different optimizer or with different codecs"
        )
    out = {k: torch.as_tensor(parts[k], dtype=torch.float32).detach().clone().cpu() for k in host}
    per_row = groups_per_row(p)
    for name, codec in plan.codecs.items():
        keys = {f.name: state_key(name, f) for f in codec.fields if state_key(name, f) in expected}
        for f in codec.fields:
            if f.name in keys:
                rows = per_row is not None and f.per_group
                want = (local.shape[0], per_row) if rows else tuple(local.shape)
                _check(parts[keys[f.name]], f.dtype, want, keys[f.name], pid, p)
        out.update(_regroup(codec, name, local, {f: parts[k] for f, k in keys.items()}, per_row))
    return out


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], key: str, pid: Any,
           p: torch.Tensor) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"state {key!r} of param {pid} ({tuple(p.shape)}) holds {t.dtype} {tuple(t.shape)} on this "
            f"rank, expected {dtype} {tuple(shape)}: saved by a different optimizer, codecs or model"
        )


def _regroup(codec: Codec, name: str, local: torch.Tensor, parts: Mapping[str, torch.Tensor],
             per_row: int | None) -> dict[str, torch.Tensor]:
    """One codec's stored fields, flat in this rank's groups of 32, from its checkpoint parts."""
    n = local.numel()
    count = layout.group_count(n)
    flat = {}
    for f in codec.fields:
        if f.name not in parts:
            continue
        t = parts[f.name].to(local.device)
        if f.per_group and per_row is not None:
            flat[f.name] = t.reshape(-1).contiguous()  # the rows' groups are this rank's groups
        elif t.is_contiguous() and n == count * GROUP:
            flat[f.name] = t.reshape(-1)  # no copy: the state may share the state dict's memory
        else:
            flat[f.name] = t.new_zeros(count * GROUP)
            flat[f.name][:n] = t.reshape(-1)
    lanes = [f for f in codec.fields if f.per_group and f.name in parts and per_row is None]
    if lanes:
        flat.update(_one_scale_per_group(codec, name, local, flat, lanes))
    for f in codec.fields:  # packed codes, one per element in the checkpoint
        if f.name in parts and not (f.per_value or f.per_group):
            flat[f.name] = _packed(flat[f.name], f)
    return {state_key(name, f): flat[f.name] for f in codec.fields if f.name in parts}


def _unpacked(stored: torch.Tensor, f) -> torch.Tensor:
    """A packed field's codes, one element each (flat, ``f.dtype``)."""
    return packing.unpack(stored.view(-1, f.width), packing.code_bits(f)).to(f.dtype).reshape(-1)


def _packed(codes: torch.Tensor, f) -> torch.Tensor:
    """Inverse of :func:`_unpacked`."""
    return packing.pack(codes.view(-1, GROUP).to(torch.int32), packing.code_bits(f),
                        f.dtype).reshape(-1)


def _lanes_as_groups(codec: Codec, flat: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``codec``'s values lane by lane, each decoded with its own saved fields (fields flat, one
    element per value): a packed field's code goes first in a group of its own."""
    args = []
    for f in codec.fields:
        t = flat[f.name]
        if f.per_value or f.per_group:
            args.append(t.view(-1, 1))
            continue
        codes = torch.zeros(t.numel(), f.pack, dtype=torch.int32, device=t.device)
        codes[:, 0] = t.to(torch.int32)
        args.append(packing.pack(codes, packing.code_bits(f), f.dtype))
    return codec.decode(*args)[:, :1]


def _one_scale_per_group(codec: Codec, name: str, local: torch.Tensor,
                         flat: Mapping[str, torch.Tensor], lanes) -> dict[str, torch.Tensor]:
    """Per-group fields from their per-element copies. Groups whose valid lanes agree bit for bit
    keep their codes; the others are decoded lane by lane (each with its saved group's fields) and
    re-encoded in this rank's groups."""
    n = local.numel()
    count = layout.group_count(n)
    valid = (torch.arange(count * GROUP, device=local.device) < n).view(count, GROUP)
    same = torch.ones(count, 1, dtype=torch.bool, device=local.device)
    for f in lanes:
        bits = flat[f.name].view(_BITS[flat[f.name].element_size()]).view(count, GROUP)
        same &= ((bits == bits[:, :1]) | ~valid).all(dim=1, keepdim=True)
    kept = {f.name: flat[f.name].view(count, GROUP)[:, :1] for f in lanes}
    if bool(same.all()):
        return {k: v.reshape(-1).contiguous() for k, v in kept.items()}
    if name == PARAM:
        raise ValueError(
            f"the master weight's codec {codec.name} has per-group fields whose saved groups do not "
            "match this rank's: re-encoding it would change the parameter; load on the sharding it "
            "was saved with"
        )
    x = _lanes_as_groups(codec, flat).view(count, GROUP)
    fresh = codec.encode(torch.where(valid, x, torch.zeros_like(x)))
    out = {}
    for f, new in zip(codec.fields, fresh):
        if not (f.per_value or f.per_group):  # packed: compared one code per element
            new = _unpacked(new, f).view(count, GROUP)
        old = kept[f.name] if f.per_group else flat[f.name].view(count, GROUP)
        out[f.name] = torch.where(same, old, new).reshape(-1).contiguous()
    return out
