"""Static SASS instruction counts per kernel, by class, from the cubins ``kernel_profile.py`` dumps.

Usage: python benchmarks/sass_histogram.py DUMP_DIR  (needs cuobjdump, which Triton's package and
the CUDA toolkit carry). Writes each kernel's SASS beside its cubin and prints one row per kernel.
A group kernel handles 8 lanes per thread in straight-line code (launch.py), so static count / 8 is
roughly the instructions issued per element, slow paths aside."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

CLASSES = {
    "mem": ("LDG", "STG", "LD", "ST", "LDS", "STS", "LDC", "ULDC"),
    "fp32": ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET"),
    "int": ("IMAD", "IADD3", "LOP3", "SHF", "ISETP", "SEL", "PRMT", "IMNMX", "LEA", "IABS", "IADD",
            "VIADD", "VIMNMX", "ISCADD", "BMSK", "POPC", "FLO"),
    "convert": ("F2I", "I2F", "F2F", "FRND", "F2FP", "I2FP", "I2I", "HADD2", "HMUL2", "HFMA2"),
    "mufu": ("MUFU",),
    "shuffle": ("SHFL",),
    "control": ("BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "WARPSYNC", "NOP", "BAR"),
}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def opcode_counts(sass: str) -> Counter:
    counts: Counter = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            counts[m.group(1)] += 1
    return counts


def classify(counts: Counter) -> dict[str, int]:
    out = dict.fromkeys([*CLASSES, "other"], 0)
    for op, n in counts.items():
        cls = next((c for c, ops in CLASSES.items() if op in ops), "other")
        out[cls] += n
    return out


def main() -> None:
    root = Path(sys.argv[1])
    print("| rule | kernel | warps | regs | static SASS | " + " | ".join([*CLASSES, "other"]) + " |")
    for cubin in sorted(root.glob("*/*/*.cubin")):
        meta_path = cubin.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
        cubin.with_suffix(".sass").write_text(sass)
        counts = opcode_counts(sass)
        classes = classify(counts)
        regs = meta.get("n_regs", "?")
        print(f"| {cubin.parts[-3]} | {cubin.stem[:40]} | {meta.get('num_warps', '?')} | {regs} | "
              f"{sum(counts.values())} | " + " | ".join(str(v) for v in classes.values()) + " |")
        top = ", ".join(f"{op} {n}" for op, n in counts.most_common(12))
        print(f"|   top: {top} |")


if __name__ == "__main__":
    main()
