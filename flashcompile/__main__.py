"""Command line: ``python -m flashcompile explain adamw --dtype bfloat16 [--kernels]``,
``bench``, ``memory``, ``train-bench``, ``study weight-split|state-error|collapse|convergence [--out DIR]``."""

from __future__ import annotations

import argparse

import torch

from flashcompile.compiler.explain import explain
from flashcompile.optim.optimizers import OPTIMIZERS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flashcompile")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="print an optimizer's math, generated source and kernels")
    ex.add_argument("optimizer", type=str.lower, choices=sorted(OPTIMIZERS))  # AdamW or adamw
    ex.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ex.add_argument("--codecs", default="flash", choices=["flash", "fp32"])
    ex.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ex.add_argument("--kernels", action="store_true", help="also compile and print Inductor's code")
    ex.add_argument("--momentum", type=float, default=0.9, help="for sgd/sgdw")
    bench = sub.add_parser("bench", help="time optimizer steps on workload shape lists")
    bench.add_argument("--workloads", default="gpt2_124m,single_268m,llama8b_4layers",
                       help="comma-separated shipped names or JSON paths")
    bench.add_argument("--optimizers", default="",
                       help="comma-separated; default: the AdamW/SGD/Lion rows and fp32 twins; 'all' (alone "
                       "or in the list): every shipped optimizer with flash codecs")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--reps", type=int, default=20)
    bench.add_argument("--cold", action="store_true", help="clear compile caches per optimizer")
    bench.add_argument("--csv")
    bench.add_argument("--json")
    bench.add_argument("--png")
    mem = sub.add_parser("memory", help="train models a few steps: memory split, peak, step time, "
                         "checkpoint size per optimizer setup")
    mem.add_argument("--models", default="gpt2_124m,llama_1b", help="comma-separated model names")
    mem.add_argument("--setups", default="", help="comma-separated (default: all)")
    mem.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    mem.add_argument("--batch", type=int, default=4)
    mem.add_argument("--seq", type=int, default=1024)
    mem.add_argument("--steps", type=int, default=5)
    mem.add_argument("--csv")
    mem.add_argument("--json")
    mem.add_argument("--png")
    tb = sub.add_parser("train-bench", help="train real models end to end per optimizer setup: "
                        "iteration time and its split, throughput, peak memory, loss")
    tb.add_argument("--models", default="gpt2,resnet50,vit_b_16",
                    help="comma-separated: gpt2, resnet50, vit_b_16 (GPU); tiny_gpt2, tiny_cnn")
    tb.add_argument("--setups", default="", help="comma-separated (default: all)")
    tb.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tb.add_argument("--steps", type=int, default=15, help="measured iterations")
    tb.add_argument("--warmup", type=int, default=5)
    tb.add_argument("--batch", type=int, default=0, help="default: the model's")
    tb.add_argument("--rounds", type=int, default=1,
                    help="run every setup's process this many times, setups interleaved: host "
                         "speed drifts between processes; ratios are paired by round")
    tb.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    tb.add_argument("--csv")
    tb.add_argument("--json")
    tb.add_argument("--png")
    from flashcompile.tools.studies import add_parser as add_study_parser

    add_study_parser(sub)
    args = parser.parse_args(argv)
    _check_names(parser, args)
    if args.command == "study":
        from flashcompile.tools.studies import run

        run(args.name, **{k: v for k, v in vars(args).items() if k not in ("command", "name")})
        return
    if args.command == "memory":
        from flashcompile.tools.memory import main as memory_main

        memory_main(args)
        return
    if args.command == "train-bench":
        from flashcompile.tools.train_bench import main as train_bench_main

        train_bench_main(args)
        return
    if args.command == "bench":
        from flashcompile.tools.bench import main as bench_main

        bench_main(args)
        return
    p = torch.nn.Parameter(torch.zeros(1024, dtype=getattr(torch, args.dtype), device=args.device))
    extra = {"momentum": args.momentum} if args.optimizer.startswith("sgd") else {}
    opt = OPTIMIZERS[args.optimizer]([p], codecs=args.codecs, **extra)
    print(explain(opt, kernels=args.kernels))


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad device, workload, model, setup or optimizer name with the known ones, before
    anything runs (a usage error, not a traceback from deep inside a run)."""
    if getattr(args, "device", None) is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            parser.error(f"--device {args.device!r}: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device!r}: no CUDA device here; use --device cpu")
    if args.command == "bench":
        from flashcompile.tools import bench

        for w in args.workloads.split(","):
            try:
                bench.load_workload(w)
            except FileNotFoundError as e:
                parser.error(str(e))
        if args.optimizers:
            known = {**bench.OPTIMIZERS, **bench.EXTRA, **bench._peers()}
            unknown = [o for o in args.optimizers.split(",") if o not in known and o != "all"]
            if unknown:
                parser.error(f"unknown optimizers {unknown}; available: {sorted(known)} or 'all'")
    if args.command == "memory":
        from flashcompile.tools.bench_models import CONFIGS
        from flashcompile.tools.memory import SETUPS

        for kind, names, known in (("models", args.models, CONFIGS), ("setups", args.setups, SETUPS)):
            unknown = [n for n in names.split(",") if n and n not in known]
            if unknown:
                parser.error(f"unknown {kind} {unknown}; known: {sorted(known)}")


if __name__ == "__main__":
    main()
