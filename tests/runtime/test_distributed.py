"""DDP, FSDP2 and DCP on 2 processes: the same training as one process, local state only,
checkpoints that resume bit-exactly and reshard from 2 ranks to 1.

Every test runs on CPU with gloo, and on 2 GPUs with NCCL (marked ``cuda``; skipped without 2 GPUs).
Each test starts its ranks from one forkserver that imported torch and flashcompile once; a rank's
assertion fails the test with that rank's traceback.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import flashcompile as fc
from flashcompile.codecs import GROUP, PARAM, four_bit
from flashcompile.runtime.distributed import groups_per_row, local_part
from flashcompile.testing import bound
from flashcompile.tools import bench_models

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]),
]

LR = {"lr": 1e-2, "weight_decay": 0.1}
_runs = itertools.count()


# ---- running ranks --------------------------------------------------------------------------------

def _launch(fn, world_size: int, tmp_path: Path, device: str, timeout: float = 300.0) -> None:
    """Run ``fn(rank, world_size, tmp_path, device)`` on ``world_size`` ranks (``device`` "cpu":
    gloo; "cuda": NCCL, rank r on GPU r); raise with the traceback of every rank that failed."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "flashcompile", "torch.distributed.fsdp",
                                "torch.distributed.checkpoint", "test_distributed"])
    store = tmp_path / f"store{next(_runs)}"
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, str(store), tmp_path, device))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            time.sleep(2.0)  # let the others write their errors, then stop them
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    errors = [(tmp_path / f"error{rank}").read_text() for rank in range(world_size)
              if (tmp_path / f"error{rank}").exists()]
    if errors or any(p.exitcode != 0 for p in procs):
        raise AssertionError("\n".join(errors) or f"ranks exited with {[p.exitcode for p in procs]}")


def _rank_main(fn, rank, world_size, store, tmp_path, device):
    torch.set_num_threads(1)
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
            # bit-identical comparisons: attention's math backend has no atomics in backward
            for backend in ("flash", "mem_efficient", "cudnn"):
                getattr(torch.backends.cuda, f"enable_{backend}_sdp", lambda _: None)(False)
        dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"file://{store}",
                                rank=rank, world_size=world_size)
        fn(rank, world_size, tmp_path, device)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (any failure goes to the parent with its traceback)
        (tmp_path / f"error{rank}").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        os._exit(1)


# ---- models and data ------------------------------------------------------------------------------

class Uneven(nn.Module):
    """Every kind of shard on 2 ranks: 33 rows of 10 (17 + 16 rows, rank 1 starting mid-group),
    1-D params of 33 and 3 (starting mid-group), rows of whole groups (3 rows of 64: 2 + 1, and
    64 rows of 33: rank 1 starting on a group boundary), a single row (rank 1's shard empty), an
    fp32 LayerNorm next to bf16 weights, and optionally a param that never gets a gradient."""

    def __init__(self, spare: bool = False):
        super().__init__()
        self.inp = nn.Linear(10, 33)
        self.norm = nn.LayerNorm(33)
        self.mid = nn.Linear(33, 64)
        self.gain = nn.Parameter(torch.ones(1, 64))
        self.out = nn.Linear(64, 3)
        if spare:
            self.spare = nn.Parameter(torch.ones(40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm(self.inp(x)))
        return self.out(F.gelu(self.mid(h)) * self.gain)


def _uneven(device: str, seed: int = 0, spare: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return fc.cast_model(Uneven(spare).to(device), keep_fp32=fc.NORM_LAYERS)  # 2 dtypes


def _uneven_loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x, y = torch.randn(8, 10, generator=gen).bfloat16(), torch.randint(0, 3, (8,), generator=gen)
    device = next(model.parameters()).device
    return F.cross_entropy(model(x.to(device)).float(), y.to(device))


def _gpt2(device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fc.cast_model(bench_models.build("tiny_gpt2", device), keep_fp32=None)  # FSDP2: 1 dtype


def _gpt2_loss(model: nn.Module, step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return model(torch.randint(0, 256, (2, 17), generator=gen).to(next(model.parameters()).device))


def _shard(model: nn.Module) -> nn.Module:
    """fully_shard each block (GPT-2) or the fp32 LayerNorm (FSDP2 all-gathers one dtype per
    unit), then the root."""
    from torch.distributed.fsdp import fully_shard

    for m in [*getattr(model, "blocks", ()), *([model.norm] if isinstance(model, Uneven) else [])]:
        fully_shard(m)
    return fully_shard(model)


def _reference_step(model: nn.Module, opt, loss_fn, step: int, world_size: int) -> None:
    """One process stepping on the gradient DDP and FSDP2 average: each rank's batch, summed by
    autograd, divided by the world size (exact for 2, as the collectives' average)."""
    for rank in range(world_size):
        loss_fn(model, step, rank).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(world_size)
    opt.step()
    opt.zero_grad()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    """How ``got`` differs from ``want`` (for assertion messages): placement, shape, dtype, the
    largest difference and where it is, how many values differ."""
    got, want = _full(got).detach(), _full(want).detach()
    head = (f"got {got.dtype} {tuple(got.shape)} on {got.device}, "
            f"want {want.dtype} {tuple(want.shape)} on {want.device}")
    if got.shape != want.shape:
        return head
    a, b = got.cpu().double(), want.cpu().double()
    diff = (a - b).abs().nan_to_num(float("inf"))
    if not diff.numel():
        return head
    i = int(diff.argmax())
    return (f"{head}; max |diff| {diff.max().item():.6g} at flat index {i} (got "
            f"{a.reshape(-1)[i].item():.8g}, want {b.reshape(-1)[i].item():.8g}); "
            f"{int((a != b).sum())} of {a.numel()} values differ")


def _assert_same(got: torch.Tensor, want: torch.Tensor, *what) -> None:
    """Bit-identical values, compared on the CPU: step counters live on the host, and
    ``torch.equal`` raises (not fails) for tensors on different devices."""
    got, want = _full(got).detach(), _full(want).detach()
    assert torch.equal(got.cpu(), want.cpu()), (*what, _mismatch(got, want))


def _assert_within(got: torch.Tensor, want: torch.Tensor, codec, *what) -> None:
    """``got`` within ``codec``'s error bound of ``want``, elementwise."""
    got, want = _full(got).detach().cpu(), _full(want).detach().cpu()
    limit = bound(codec, want)
    excess = (got - want).abs() - limit
    if torch.all(excess <= 0):  # (also for empty shards)
        return
    worst = f"{int((excess > 0).sum())} values beyond the bound, worst by {excess.max().item():.6g}"
    raise AssertionError((*what, f"codec {getattr(codec, 'name', codec)}", worst,
                          _mismatch(got, want)))


# ---- DDP ------------------------------------------------------------------------------------------

def _ddp(rank, world_size, tmp_path, device):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for flat, as_view in itertools.product([False, True], [False, True]):
        model = DDP(_uneven(device), gradient_as_bucket_view=as_view)
        compile = device != "cpu"  # CUDA: flat buckets replay their step as a CUDA graph
        opt = fc.AdamW(model.parameters(), compile=compile, flat=flat, **LR)
        ref = _uneven(device)
        ref_opt = fc.AdamW(ref.parameters(), compile=compile, flat=flat, **LR)
        for step in range(3):
            _uneven_loss(model, step, rank).backward()
            opt.step()
            if flat and step:
                # without bucket views DDP averages into our gradient views; with them, DDP points
                # .grad into its own buckets each backward, and a step copies them (it never
                # replaces a gradient it did not make)
                assert opt._buckets
                assert all(_in_buffer(p.grad, opt) != as_view for p in model.parameters())
            opt.zero_grad()
            _reference_step(ref, ref_opt, _uneven_loss, step, world_size)
            for p, q in zip(model.parameters(), ref.parameters()):
                _assert_same(p, q, f"flat={flat} gradient_as_bucket_view={as_view} step {step}")
        with pytest.raises(TypeError, match="DistributedDataParallel"):
            fc.enable_gradient_release(model, opt)


def _in_buffer(grad: torch.Tensor, opt) -> bool:
    return any(b.grads.data_ptr() <= grad.data_ptr() < b.grads.data_ptr() + b.grads.nbytes
               for b in opt._buckets.values())


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_steps_as_one_process_on_the_averaged_gradient(tmp_path, device):
    """Per tensor or in flat buckets (CUDA: compiled, replayed as a CUDA graph), with or without
    DDP's gradient bucket views: bit-identical."""
    _launch(_ddp, 2, tmp_path, device)


# ---- FSDP2 ----------------------------------------------------------------------------------------

def _fsdp_whole_groups(rank, world_size, tmp_path, device):
    sharded, flat, released = (_shard(_gpt2(device)) for _ in range(3))
    opt = fc.AdamW(sharded.parameters(), compile=False, flat=False, **LR)
    opt_flat = fc.AdamW(flat.parameters(), compile=False, flat=True, **LR)
    opt_rel = fc.AdamW(released.parameters(), compile=False, **LR)
    fc.enable_gradient_release(released, opt_rel)
    one_by_one = []  # gradient release steps each FSDP2 unit in one launch: no param steps alone
    opt_rel.step_param = lambda p, group=None, step=opt_rel.step_param: (
        one_by_one.append(p), step(p, group))
    ref = _gpt2(device)
    ref_opt = fc.AdamW(ref.parameters(), compile=False, **LR)
    for step in range(3):
        for model, o in ((sharded, opt), (flat, opt_flat), (released, opt_rel)):
            _gpt2_loss(model, step, rank).backward()
            o.step()
            o.zero_grad()
        _reference_step(ref, ref_opt, _gpt2_loss, step, world_size)
    assert len(opt_flat._buckets) == 1 and not opt._buckets and not one_by_one
    for (name, p), f, r, q in zip(sharded.named_parameters(), flat.parameters(),
                                  released.parameters(), ref.parameters()):
        assert p.to_local().numel() % GROUP == 0, name  # every shard starts on a group boundary
        for which, model_p in (("per tensor", p), ("flat", f), ("release", r)):
            _assert_same(model_p, q, name, which, "weight")
        for key in ["param", "exp_avg", "exp_avg_sq"]:
            got = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
            want = ref_opt.master_weight(q) if key == PARAM else ref_opt.state_value(q, key)
            _assert_same(got, want, name, key)
        assert r.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_steps_as_one_process_where_shards_hold_whole_groups(tmp_path, device):
    """tiny GPT-2 on 2 ranks: every shard starts on a group boundary, so stepping local shards
    (one by one, in one flat launch, or with gradient release in FSDP2's post-reduce-scatter hooks,
    one launch per FSDP2 unit) is bit-identical to one process stepping the whole model on the
    averaged gradient."""
    _launch(_fsdp_whole_groups, 2, tmp_path, device)


def _fsdp_uneven(rank, world_size, tmp_path, device):
    model, released = _shard(_uneven(device, spare=True)), _shard(_uneven(device, spare=True))
    opt = fc.AdamW(model.parameters(), compile=False, flat=True, **LR)
    opt_rel = fc.AdamW(released.parameters(), compile=False, **LR)
    fc.enable_gradient_release(released, opt_rel)
    ref = _uneven(device, spare=True)
    # per tensor, as on CPU: flat buckets (the CUDA default) give a param that never gets a gradient
    # a zero one, which weight decay then moves, so "spare" would differ from the released model's
    ref_opt = fc.AdamW(ref.parameters(), compile=False, flat=False, **LR)
    spare = ref.spare.detach().clone()
    for step in range(4):
        _uneven_loss(model, step, rank).backward()
        refs = {p: _fp32_step(opt, p) for p in model.parameters() if p.grad is not None}
        opt.step()
        for p, (new, codecs) in refs.items():  # step by step: the codec bound of the fp32 math
            for key, codec in codecs.items():
                got = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
                want = local_part(new[key], p)
                _assert_within(got.to_local(), want, codec, f"step {step}", key, tuple(p.shape))
        opt.zero_grad()
        _uneven_loss(released, step, rank).backward()
        opt_rel.step()
        _reference_step(ref, ref_opt, _uneven_loss, step, world_size)
    for (name, p), r, q in zip(model.named_parameters(), released.parameters(), ref.parameters()):
        if name == "spare":  # no gradient: release stepped its unit's others at backward's end
            _assert_same(r, spare, name, "released model: weight moved")
            _assert_same(q, spare, name, "reference (per tensor): weight moved")
            steps = int(opt_rel.state[r]["step"]) if "step" in opt_rel.state[r] else 0
            assert steps == 0, (name, f"released model counted {steps} steps")
            continue  # (flat buckets give it a zero gradient, as zero_grad(set_to_none=False))
        _assert_same(p, r, name, "flat vs release per unit")
        local = p.to_local()
        stored = sum(t.nbytes for t in opt.state[p].values() if t.dim())  # not step, bound_sq
        groups = -(-local.numel() // GROUP)
        plan = opt.plan_for(local, opt.flags_of(opt.param_groups[0]))
        assert stored == groups * GROUP * (plan.bytes_per_param - p.element_size()), (name, stored)
        assert int(opt.state[p]["step"]) == 4, (name, int(opt.state[p]["step"]))  # empty shards too
        # one process: the same training but for the codecs rounding in other groups (each step
        # moves a weight by up to about lr; 4 steps differ here by < 0.1 lr)
        diff = (opt.master_weight(p).full_tensor() - ref_opt.master_weight(q)).abs().max()
        assert diff <= 0.25 * LR["lr"], (name, f"max |diff| {diff.item():.6g} > {0.25 * LR['lr']}")
    if rank == 1:
        assert model.gain.to_local().numel() == 0
    _torch_interop(model, opt)


def _fsdp_trust_ratio(rank, world_size, tmp_path, device):
    # fp32 model and states: sharded and one-process runs differ only in the order of the sums
    def fp32_uneven():
        torch.manual_seed(0)
        return Uneven().to(device)

    def batch_loss(model, step, rank):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        return F.cross_entropy(model(x.to(device)), y.to(device))

    for make in (fc.LAMB, fc.LARS, fc.Prodigy):  # Prodigy: sums over every param, all ranks
        kw = {"lr": 1e-2, "codecs": "fp32", "compile": False}
        if make is fc.Prodigy:
            kw.update(lr=1.0, d0=1e-3)
        runs = []
        for mode in ("flat", "per tensor", "release"):
            model = _shard(fp32_uneven())
            opt = make(model.parameters(), flat=mode == "flat", **kw)
            if mode == "release":
                fc.enable_gradient_release(model, opt)
            runs.append((mode, model, opt))
        ref = fp32_uneven()
        ref_opt = make(ref.parameters(), flat=False, **kw)
        start = [q.detach().clone() for q in ref.parameters()]
        # Prodigy: d moves from step 3 on, where the same batches keep the gradients steady
        for step in range(6 if make is fc.Prodigy else 3):
            batch = 0 if make is fc.Prodigy else step
            for _, model, opt in runs:
                batch_loss(model, batch, rank).backward()
                opt.step()
                opt.zero_grad()
            _reference_step(ref, ref_opt, batch_loss, batch, world_size)
        assert len(runs[0][2]._buckets) >= 1  # the flat run stepped shard buckets
        if make is fc.Prodigy:
            d = float(ref_opt.param_groups[0]["d"])
            assert d > 2e-3, d  # the distance estimate grew: the sums over every param count
            for mode, _, opt in runs:
                assert float(opt.param_groups[0]["d"]) == pytest.approx(d, rel=1e-5), mode
        for mode, model, _ in runs:
            for (name, p), q, q0 in zip(model.named_parameters(), ref.parameters(), start):
                # each rank sums its shard, the all-reduce adds the ranks' sums: fp32 rounding of
                # the norms, a few ulps of the trust ratio, relative to the distance travelled
                moved = (q.detach() - q0).abs().max().item()
                diff = (p.full_tensor() - q.detach()).abs().max().item()
                assert diff <= 1e-5 * moved + 1e-7, (make.__name__, mode, name, diff, moved)
    # rules that need a whole matrix (its rows and columns, or its Newton-Schulz products)
    # refuse sharded params when the optimizer is built, naming what to do instead
    sharded = _shard(fp32_uneven())
    for make, why in ((fc.Adafactor, "own shape"), (fc.Muon, "whole matrix")):
        matrices = [p for p in sharded.parameters() if p.dim() == 2]
        with pytest.raises(ValueError, match=why):
            make(matrices, compile=False)


def _torch_interop(model, opt):
    """Its state in torch.optim's format (fp32 DTensors shaped like the params, as torch.optim
    keeps under FSDP2) loads back within the codecs' bounds; master weights set per shard."""
    back = fc.AdamW(model.parameters(), compile=False, **LR)
    back.load_state_dict(opt.torch_state_dict())
    for p in model.parameters():
        if not opt.state[p]:
            continue
        codecs = opt.plan_for(p.to_local(), opt.flags_of(opt.param_groups[0])).codecs
        for key in ("exp_avg", "exp_avg_sq"):
            want = opt.state_value(p, key).to_local()
            got = back.state_value(p, key).to_local()
            _assert_within(got, want, codecs[key], "torch_state_dict round trip", key,
                           tuple(p.shape))
        master = opt.master_weight(p)
        opt.set_master_weight(p, master.full_tensor())  # a full tensor: each rank takes its part
        _assert_same(opt.master_weight(p), master, "set_master_weight", tuple(p.shape))


def _fp32_step(opt, p):
    """The fp32 math from ``opt``'s decoded state for ``p`` (full tensors): a flashcompile AdamW
    with fp32 storage loaded with that state (torch.optim's format)."""
    group = opt.param_groups[0]
    master, grad = _full(opt.master_weight(p)), p.grad.full_tensor()
    q = nn.Parameter(master.clone())
    ref = fc.AdamW([q], codecs="fp32", compile=False, **LR)
    if opt.state.get(p):
        state = {"step": opt.state[p]["step"].clone(), "bound_sq": opt.state[p]["bound_sq"].clone(),
                 **{k: _full(opt.state_value(p, k)) for k in ("exp_avg", "exp_avg_sq")}}
        ref.load_state_dict({"state": {0: state}, "param_groups": [{**group, "params": [0]}]})
    q.grad = grad.float()
    ref.step()
    codecs = opt.plan_for(p.to_local(), opt.flags_of(group)).codecs
    new = {PARAM: q.detach(), **{k: ref.state_value(q, k) for k in ("exp_avg", "exp_avg_sq")}}
    return new, codecs


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_uneven_shards_step_within_codec_bounds(tmp_path, device):
    """Odd sizes, shards starting mid-group, an empty shard, mixed dtypes: each step's decoded
    weights and states are within the codecs' bounds of the fp32 math (in the rank's own groups);
    state is allocated for the local shard only; flat launches and gradient release are
    bit-identical to each other; training tracks one process."""
    _launch(_fsdp_uneven, 2, tmp_path, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_trust_ratio_rules_take_norms_over_the_whole_param_and_shaped_rules_refuse(
        tmp_path, device):
    """LAMB and LARS under FSDP2 (shards starting mid-group, an empty shard): each rank sums its
    shard and the sums are all-reduced before any weight moves, so flat shard buckets, per-tensor
    steps and gradient release all match one process stepping the whole model. Prodigy's sums
    over every parameter are all-reduced before d is updated, likewise. Adafactor and Muon, which
    need whole matrices, refuse sharded ones with a message that says so."""
    _launch(_fsdp_trust_ratio, 2, tmp_path, device)


# ---- DCP ------------------------------------------------------------------------------------------

STATES = (PARAM, "exp_avg", "exp_avg_sq")


def _train(model, opt, steps, rank, world_size):
    """Train on the batches of 2 ranks: this rank's, or on 1 rank both (gradients averaged)."""
    for step in steps:
        for r in [rank] if world_size == 2 else [0, 1]:
            _uneven_loss(model, step, r).backward()
        for p in model.parameters():
            p.grad.div_(2 // world_size)
        opt.step()
        opt.zero_grad()


def _decoded(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Every param's weight and decoded states, full tensors (collective on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = {"weight": _full(p.detach()).clone(), "step": opt.state[p]["step"].clone()}
        for key in STATES:
            value = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
            out[name][key] = _full(value).clone()
    return out


def _load(model, opt, path, options=None):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    before = [_full(p.detach()).clone() for p in model.parameters()]
    msd, osd = get_state_dict(model, opt, options=options)  # a fresh optimizer: allocates state
    for (name, p), b in zip(model.named_parameters(), before):
        _assert_same(p, b, name, "get_state_dict on a fresh optimizer moved the weight")
        assert int(opt.state[p]["step"]) == 0, (name, int(opt.state[p]["step"]))
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd, options=options)


def _dcp_options(tmp_path):
    """The optimizer's arguments in the DCP tests: LR and the codecs the test wrote for its ranks
    (processes of their own)."""
    return {**LR, "codecs": json.loads((tmp_path / "codecs.json").read_text())}


def _dcp_two_ranks(rank, world_size, tmp_path, device):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model = _shard(_uneven(device))
    opt = fc.AdamW(model.parameters(), compile=False, flat=True, **_dcp_options(tmp_path))
    _train(model, opt, range(2), rank, world_size)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "ckpt")
    saved = _decoded(model, opt)
    _train(model, opt, range(2, 4), rank, world_size)
    after = _decoded(model, opt)
    if rank == 0:
        torch.save({"saved": saved, "after": after}, tmp_path / "expected.pt")

    resumed = _shard(_uneven(device, seed=1))
    resumed_opt = fc.AdamW(resumed.parameters(), compile=False, **_dcp_options(tmp_path))
    _load(resumed, resumed_opt, tmp_path / "ckpt")
    _assert_equal(_decoded(resumed, resumed_opt), saved, "loaded on 2 ranks")
    _train(resumed, resumed_opt, range(2, 4), rank, world_size)
    _assert_equal(_decoded(resumed, resumed_opt), after, "resumed on 2 ranks, 2 steps on")

    full = StateDictOptions(full_state_dict=True)  # whole tensors on every rank, then sharded again
    msd, osd = get_state_dict(resumed, resumed_opt, options=full)
    again = _shard(_uneven(device, seed=2))
    again_opt = fc.AdamW(again.parameters(), compile=False, **_dcp_options(tmp_path))
    _init_state(again, again_opt)
    set_state_dict(again, again_opt, model_state_dict=msd, optim_state_dict=osd, options=full)
    _assert_equal(_decoded(again, again_opt), after, "full_state_dict round trip")

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(resumed, resumed_opt, options=flat)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "flat")
    again = _shard(_uneven(device, seed=2))
    again_opt = fc.AdamW(again.parameters(), compile=False, **_dcp_options(tmp_path))
    _load(again, again_opt, tmp_path / "flat", options=flat)
    _assert_equal(_decoded(again, again_opt), after, "flattened optimizer keys")


def _init_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    get_state_dict(model, opt)  # a fresh optimizer: allocates its state


def _assert_equal(got, want, what=""):
    for name in want:
        for key in want[name]:
            _assert_same(got[name][key], want[name][key], what, name, key)


def _dcp_one_rank(rank, world_size, tmp_path, device):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_state_dict

    expected = torch.load(tmp_path / "expected.pt", map_location="cpu")  # compared on the CPU
    model = _shard(_uneven(device, seed=1))
    opt = fc.AdamW(model.parameters(), compile=False, **_dcp_options(tmp_path))
    _load(model, opt, tmp_path / "ckpt")
    loaded = _decoded(model, opt)
    reencoded = False
    for name, p in model.named_parameters():
        exact = groups_per_row(p) is not None
        for key in ("weight", "step", *STATES):
            got, want = loaded[name][key], expected["saved"][name][key]
            if exact or key in ("weight", "step", PARAM):  # rows, or per-element storage only
                _assert_same(got, want, "loaded on 1 rank", name, key,
                             "rows layout" if exact else "per-element storage")
            else:  # re-encoded where this rank's groups gather differently scaled saved groups
                codec = opt.plan_for(p.to_local(), opt.flags_of(opt.param_groups[0])).codecs[key]
                _assert_within(got, want, codec, "loaded on 1 rank, re-encoded", name, key)
                reencoded |= not torch.equal(got.cpu(), want)
    assert reencoded, "no re-encoded state differs from the saved one: the test covers no re-encoding"
    _train(model, opt, range(2, 4), rank, world_size)
    # training continues as on 2 ranks, but for rounding: 8-bit states re-encoded move the next
    # updates by under a tenth of lr; 4-bit ones by a code step of 15, which Adam's update
    # carries at full size (0.55 lr here), so only their bounds above are checked
    for name, p in model.named_parameters():
        got = opt.master_weight(p).full_tensor().cpu()
        diff = (got - expected["after"][name][PARAM]).abs().max()
        assert diff <= 0.1 * LR["lr"] or _dcp_options(tmp_path)["codecs"] != "flash", (
            name, f"max |diff| {diff.item():.6g} > {0.1 * LR['lr']}")

    # without torch.distributed: the checkpoint as one torch.save file, into a plain model
    dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "ckpt.pt")
    plain = _uneven(device, seed=1)
    plain_opt = fc.AdamW(plain.parameters(), compile=False, **_dcp_options(tmp_path))
    sd = torch.load(tmp_path / "ckpt.pt")
    set_state_dict(plain, plain_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _assert_equal(_decoded(plain, plain_opt), loaded, "plain model from dcp_to_torch_save")


@pytest.mark.parametrize("codecs", ["flash", "four_bit", "bf16_sr"])
@pytest.mark.parametrize("device", DEVICES)
def test_dcp_resumes_bit_exactly_and_reshards_from_two_ranks_to_one(tmp_path, device, codecs):
    """Saved on 2 ranks: loaded on 2 ranks (also with flattened optimizer keys), the state and the
    training that follows are bit-identical; on 1 rank, rows-layout states and every weight are
    bit-identical and re-encoded states within their codec's bound, and training continues; a
    plain model loads the checkpoint converted to torch.save. Also with 4-bit states, stored two
    to a byte and saved one code per element, and with a bf16 weight rounded stochastically (no
    residual): all but the 1-rank run's drift from the 2-rank one, which is a code step of 4-bit
    states or a bf16 ULP of a weight whose update moved by a re-encoded state."""
    spec = {"four_bit": four_bit.ADAM_STATES, "bf16_sr": {PARAM: "bf16_sr"}}.get(codecs, codecs)
    (tmp_path / "codecs.json").write_text(json.dumps(spec))
    _launch(_dcp_two_ranks, 2, tmp_path, device)
    _launch(_dcp_one_rank, 1, tmp_path, device)
    _check_checkpoint_bytes(tmp_path / "ckpt", residual=0 if codecs == "bf16_sr" else 1)


def _check_checkpoint_bytes(path: Path, residual: int = 1) -> None:
    """Optimizer bytes per value in the checkpoint: the weight's ``residual`` (the weight split's
    1, none for a bf16 weight alone), each 8-bit state 1 + 2/32 (rows layout) or 1 + 2 (elements
    layout: a scale per element)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = _uneven("cpu")
    for name, p in model.named_parameters():
        fields = {k: v for k, v in meta.items() if k.startswith(f"optim.state.{name}.")}
        # per-element fields only: step and the step guard's bound_sq are one fp32 each
        total = sum(v.size.numel() * v.properties.dtype.itemsize for v in fields.values()
                    if hasattr(v, "size") and len(v.size))
        per_value = total / p.numel()
        kept = residual if p.dtype == torch.bfloat16 else 0
        scale = 2 / GROUP if groups_per_row(p) is not None else 2
        assert per_value == pytest.approx(kept + 2 * (1 + scale)), name
