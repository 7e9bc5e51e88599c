"""torch.amp.GradScaler's protocol for fused optimizers: ``grad_scale`` and ``found_inf``.

An optimizer with ``_step_supports_amp_scaling = True`` (as torch's ``fused=True`` ones) gets two
attributes from ``GradScaler.step``: ``grad_scale``, the loss scale the gradients carry, and
``found_inf``, nonzero if some gradient is not finite. As in torch's fused kernels, a found inf
skips the step (parameters, states and step counts stay as they were), and otherwise the
gradients are unscaled inside the kernel, in fp32: unscaling fp16 gradients in their own storage
would flush small ones to subnormals or zero, which is why GradScaler refuses to unscale fp16
gradients for other optimizers. This is what makes fp16 parameters trainable under GradScaler.

Choices: reading ``found_inf`` and ``grad_scale`` costs one host sync per step (torch's fused
kernels read them on the device). A step with a scale other than 1 runs the plan of
:func:`unscaling`'s rule, compiled once beside the plain one; ``.grad`` keeps the scaled gradient
(torch's fused kernels write the unscaled one back, an extra pass over the gradients).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import torch

from flashcompile.language.dsl import Rule
from flashcompile.runtime import guards

# appended to a plan's flags while a step scales its gradients (GradScaler's unscale, the
# optimizer's max_grad_norm): plans and flat buckets are keyed by flags, so the scaling plan and its
# buckets are built once and kept apart from the plain ones
UNSCALE = ("_grad_unscale", True)
FACTOR = "grad_factor"  # the scaling rule's device scalar: what multiplies every gradient


@functools.cache
def unscaling(rule: Rule) -> Rule:
    """``rule`` with its gradient multiplied first by the device scalar ``grad_factor`` (a
    1-element fp32 tensor the kernel reads: written on the device each step, never synced)."""
    sig = inspect.signature(rule.fn)
    extra = inspect.Parameter(FACTOR, inspect.Parameter.KEYWORD_ONLY)

    def fn(p, g, *states, grad_factor, **hyper):
        return rule.fn(p, g * grad_factor, *states, **hyper)

    fn.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])
    fn.__name__ = fn.__qualname__ = rule.name
    # every other field kept as it is (a field listed by hand here was once left behind)
    return dataclasses.replace(rule, fn=fn, device_scalars=(*rule.device_scalars, FACTOR))


def rule_and_flags(rule: Rule, flags: tuple) -> tuple[Rule, tuple]:
    """The rule a plan for ``flags`` runs, and the rule's own flags."""
    if flags and flags[-1] == UNSCALE:
        return unscaling(rule), flags[:-1]
    return rule, flags


def scaled_step(step):
    """Wrap ``Optimizer.step``: the per-step guards, then GradScaler's ``found_inf`` (skip) and
    ``grad_scale`` (unscale in the kernel)."""

    @functools.wraps(step)
    def wrapper(self, closure=None):
        guards.check_step(self)
        scale = getattr(self, "grad_scale", None)
        found = getattr(self, "found_inf", None)
        if scale is None and found is None:
            return step(self, closure)
        if self._gradient_release is not None:
            raise RuntimeError(
                "gradient release stepped every parameter inside backward, before GradScaler "
                "could check the gradients for infs or unscale them; train in bfloat16 without a "
                "GradScaler, or remove the release (handle.remove())")
        if found is not None and float(found) != 0:  # one host sync (see the module docstring)
            if closure is None:
                return None
            with torch.enable_grad():  # torch's fused optimizers run the closure, skip the update
                return closure()
        inverse = 1.0 if scale is None else 1.0 / _scale_value(scale)
        self._grad_unscale = None if inverse == 1.0 else inverse
        try:
            return step(self, closure)
        finally:
            self._grad_unscale = None

    return wrapper


def _scale_value(scale) -> float:
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"grad_scale is {value}; a loss scale must be finite and positive")
    return value
