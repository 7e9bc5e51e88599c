"""Write the Inductor output code of the named rules' flash plans (CUDA, as the optimizer compiles
them) to $OUT/<rule>_inductor.py and list their kernels. Usage: python benchmarks/dump_kernels.py
[Rule ...] (default AdamW SGD)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from family_probe import flash_plan

from flashcompile.compiler.explain import count_kernels, inductor_source

out = Path(os.environ.get("OUT", "."))
for name in sys.argv[1:] or ["AdamW", "SGD"]:
    code = "\n".join(inductor_source(flash_plan(name), "cuda", groups=2**16))
    (out / f"{name}_inductor.py").write_text(code)
    print(name, count_kernels(code), re.findall(r"def (triton_\w{0,40})", code))
