"""Compile an Inductor-written Triton kernel for sm_90 on any machine (no GPU: Triton's own ptxas
and cuobjdump) and count its SASS with and without the fast-math forms of flashcompile.compiler.fast_math.

Usage: python benchmarks/sass_offline.py OUTPUT_CODE.py [...]   (files from dump_kernels.py or
family_probe.py; needs ``pip install triton``). Prints static SASS instructions per element (the
group kernel handles 8 lanes per thread, straight-line) for: Inductor's code as compiled
(no fused multiply-adds), with FMA, + approximate division, + approximate square root, both.

    python benchmarks/sass_offline.py --rules Rprop AdamW AdamW:paper [...]

generates each rule's flash group kernel here, on the CPU (Inductor's Triton code generation for
CPU tensors, with the plan's own fast_math forms; pointers marked 16-byte aligned as CUDA's
Inductor marks them), at the launch config its plans pin, and prints its static SASS per element
by instruction class, its registers per thread with the warps an SM holds at that count, and how
many kernels the step takes in all (1 where everything fuses): a rule or codec change's
instruction count without a GPU. A rule that sums over each param first (LAMB, LARS, MARS,
cautious AdamW) counts both passes' group kernels per element, as its bytes moved count both
reads. It matched the H200 dump of Rprop's kernel (84 against 85 per element). Beside it, the
issue-slot ceiling on an H100 and an H200: the % of copy bandwidth at which that many instructions
per element fill every issue slot (an upper bound; under 100 the kernel cannot reach the copy
rate)."""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HEADER = ("import triton\nimport triton.language as tl\n"
          "from torch._inductor.runtime import triton_helpers\n"
          "from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math\n")


def kernels(path: str) -> list[tuple[str, str]]:
    text = open(path).read()
    return re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)''', device_str", text, re.S)


def fast_division(src: str) -> str:
    return re.sub(r"\((tmp\d+) / (tmp\d+)\)",
                  r"libdevice.fast_dividef(\1.to(tl.float32), \2.to(tl.float32))", src)


def fast_sqrt(src: str) -> str:
    return src.replace("tl.sqrt_rn(", "tl.sqrt(")


def sass_counts(name: str, src: str, fp_fusion: bool, warps: int = 2, xblock: int = 16):
    """Static SASS instructions of kernel ``name`` by opcode (:func:`compile_sm90`)."""
    return compile_sm90(name, src, fp_fusion, warps, xblock)[0]


def compile_sm90(name: str, src: str, fp_fusion: bool, warps: int = 2, xblock: int = 16
                 ) -> tuple[collections.Counter, int]:
    """(static SASS instructions by opcode, registers per thread) of kernel ``name`` compiled for
    sm_90 at ``xblock`` / ``warps``."""
    meta = eval(re.search(r"triton_meta=(\{.*?\}),\n    inductor_meta", src, re.S).group(1),  # noqa: S307 - our own dump
                {"DeviceProperties": dict})
    folder = tempfile.mkdtemp()
    module_path = os.path.join(folder, "kernel.py")
    with open(module_path, "w") as f:
        f.write(HEADER + src[src.index("@triton.jit"):])
    spec = importlib.util.spec_from_file_location("kernel", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = ASTSource(getattr(module, name), dict(meta["signature"]), constexprs={"XBLOCK": xblock},
                       attrs=dict(meta["configs"][0]))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=1, enable_fp_fusion=fp_fusion))
    cubin = os.path.join(folder, "kernel.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
    return (collections.Counter(m.group(1) for m in re.finditer(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)),
        int(re.search(r"REG:(\d+)", usage).group(1)))


GROUP_LANES = 32

VARIANTS = [("Inductor", False, lambda s: s), ("+FMA", True, lambda s: s),
            ("+FMA+div", True, fast_division), ("+FMA+sqrt", True, fast_sqrt),
            ("+FMA+div+sqrt", True, lambda s: fast_sqrt(fast_division(s)))]


def rule_plan(name: str):
    """The plan of rule ``name`` (a drop-in class name) on a bf16 param; ``AdamW:paper`` takes
    another codecs preset, ``AdamW:exp_avg_sq=sqrt_uint8+exp_avg=...`` a mapping."""
    import torch

    import flashcompile as fc
    from flashcompile.compiler.explain import plan_of

    name, _, preset = name.partition(":")
    kw = {"momentum": 0.9} if name == "SGD" else {}
    if preset:  # a preset, or state=codec pairs joined by "+"
        kw["codecs"] = (dict(item.split("=") for item in preset.split("+")) if "=" in preset
                        else preset)
    return plan_of(getattr(fc, name)([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))],
                                     **kw))


def rule_kernels(name: str) -> tuple[list[tuple[str, str]], int]:
    """The (kernel name, Triton source) of each group kernel (rows of 32 lanes) of rule ``name``'s
    flash step (:func:`rule_plan`), generated on the CPU, in launch order: one where everything
    fuses, two for a rule that sums over each param first (LAMB, MARS, cautious AdamW: the sums,
    then the update). Also how many kernels the step takes in all (4-bit codes packed two to a
    byte take kernels of their own; the sums' bookkeeping takes a few small ones)."""
    import functools
    from unittest import mock

    import torch
    import torch._inductor.codegen.triton as inductor_triton
    import torch.utils._triton as torch_triton
    from torch._inductor.async_compile import AsyncCompile

    from flashcompile.compiler import fast_math
    from flashcompile.compiler.explain import fresh_step
    from flashcompile.compiler.verify import sample_inputs

    plan = rule_plan(name)
    sources = []

    class NotRun:  # a kernel here has no device to run on: its outputs stay as allocated, and
        # a later phase still compiles (its kernels depend on shapes, not values)
        def run(self, *args, **kwargs):
            return None

        __call__ = run

    def capture(self, kernel_name, source_code, device_str="cuda"):
        sources.append((kernel_name, source_code))
        return NotRun()

    with fast_math.fast_codegen(), mock.patch.object(AsyncCompile, "triton", capture), \
            mock.patch.object(torch_triton, "triton_hash_with_backend", lambda: "offline"), \
            mock.patch.object(inductor_triton, "triton_hash_with_backend", lambda: "offline",
                              create=True), \
            torch._inductor.config.patch(force_disable_caches=True, cpu_backend="triton"):
        step = fresh_step(plan, functools.partial(torch.compile, fullgraph=True, dynamic=True,
                                                  options=plan.compile_options()))
        try:
            with torch.no_grad():
                step(*sample_inputs(plan, 64, "cpu"))
        except Exception:  # noqa: BLE001 - a step that reads what no kernel wrote may stop
            pass
    distinct = list(dict.fromkeys(sources))  # dynamo may compile a graph again
    out = []
    for kernel, src in distinct:
        if "r0_': 32" not in src:
            continue
        signature = eval(re.search(r"'signature': (\{.*?\})", src).group(1))  # noqa: S307 - ours
        aligned = [i for i, (arg, kind) in enumerate(signature.items())
                   if kind.startswith("*") or arg == "r0_numel"]
        attrs = "{" + ", ".join(f"({i},): [['tt.divisibility', 16]]" for i in aligned) + "}"
        out.append((kernel, re.sub(r"'configs': \[\{.*?\}\]\}", f"'configs': [{attrs}]}}", src)))
    return out, len({source for _, source in distinct})


# Copy bandwidth (measured by `flashcompile bench`), SMs and boost clock: the cards the issue-slot
# ceiling below is worked out for. An SM issues 4 warp instructions (128 thread instructions) a cycle.
CARDS = {"H100": (3024e9, 132, 1.98e9), "H200": (4250e9, 132, 1.98e9)}


def issue_ceiling(per_element: float, bytes_per_element: float, card: str) -> float:
    """% of copy bandwidth at which a kernel issuing ``per_element`` instructions per element (and
    moving ``bytes_per_element``) fills every issue slot of ``card``: an upper bound (no stalls,
    no dual issue); a kernel below 100 here cannot reach the copy rate."""
    copy, sms, clock = CARDS[card]
    elements_per_s = sms * 128 * clock / per_element
    return 100 * elements_per_s * bytes_per_element / copy


def resident_warps(registers: int, warps: int) -> int:
    """Warps an sm_90 SM holds of a kernel with ``registers`` per thread in blocks of ``warps``:
    64K registers, allocated per warp in units of 256 (8 per thread), at most 32 blocks and 64
    warps. Fewer warps hide less latency: the instruction-bound rules' ratio to their ceiling."""
    per_warp = -(-registers // 8) * 8 * 32
    blocks = min(32, 65536 // (per_warp * warps))
    return min(64, blocks * warps)


def print_rule_classes(names: list[str]) -> None:
    """Per rule: SASS per element at the launch config its plans pin (launch.config_for), by class,
    the issue-slot ceiling on each card of :data:`CARDS`, and registers per thread with the warps
    an SM then holds."""
    from sass_histogram import CLASSES  # this folder

    from flashcompile.compiler.launch import config_for

    cards = " | ".join(f"{c} ceiling %" for c in CARDS)
    print("| rule | XBLOCK/warps | kernels | SASS per element | B moved | " + cards + " | "
          + "registers (warps per SM) | " + " | ".join(CLASSES) + " | top |")
    for name in names:
        plan = rule_plan(name)
        xblock, warps = config_for(plan.key.rule.name)
        per_thread = xblock * GROUP_LANES // (32 * warps)  # straight-line code: lanes per thread
        group_kernels, launches = rule_kernels(name)
        counts, registers = collections.Counter(), 0
        for kernel, src in group_kernels:  # a summing pass and the update add up per element
            kernel_counts, kernel_registers = compile_sm90(kernel, src, fp_fusion=True,
                                                           warps=warps, xblock=xblock)
            counts += kernel_counts
            registers = max(registers, kernel_registers)
        per_element = sum(counts.values()) / per_thread
        if not per_element:  # its defaults keep no 8-bit state: no kernel over rows of 32 lanes
            print(f"| {name} | {xblock}/{warps} | {launches} | no group kernel |", flush=True)
            continue
        moved = plan.bytes_moved_per_param(2.0)
        by_class = [sum(counts[op] for op in ops) / per_thread for ops in CLASSES.values()]
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(6))
        print(f"| {name} | {xblock}/{warps} | {launches} | {per_element:.0f} | {moved:.2f} | "
              + " | ".join(f"{issue_ceiling(per_element, moved, c):.0f}" for c in CARDS) + " | "
              + f"{registers} ({resident_warps(registers, warps)}) | "
              + " | ".join(f"{n:.1f}" for n in by_class) + f" | {top} |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--rules"]:
        print_rule_classes(sys.argv[2:])
        return
    print("| kernel | " + " | ".join(label for label, _, _ in VARIANTS) + " |")
    for path in sys.argv[1:]:
        for name, src in kernels(path):
            if "r0_': 32" not in src:  # the group kernel only (rows of 32 lanes)
                continue
            per_element = [sum(sass_counts(name, edit(src), fusion).values()) / 8
                           for _, fusion, edit in VARIANTS]
            print(f"| {os.path.basename(path)} | " + " | ".join(f"{n:.0f}" for n in per_element) + " |")


if __name__ == "__main__":
    main()
