"""Write the Inductor output code of the flash AdamW and SGD plans to $OUT and list their kernels."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

import flashcompile as fc
from flashcompile.explain import count_kernels, inductor_source, plan_of

out = Path(os.environ.get("OUT", "."))
for name, make in {"adamw": fc.AdamW, "sgd": lambda p: fc.SGD(p, momentum=0.9)}.items():
    opt = make([torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16, device="cuda"))])
    code = "\n".join(inductor_source(plan_of(opt), "cuda", groups=2**16))
    (out / f"{name}_inductor.py").write_text(code)
    print(name, count_kernels(code), re.findall(r"def (triton_\w{0,20})", code))
