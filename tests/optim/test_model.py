"""16-bit models: cast_model, and fp32 weights in and out through the weight split."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import flashcompile as fc
from flashcompile.codecs import PARAM
from flashcompile.testing import bound


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 37)
        self.ln = nn.LayerNorm(37)
        self.head = nn.Linear(37, 5)

    def forward(self, x):
        x = self.bn(self.conv(x)).relu().flatten(1)
        return self.head(self.ln(self.fc(x)))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def test_cast_model_keeps_batch_norm_in_fp32_and_runs_in_16_bits():
    model = fc.cast_model(_net())
    assert model.conv.weight.dtype == model.fc.weight.dtype == torch.bfloat16
    assert model.ln.weight.dtype == torch.bfloat16  # exact enough under the weight split
    assert all(t.dtype == torch.float32 for t in model.bn.parameters())
    assert model.bn.running_var.dtype == torch.float32
    assert model.bn.num_batches_tracked.dtype == torch.int64
    out = model(torch.randn(2, 1, 8, 8).bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.fc.weight.grad.dtype == model.ln.weight.grad.dtype == torch.bfloat16
    assert model.bn.weight.grad.dtype == torch.float32


def _saved_fp32_activations(model, x):
    """Shapes of the activations (batch-sized tensors) autograd saves for backward in fp32."""
    saved = []

    def pack(t):
        if t.dtype == torch.float32 and t.dim() >= 2 and t.shape[0] == x.shape[0]:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().sum().backward()
    return saved


def test_batch_norm_kept_in_fp32_has_no_casts_and_saves_no_fp32_activation():
    model = fc.cast_model(_net())
    assert not model.bn._forward_hooks and not model.bn._forward_pre_hooks
    seen = []
    model.bn.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x = torch.randn(8, 1, 8, 8).bfloat16()
    assert _saved_fp32_activations(model, x) == []
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    # the former default, every norm layer in fp32 behind casts, saves fp32 copies
    old = fc.cast_model(_net(), keep_fp32=fc.NORM_LAYERS)
    assert old.ln.weight.dtype == torch.float32 and old.ln._forward_pre_hooks
    assert _saved_fp32_activations(old, x)


def test_batch_norm_kept_in_fp32_keeps_the_channels_last_format():
    model = fc.cast_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    model = model.to(memory_format=torch.channels_last)
    y = model(torch.randn(2, 3, 9, 9).bfloat16().to(memory_format=torch.channels_last))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_cast_model_keeps_what_a_predicate_or_type_selects():
    model = fc.cast_model(_net(), torch.float16, keep_fp32=lambda m: m is not None and isinstance(m, nn.Linear))
    assert model.fc.weight.dtype == torch.float32 and model.conv.weight.dtype == torch.float16
    assert model.bn.weight.dtype == torch.float16
    assert fc.cast_model(_net(), keep_fp32=None).bn.weight.dtype == torch.bfloat16
    assert fc.cast_model(_net(), keep_fp32=nn.Conv2d).conv.weight.dtype == torch.float32


@pytest.mark.parametrize("kwargs, error", [
    (dict(dtype=torch.float64), "bfloat16 or torch.float16"),
    (dict(keep_fp32=(int,)), "nn.Module types"),
    (dict(keep_fp32="LayerNorm"), "predicate"),
])
def test_cast_model_rejects_bad_arguments(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fc.cast_model(_net(), **kwargs)


def _fp32_weights(seed=1):
    return {k: v.clone() for k, v in _net(seed).state_dict().items()}


def test_fp32_weights_round_trip_within_the_weight_split_bound():
    model = fc.cast_model(_net())
    opt = fc.AdamW(model.parameters(), compile=False)
    weights = _fp32_weights()
    fc.load_fp32_state_dict(model, opt, weights)
    out = fc.fp32_state_dict(model, opt)
    assert out.keys() == weights.keys()
    for p in model.parameters():
        name = next(k for k, t in model.state_dict(keep_vars=True).items() if t is p)
        codec = opt.plan_for(p, opt.flags_of(opt.param_groups[0])).codecs[PARAM]
        err = (out[name] - weights[name]).abs()
        assert out[name].dtype == torch.float32
        assert (err <= bound(codec, weights[name])).all(), name
        # the 16-bit weight alone is the fp32 weight rounded to nearest
        assert torch.equal(p.detach(), weights[name].to(p.dtype))


def test_fp32_export_is_the_master_weight_during_training():
    model = fc.cast_model(_net())
    opt = fc.AdamW(model.parameters(), lr=1e-2, compile=False)
    for seed in range(3):
        torch.manual_seed(seed)
        model(torch.randn(4, 1, 8, 8).bfloat16()).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    out = fc.fp32_state_dict(model, opt)
    assert torch.equal(out["fc.weight"], opt.master_weight(model.fc.weight))
    assert not torch.equal(out["fc.weight"], model.fc.weight.float())  # the residual is there
    assert torch.equal(out["bn.running_mean"], model.bn.running_mean)


@pytest.mark.parametrize("broken", ["missing", "shape"])
def test_fp32_state_dict_that_does_not_fit_is_rejected_and_nothing_changes(broken):
    model = fc.cast_model(_net())
    opt = fc.AdamW(model.parameters(), compile=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = _fp32_weights()
    if broken == "missing":
        del weights["head.bias"]
    else:
        weights["head.weight"] = torch.zeros(5, 36)
    with pytest.raises((KeyError, ValueError), match="head"):
        fc.load_fp32_state_dict(model, opt, weights)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt.state


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight
        self.extra = nn.Linear(8, 8)


def test_load_fp32_state_dict_takes_a_tied_key_once_and_strict_false_skips_the_rest():
    model = fc.cast_model(TiedHead())
    opt = fc.AdamW(model.parameters(), compile=False)
    weights = {k: torch.randn(v.shape) for k, v in TiedHead().state_dict().items()
               if k != "head.weight"}  # a checkpoint that stores the tied weight once
    assert fc.load_fp32_state_dict(model, opt, weights) == ([], [])
    split = fc.codecs.weight_split
    w = weights["embed.weight"]
    assert torch.all((opt.master_weight(model.head.weight) - w).abs() <= split.error_bound(w))
    del weights["extra.bias"]
    weights["unused"] = torch.zeros(1)
    with pytest.raises(KeyError, match="strict=False"):
        fc.load_fp32_state_dict(model, opt, weights)
    missing, unexpected = fc.load_fp32_state_dict(model, opt, weights, strict=False)
    assert (missing, unexpected) == (["extra.bias"], ["unused"])
    assert torch.equal(model.extra.weight, weights["extra.weight"].bfloat16())


def test_adamw_checkpoint_of_a_bf16_model_is_under_5_2_bytes_per_param():
    model = fc.cast_model(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 256)))
    opt = fc.AdamW(model.parameters(), compile=False)
    model(torch.randn(2, 1024).bfloat16()).float().sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    n = sum(p.numel() for p in model.parameters())
    # bf16 weight 2 + int8 residual 1 + two 8-bit states with fp16 scales 2.125 = 5.125,
    # plus a few hundred bytes of zip records per tensor
    assert buf.tell() / n <= 5.2
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    # per-element states only (0-d: the step and the step guard's bound_sq, one fp32 per param)
    dtypes = {t.dtype for s in loaded["optimizer"]["state"].values() for t in s.values() if t.dim()}
    assert dtypes == {torch.int8, torch.uint8, torch.float16}


def _sgd_on_a_bf16_weight(codec: str, steps: int, compile: bool = False, n: int = 4096):
    """SGD (no state) on a bf16 weight in [1, 2) (ULP 2^-7) with steps of 5e-5 to 1.5e-4, below half
    its ULP; distinct gradients, so each element's noise keys differ. Returns the start, the
    weight after ``steps`` and the exact (float64) weight."""
    gen = torch.Generator().manual_seed(0)
    w0 = (1 + torch.rand(n, generator=gen)).bfloat16()
    grad = (0.5 + torch.rand(n, generator=gen)).bfloat16()
    p = nn.Parameter(w0.clone())
    opt = fc.SGD([p], lr=1e-4, codecs={PARAM: codec}, compile=compile)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return w0, p.detach().clone(), w0.double() - 1e-4 * steps * grad.double()


def test_a_bf16_weight_rounded_stochastically_follows_updates_below_half_its_ulp():
    """Rounded to nearest (``bf16``) no step moves the weight; rounded stochastically (``bf16_sr``,
    the param the whole weight: 2 B/param, no residual) it follows the exact trajectory on
    average. Over 300 steps the exact weight moves 2-6 ULPs; each element's walk spreads by about
    2 ULPs, so over 4096 elements the mean error stays within a tenth of the mean move (measured:
    0.006 ULPs against 3.85)."""
    w0, stuck, _ = _sgd_on_a_bf16_weight("bf16", 300)
    assert torch.equal(stuck, w0)
    w0, walked, exact = _sgd_on_a_bf16_weight("bf16_sr", 300)
    moved = (w0.double() - exact).mean()
    assert abs((walked.double() - exact).mean()) <= 0.1 * moved
    # each element rounds up about as often as a Poisson count of mean <= 5.9 (its move in ULPs):
    # 16 ULPs off is a 1e-7 tail, under 1e-3 over 4096 elements
    assert ((walked.double() - exact).abs() <= 16 * 2.0**-7).all()


def test_a_bf16_weight_rounded_stochastically_steps_alike_compiled_and_eager():
    """The compiled kernel draws the same noise from the same values: bit for bit the eager
    step's weights; and the optimizer keeps no residual beside the param."""
    _, eager, _ = _sgd_on_a_bf16_weight("bf16_sr", 20, n=300)
    _, compiled, _ = _sgd_on_a_bf16_weight("bf16_sr", 20, compile=True, n=300)
    assert torch.equal(eager, compiled)
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = fc.AdamW([p], codecs={PARAM: "bf16_sr"}, compile=False)
    p.grad = torch.ones_like(p)
    opt.step()
    per_element = sum(t.numel() * t.element_size() for t in opt.state[p].values() if t.dim())
    assert per_element / p.numel() == 2 * 1.0625  # m and v with their scales; the weight is p


def test_a_bf16_weight_codec_leaves_the_layers_cast_model_kept_in_fp32_exact():
    """``{"param": "bf16_sr"}`` (or ``"bf16"``) on a model with layers kept in fp32: those params
    are their own exact storage (fp32), the bf16 ones keep no residual; a step runs."""
    model = fc.cast_model(Net(), keep_fp32=fc.NORM_LAYERS)
    opt = fc.AdamW(model.parameters(), codecs={PARAM: "bf16_sr"}, compile=False)
    model(torch.randn(2, 1, 8, 8).bfloat16()).float().sum().backward()
    opt.step()
    flags = opt.flags_of(opt.param_groups[0])
    kinds = {p.dtype: opt.plan_for(p, flags).codecs[PARAM].name for p in model.parameters()}
    assert kinds == {torch.bfloat16: "bf16_sr", torch.float32: "fp32"}
