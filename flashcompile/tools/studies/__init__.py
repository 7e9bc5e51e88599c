"""Studies users can rerun: ``python -m flashcompile study NAME [--out DIR] [--quick]``.

Without ``--out`` each run writes to a fresh folder ``study-<name>-<date>-<time>`` in the current
directory (never over the published results in ``docs/results``, unless ``--out`` names it). Each
writes ``<out>/<name>.csv`` (every measured row), ``<out>/<name>_summary.md`` (the table the
docs quote) and ``<out>/<name>.png`` (the plot), and prints the summary.

* ``weight-split``: reconstruction error of the master weight across exponents, bf16 and fp16 x
  {no residual, 16-bit float residual, int8 ULP residual, int16 ULP residual};
* ``state-error``: quantisation error of Adam's m and v along real training trajectories, per codec;
* ``collapse``: constructed groups that mix scales, where group-absmax 8-bit codecs drop small second
  moments and Adam steps by m / eps, and outlier features whose quiet lanes lose their updates; the
  paper's codecs against the defaults and the codecs relative to each value;
* ``convergence``: fp32 optimizers against their flashcompile twins on real data (digits MLP,
  character-level transformer on Python's help text), several seeds, and the linear-int8 ablation;
* ``late-training``: the loss a long decaying schedule reaches, per codec of Adam's states.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

STUDIES = {
    "weight-split": "weight_split",
    "state-error": "state_error",
    "collapse": "collapse",
    "convergence": "convergence",
    "late-training": "late_training",
}


def run(name: str, **options) -> None:
    """Run study ``name`` (one of :data:`STUDIES`) with the CLI's options."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}")
    if not options.get("out"):
        options["out"] = fresh_folder(name)
    Path(options["out"]).mkdir(parents=True, exist_ok=True)
    print(f"study {name}: writing to {options['out']}", flush=True)
    importlib.import_module(f"flashcompile.tools.studies.{STUDIES[name]}").main(**options)


def fresh_folder(name: str) -> str:
    """``study-<name>-<date>-<time>``, with a counter if that exists already."""
    stem = f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = Path(stem), 1
    while path.exists():
        path, k = Path(f"{stem}-{k}"), k + 1
    return str(path)


def add_parser(sub) -> None:
    """The ``study`` subcommand of ``python -m flashcompile``."""
    p = sub.add_parser("study", help="rerun a study: writes CSV + summary + PNG under --out")
    p.add_argument("name", choices=sorted(STUDIES))
    p.add_argument("--out", default=None,
                   help="output folder (default: a fresh study-<name>-<date>-<time>; the published "
                        "results are in docs/results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--steps", type=int, help="training / stepping length (default per study)")
    p.add_argument("--seeds", type=int, help="convergence, late-training: seeds (default 3)")
    p.add_argument("--device", default="cpu", help="convergence: cpu or cuda")
    p.add_argument("--compile", action="store_true", help="convergence: compiled flash kernels")
    p.add_argument("--size", default="cpu", choices=["cpu", "gpu"],
                   help="convergence: model sizes (gpu: 3.2M-parameter transformer, longer runs)")
    p.add_argument("--tasks", dest="tasks_", default="digits,chars", help="convergence: tasks")
    p.add_argument("--runs", dest="runs_", default="",
                   help="convergence, late-training: only runs whose names contain one of these "
                        "comma-separated words (with their twins or reference), e.g. 'sgd'; "
                        "convergence: '=NAME' selects that run alone")
