"""Compile an Inductor-written Triton kernel for sm_90 on any machine (no GPU: Triton's own ptxas
and cuobjdump) and count its SASS with and without the fast-math forms of flashcompile.fast_math.

Usage: python benchmarks/sass_offline.py OUTPUT_CODE.py [...]   (files from dump_kernels.py or
family_probe.py; needs ``pip install triton``). Prints static SASS instructions per element (the
group kernel handles 8 lanes per thread, straight-line) for: Inductor's code as compiled
(no fused multiply-adds), with FMA, + approximate division, + approximate square root, both."""

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
    return collections.Counter(m.group(1) for m in re.finditer(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))


VARIANTS = [("Inductor", False, lambda s: s), ("+FMA", True, lambda s: s),
            ("+FMA+div", True, fast_division), ("+FMA+sqrt", True, fast_sqrt),
            ("+FMA+div+sqrt", True, lambda s: fast_sqrt(fast_division(s)))]


def main() -> None:
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
