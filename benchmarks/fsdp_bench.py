"""FSDP2 on 2 GPUs: per-rank memory and step time of torch AdamW vs flashcompile AdamW under the
same ``fully_shard`` setup, then DCP checkpoints saved on 2 ranks loaded on 2 and on 1.

Setups (every one: one FSDP2 unit per transformer block plus the root):

* ``torch_adamw_fp32``: fp32 sharded weights, bf16 compute and fp32 gradient reduction
  (``MixedPrecisionPolicy``), ``torch.optim.AdamW(fused=True)``: the usual recipe, 16 B/param;
* ``torch_adamw_bf16``: bf16 weights and ``torch.optim.AdamW`` (bf16 moments, no master weight);
* ``flash_adamw``: bf16 weights, flashcompile AdamW (int8 residual, 8-bit moments; flat launch);
* ``flash_adamw_per_tensor``: the same stepping one shard per launch (``flat=False``);
* ``flash_adamw_release``: flash AdamW with gradient release (each shard steps in FSDP2's
  post-reduce-scatter hook and frees its gradient).

Run on a 2-GPU machine::

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/fsdp_bench.py

(``--model llama_1b`` for a bigger model, ``--setups`` to pick, ``--no-reshard`` to skip the
checkpoint check; on a CPU-only machine it runs tiny_gpt2 on gloo, for trying the script.) Rank 0
prints one row per setup and rank, then the checkpoint check: a 2-rank resume must match the
uninterrupted run bit for bit, and a 1-rank resume (a one-rank process group on GPU 0) must load
every weight and per-row-layout state exactly, the rest within its codec's bound, and continue
training. The checkpoint checks run attention on SDPA's math backend: the flash, memory-efficient
and cuDNN backends accumulate parts of their backward with atomics, so two identical runs can differ
in the last bits whatever the optimizer does. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import flashcompile as fc
from flashcompile.codecs import PARAM
from flashcompile.runtime.distributed import groups_per_row, to_local
from flashcompile.testing import bound
from flashcompile.tools import bench_models

LR, WEIGHT_DECAY = 1e-4, 0.1


@dataclass(frozen=True)
class Setup:
    flash: bool  # bf16 weights through cast_model (else fp32 weights, bf16 compute)
    fp32_weights: bool = False
    flat: bool | None = None
    release: bool = False


SETUPS = {
    "torch_adamw_fp32": Setup(flash=False, fp32_weights=True),
    "torch_adamw_bf16": Setup(flash=False),
    "flash_adamw": Setup(flash=True),
    "flash_adamw_per_tensor": Setup(flash=True, flat=False),
    "flash_adamw_release": Setup(flash=True, release=True),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, choices=sorted(bench_models.CONFIGS),
                        help="default: gpt2_124m on CUDA, tiny_gpt2 on CPU")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compiles kernels)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--checkpoint-dir", default="/tmp/flashcompile_fsdp_bench")
    parser.add_argument("--no-reshard", action="store_true", help="skip the DCP checks")
    return parser.parse_args()


def setup_dist() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def build(name: str, setup: Setup, device: torch.device, mesh=None, seed: int = 0):
    torch.manual_seed(seed)
    model = bench_models.build(name, device)
    policy = MixedPrecisionPolicy()
    if setup.fp32_weights:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        fc.cast_model(model, keep_fp32=None)  # FSDP2 all-gathers one dtype per unit
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if setup.flash:
        opt = fc.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, flat=setup.flat)
        if setup.release:
            fc.enable_gradient_release(model, opt)
    else:
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                    fused=device.type == "cuda")
        except RuntimeError:  # a torch whose fused AdamW takes no DTensors
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return model, opt


def tokens(step: int, rank: int, args, vocab: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    return torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=gen).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, args, device: torch.device) -> dict:
    """This rank's numbers for one setup: resident and peak memory, ms per iteration (forward,
    backward, step) and per ``optimizer.step()`` alone."""
    setup = SETUPS[name]
    rank, vocab = dist.get_rank(), bench_models.CONFIGS[args.model].vocab
    model, opt = build(args.model, setup, device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        model(tokens(step, rank, args, vocab, device)).backward()
        opt.step()
        opt.zero_grad()
    sync(device)
    iteration_ms = (time.perf_counter() - start) / args.steps * 1e3
    params = list(model.parameters())
    local = sum(p.to_local().numel() for p in params)
    state = sum(to_local(t).nbytes for p in params for k, t in opt.state[p].items()
                if k != "step" and torch.is_tensor(t))  # torch's states are DTensors
    row = {"setup": name, "rank": rank, "params": local, "iteration_ms": iteration_ms,
           "state_b_per_param": state / local}
    if device.type == "cuda":
        row["resident_mib"] = torch.cuda.memory_allocated(device) / 2**20
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    step_ms = []
    if not setup.release:  # the step alone (gradient release steps inside backward)
        for step in range(3):
            model(tokens(step, rank, args, vocab, device)).backward()
            sync(device)
            start = time.perf_counter()
            opt.step()
            sync(device)
            step_ms.append((time.perf_counter() - start) * 1e3)
            opt.zero_grad()
    row["step_ms"] = min(step_ms) if step_ms else float("nan")
    del model, opt, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def report(rows: list[dict]) -> None:
    cuda = "resident_mib" in rows[0]
    print(f"\n{'setup':<24}{'rank':>5}{'params':>12}{'state B/p':>10}"
          + (f"{'resident MiB':>14}{'peak MiB':>10}" if cuda else "")
          + f"{'iter ms':>9}{'step ms':>9}")
    for r in rows:
        print(f"{r['setup']:<24}{r['rank']:>5}{r['params']:>12}{r['state_b_per_param']:>10.3f}"
              + (f"{r['resident_mib']:>14.1f}{r['peak_mib']:>10.1f}" if cuda else "")
              + f"{r['iteration_ms']:>9.1f}{r['step_ms']:>9.2f}")


# ---- DCP: save on 2 ranks, load on 2 and on 1 --------------------------------------------------

def train(model, opt, steps, rank: int, world: int, args, device) -> None:
    """Steps on the batches of 2 ranks: this rank's, or (1 rank) both, gradients averaged."""
    vocab = bench_models.CONFIGS[args.model].vocab
    for step in steps:
        for r in [rank] if world == 2 else [0, 1]:
            model(tokens(step, r, args, vocab, device)).backward()
        if world == 1:
            for p in model.parameters():
                p.grad.div_(2)
        opt.step()
        opt.zero_grad()


def snapshot(model, opt) -> dict:
    """Full weights and decoded states on the CPU (collective over the model's ranks)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = {"weight": p.full_tensor().cpu(), "step": opt.state[p]["step"].clone()}
        for key in (PARAM, "exp_avg", "exp_avg_sq"):
            value = opt.master_weight(p) if key == PARAM else opt.state_value(p, key)
            out[name][key] = value.full_tensor().cpu()
    return out


def load(model, opt, path: str, group=None) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path, process_group=group)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def deterministic_attention():
    """SDPA on its math backend (no atomics in backward: bit-reproducible on GPU)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def first_difference(got: dict, want: dict) -> str:
    """The first (param, key) that differs, with its largest difference, and how many differ."""
    bad = [(n, k) for n in want for k in want[n] if not torch.equal(got[n][k], want[n][k])]
    if not bad:
        return "no (param, key) pair differs"
    n, k = bad[0]
    diff = (got[n][k].double() - want[n][k].double()).abs().max().item()
    return f"{len(bad)} (param, key) pairs differ, first {n} {k}: max |diff| {diff:.3g}"


def check_reshard(args, device: torch.device) -> bool:
    if dist.get_rank() == 0:
        print("\nDCP checks, attention on SDPA's math backend (a deterministic backward; the "
              "timings above used the default backends)")
    with deterministic_attention():
        return _check_reshard(args, device)


def _check_reshard(args, device: torch.device) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    path = args.checkpoint_dir
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    flash = SETUPS["flash_adamw"]
    model, opt = build(args.model, flash, device)
    train(model, opt, range(3), rank, world, args, device)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    saved = snapshot(model, opt)
    train(model, opt, range(3, 5), rank, world, args, device)
    after = snapshot(model, opt)
    del model, opt, msd, osd

    ok = True
    resumed, resumed_opt = build(args.model, flash, device, seed=1)
    load(resumed, resumed_opt, path)
    train(resumed, resumed_opt, range(3, 5), rank, world, args, device)
    got = snapshot(resumed, resumed_opt)
    same = all(torch.equal(got[n][k], after[n][k]) for n in after for k in after[n])
    if rank == 0:
        print(f"DCP, saved on {world} ranks, resumed on {world}: bit-identical to the "
              f"uninterrupted run: {same}")
    ok &= same
    del resumed, resumed_opt
    if not same:  # a second resume tells a resume bug from nondeterministic kernels
        if rank == 0:
            print(f"  differences from the uninterrupted run: {first_difference(got, after)}")
        again, again_opt = build(args.model, flash, device, seed=1)
        load(again, again_opt, path)
        train(again, again_opt, range(3, 5), rank, world, args, device)
        repeat = snapshot(again, again_opt)
        del again, again_opt
        if rank == 0:
            print(f"  a second resume, the same way, against the first: "
                  f"{first_difference(repeat, got)} (none: the runs are deterministic, so resuming "
                  "itself changes the training; else some kernel is nondeterministic)")

    one = dist.new_group([0])  # every rank takes part in creating it; rank 0 alone uses it
    if rank == 0:
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(one, device.type)
        model, opt = build(args.model, flash, device, mesh=mesh, seed=1)
        load(model, opt, path, group=one)
        loaded = snapshot(model, opt)
        exact, within, reencoded, failed = True, True, 0, []
        for name, p in model.named_parameters():
            codecs = opt.plan_for(p.to_local(), opt.flags_of(opt.param_groups[0])).codecs
            for key, want in saved[name].items():
                have = loaded[name][key]
                if groups_per_row(p) is not None or key in ("weight", "step", PARAM):
                    good = torch.equal(have, want)
                    exact &= good
                else:
                    good = bool(torch.all((have - want).abs() <= bound(codecs[key], want)))
                    within &= good
                    reencoded += int((have != want).sum())
                if not good:
                    diff = (have.double() - want.double()).abs().max().item()
                    failed.append(f"{name} {key} (max |diff| {diff:.3g})")
        train(model, opt, range(3, 5), 0, 1, args, device)
        drift = max((opt.master_weight(p).full_tensor().cpu() - after[n][PARAM]).abs().max().item()
                    for n, p in model.named_parameters())
        print(f"DCP, saved on {world} ranks, loaded on 1: weights and per-row scales exact: {exact}; "
              f"re-encoded states within their codec bound: {within} ({reencoded} values moved); "
              f"after 2 more steps the master weights are within {drift / LR:.3f} lr of the "
              f"{world}-rank run")
        if failed:
            print(f"  failed: {', '.join(failed[:5])}" + (" ..." if len(failed) > 5 else ""))
        ok &= exact and within
    dist.barrier()
    flags = [None] * world
    dist.all_gather_object(flags, ok)
    return all(flags)


def main() -> int:
    args = parse_args()
    device = setup_dist()
    args.model = args.model or ("gpt2_124m" if device.type == "cuda" else "tiny_gpt2")
    args.seq_len = args.seq_len or bench_models.CONFIGS[args.model].context
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"torch {torch.__version__}, {world} x {name}, {args.model}, batch {args.batch_size} x "
              f"{args.seq_len} per rank, {args.warmup} warmup + {args.steps} timed steps")
    rows = []
    for name in args.setups.split(","):
        mine = measure(name, args, device)
        every = [None] * world
        dist.all_gather_object(every, mine)
        rows += every
        if rank == 0:
            print(f"  {name}: done", flush=True)
    if rank == 0:
        report(rows)
    ok = True if args.no_reshard else check_reshard(args, device)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
