"""Train a small transformer with FSDP2 (``fully_shard``) and flashcompile AdamW under torchrun.

Every weight is bf16 and sharded over the ranks by FSDP2, which all-gathers the 16-bit weights for
forward and backward and reduce-scatters the gradients. The optimizer steps each rank's shard and
keeps that shard's state only: the weight's int8 residual (bf16 + residual is the fp32 master
weight) and both Adam moments in 8 bits, about 3.1 bytes per parameter, divided over the ranks.

Run::

    torchrun --nproc_per_node 2 examples/fsdp_train.py --no-compile          # CPU (gloo)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --model gpt2_124m      # 2 GPUs (NCCL)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --release --save ckpt  # gradient release,
    torchrun --nproc_per_node 1 examples/fsdp_train.py --load ckpt            # then resume on 1 rank

The data is synthetic and learnable (each token follows from the previous one), so the loss falls
from ln(vocab) towards 0. Checkpoints use torch.distributed.checkpoint and load on any number of
ranks. Prints each rank's memory at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from tqdm import tqdm

import flashcompile
from flashcompile.tools import bench_models

# Inductor's C++ backend notes that a kernel mixes bf16 (weights) and fp16 (codec scales).
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_llama", choices=sorted(bench_models.CONFIGS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--release", action="store_true",
                        help="gradient release: step each shard inside backward, free its gradient")
    parser.add_argument("--no-compile", action="store_true", help="eager kernels (no compile wait)")
    parser.add_argument("--save", help="save a DCP checkpoint (model + optimizer) here at the end")
    parser.add_argument("--load", help="resume from a DCP checkpoint (saved on any number of ranks)")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """torchrun's process group: NCCL with one GPU per rank where there are GPUs, else gloo."""
    if "RANK" not in os.environ:
        sys.exit("run under torchrun, e.g. torchrun --nproc_per_node 2 examples/fsdp_train.py")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build(name: str, device: torch.device) -> torch.nn.Module:
    """The model in bf16 throughout (FSDP2 all-gathers one dtype per unit), one FSDP2 unit per
    block plus the root (embedding, final norm, tied head)."""
    torch.manual_seed(0)  # every rank starts from the same weights
    model = flashcompile.cast_model(bench_models.build(name, device), keep_fp32=None)
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def batch(step: int, rank: int, args: argparse.Namespace, vocab: int,
          device: torch.device) -> torch.Tensor:
    """Sequences ``x[i+1] = (5 x[i] + 3) mod vocab`` from random starts: a bigram to learn."""
    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.empty(args.batch_size, args.seq_len + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (args.batch_size,), generator=gen)
    for i in range(args.seq_len):
        x[:, i + 1] = (5 * x[:, i] + 3) % vocab
    return x.to(device)


def load(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    msd, osd = get_state_dict(model, opt)  # this rank's layout, to be filled
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def save(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def memory(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> dict:
    """This rank's bytes: weight shards, optimizer state, and (CUDA) allocated and peak."""
    params = list(model.parameters())
    state = sum(t.nbytes for p in params for k, t in opt.state[p].items()
                if k != "step" and torch.is_tensor(t))
    out = {"params": sum(p.to_local().numel() for p in params),
           "weights": sum(p.to_local().nbytes for p in params), "state": state}
    if device.type == "cuda":
        out["allocated"] = torch.cuda.memory_allocated(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup()
    model = build(args.model, device)
    opt = flashcompile.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             compile=not args.no_compile)
    if args.release:
        flashcompile.enable_gradient_release(model, opt)
    first = 0
    if args.load:
        load(model, opt, args.load)
        first = int(opt.state[next(model.parameters())]["step"])
    vocab = bench_models.CONFIGS[args.model].vocab

    bar = tqdm(range(first, first + args.steps), desc=f"{args.model} on {world} ranks",
               unit="step", disable=rank != 0)
    if rank == 0 and not args.no_compile:
        bar.write("the first steps compile flashcompile's kernels")
    for step in bar:
        start = time.perf_counter()
        loss = model(batch(step, rank, args, vocab, device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)  # also waits for the step
        bar.set_postfix(loss=f"{loss.item() / world:.4f}",
                        ms=f"{(time.perf_counter() - start) * 1e3:.0f}")

    if args.save:
        save(model, opt, args.save)
    mine = memory(model, opt, device)
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        total = sum(m["params"] for m in every)
        print(f"\n{total / 1e6:.2f}M parameters over {world} ranks "
              f"({'gradient release' if args.release else 'step after backward'})")
        cuda = "allocated" in mine
        header = f"{'rank':>4}{'params':>12}{'weights MB':>12}{'opt state MB':>14}{'state B/param':>15}"
        print(header + (f"{'allocated MB':>14}{'peak MB':>10}" if cuda else ""))
        for r, m in enumerate(every):
            line = (f"{r:>4}{m['params']:>12}{m['weights'] / 2**20:>12.2f}{m['state'] / 2**20:>14.2f}"
                    f"{m['state'] / max(m['params'], 1):>15.3f}")
            if cuda:
                line += f"{m['allocated'] / 2**20:>14.1f}{m['peak'] / 2**20:>10.1f}"
            print(line)
        if args.save:
            print(f"saved a DCP checkpoint to {args.save}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
