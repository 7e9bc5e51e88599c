"""Each study runs end to end at tiny sizes and writes its table and plot; the facts they report that
do not depend on size hold."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from flashcompile.__main__ import main as cli
from flashcompile.tools.studies import collapse, state_error, weight_split


@pytest.mark.parametrize("name", ["weight-split", "state-error", "collapse", "convergence",
                                  "late-training"])
def test_study_writes_csv_summary_and_plot(name, tmp_path):
    extra = ["--steps", "4", "--tasks", "digits"] if name == "convergence" else []
    cli(["study", name, "--quick", "--out", str(tmp_path), *extra])
    stem = name.replace("-", "_")
    for suffix in (".csv", "_summary.md", ".png"):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0
    with open(tmp_path / f"{stem}.csv") as f:
        assert len(list(csv.DictReader(f))) > 0


def test_weight_split_meets_the_papers_numbers_on_bf16():
    rows = weight_split.summarize(weight_split.measure(samples=2048))
    bf16 = {r["residual"]: r for r in rows if r["weight"] == "bf16"}
    assert bf16["int8"]["max rel err"] <= 1.54e-5
    assert bf16["int16"]["bit-exact"] >= 0.999
    assert bf16["none"]["max rel err"] > bf16["float16"]["max rel err"] > 0


def test_adam_bound_is_never_exceeded_by_exact_adam():
    grads = collapse.loud_case(300.0, "noisy", steps=40, groups=4)
    moves, _, _ = collapse.run(grads, "fp32", guard=False)
    assert moves.abs().max() <= collapse.adam_bound(40)


def test_default_adam_keeps_its_steps_within_its_bound_where_the_papers_collapse():
    """One mean-zero lane 1000x louder per group of 32: the paper's sqrt_uint8 stores the quiet second
    moments as 0 while their first moments survive, and plain Adam steps by m / eps; under Adam's
    step guard the same zeros never step beyond Adam's bound; the default's adaptive codecs store
    no zero v at all (those groups take the relative code)."""
    grads = collapse.loud_case(1000.0, "noisy", steps=100, groups=8)
    bound = collapse.adam_bound(100)
    paper, _, v_paper = collapse.run(grads, collapse.PAPER, guard=False)
    guarded, _, v_guarded = collapse.run(grads, collapse.PAPER)
    default, _, v_default = collapse.run(grads, {})
    assert paper.abs().max() > 10 * bound and (v_paper == 0).any()
    assert guarded.abs().max() <= bound * collapse.MEASURED and (v_guarded == 0).any()
    assert default.abs().max() <= bound * collapse.MEASURED and not (v_default == 0).any()


def test_state_error_rows_cover_every_codec_and_the_nonzero_codec_drops_no_v():
    m = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 50)
    rows = state_error.snapshot_rows("synthetic", 10, [(m, m * m)])
    v_rows = {r["codec"]: r for r in rows if r["quantity"] == "v"}
    assert v_rows["sqrt_uint8_nonzero (earlier default without a guard)"]["zero_frac"] == 0
    assert v_rows[f"{state_error.ADAM_V} (default)"]["zero_frac"] == 0
    assert v_rows["linear_int8"]["zero_frac"] > v_rows["sqrt_uint8 (paper)"]["zero_frac"]
    # where v decodes to 0, the guard caps the direction: never inflated more often than the paper's
    u_rows = {r["codec"]: r for r in rows if r["quantity"] == "update"}
    guarded = u_rows["paper codecs + step guard (earlier default)"]
    assert guarded["inflated_frac"] <= u_rows["paper"]["inflated_frac"]
    assert guarded["nmse"] <= u_rows["paper"]["nmse"]
    # six decades of scale in 50 lanes: the adaptive codecs keep the quiet lanes' direction that
    # the paper's codes round away (lanes beyond the relative code's 15 binades sit on its floor)
    assert u_rows["default (adaptive, v stochastic, guard)"]["nmse"] <= 0.5 * u_rows["paper"]["nmse"]


def test_convergence_run_filter_takes_words_or_exact_names_and_adds_twins():
    from flashcompile.tools.studies.convergence import selected

    assert list(selected("chars", False, "=adamw flash")) == ["adamw fp32 (torch)", "adamw flash"]
    # the twin, and the paper, relative, 4-bit, bf16-weight (two), linear and fp32-norm rows too
    assert len(selected("chars", False, "adamw flash")) == 9
    with pytest.raises(ValueError, match="match no run"):
        selected("chars", False, "=adamw")


def test_relative_and_default_codecs_keep_the_update_of_outlier_groups_quiet_lanes():
    """Outlier features (one lane 300x louder, one 10x quieter per group of 32): the paper's codecs
    under the step guard lose the quiet lanes' updates; codes relative to each value keep them,
    and so does the default (its adaptive codecs take them for those groups): issue bars 0.99
    overall and 0.9 on the quiet lanes."""
    grads = collapse.outlier_case(300.0, steps=60, groups=8)
    ref, _, _ = collapse.run(grads, "fp32", guard=False)
    quiet = collapse._quiet_lanes("outlier", grads.shape[1])
    cos = {}
    for name in ("paper codecs + step guard (earlier default)", "e4m3_int8 + sqrt_e4m4, guard",
                 "default (adaptive, v stochastic, guard)"):
        codecs, guard = collapse.PAIRS[name]
        moves, _, _ = collapse.run(grads, codecs, guard)
        cos[name] = (collapse._cosine(moves[-1], ref[-1]),
                     collapse._cosine(moves[-1][quiet], ref[-1][quiet]))
    assert min(cos["e4m3_int8 + sqrt_e4m4, guard"]) >= 0.99
    assert cos["default (adaptive, v stochastic, guard)"][0] >= 0.99
    assert cos["default (adaptive, v stochastic, guard)"][1] >= 0.9
    assert cos["paper codecs + step guard (earlier default)"][1] < 0.9


def test_a_study_without_out_writes_to_a_fresh_folder(tmp_path, monkeypatch):
    from flashcompile.tools.studies import fresh_folder

    monkeypatch.chdir(tmp_path)
    first = fresh_folder("collapse")
    Path(first).mkdir()
    second = fresh_folder("collapse")
    assert first.startswith("study-collapse-") and second != first and not Path(second).exists()
