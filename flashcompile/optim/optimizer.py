"""The ``torch.optim.Optimizer`` adapter: runs any rule with any codecs over param groups.

Per parameter it keeps ``state['step']`` (a CPU float tensor, as torch.optim) and the codec fields of
every live state (``exp_avg.codes``, ``exp_avg.scale``, ``param.residual``, ...), flat and padded to
whole groups of 32. Each step it evaluates the rule's scalar prologue once per (group, step) on the
host and calls the compiled plan per parameter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from flashcompile.codecs import GROUP, PARAM, layout
from flashcompile.codecs.presets import check_codec_spec, resolve_codecs
from flashcompile.compiler.plan import Plan, PlanKey, get_plan, state_key
from flashcompile.language.dsl import Rule
from flashcompile.language.trace import check_facts, trace
from flashcompile.optim import clipping, groups
from flashcompile.optim import hyperparameters as _hyper
from flashcompile.optim.checkpoint import Checkpoints
from flashcompile.optim.shared import SharedByRule
from flashcompile.optim.stored_values import StoredValues
from flashcompile.runtime import amp, distributed, guards
from flashcompile.runtime.arena import Bucket
from flashcompile.runtime.distributed import is_dtensor, to_local
from flashcompile.runtime.shards import ShardBucket
from flashcompile.runtime.state import OptimizerState
from flashcompile.runtime.stepping import PerTensor, ScalarCache
from flashcompile.runtime.tensor_graph import TensorGraphs

SUPPORTED_DTYPES = guards.SUPPORTED_DTYPES
# the first of flags_of's pairs for a group whose rule is not the optimizer's: (RULE_FLAG, its name)
RULE_FLAG = "rule"


class Optimizer(Checkpoints, StoredValues, torch.optim.Optimizer):
    """Run ``rule`` as a torch optimizer.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        rule: a :func:`flashcompile.rule`.
        codecs: ``"flash"`` (default: weight split for 16-bit params, 8-bit states), ``"fp32"``
            (reproduces torch.optim), ``"relative"`` (see ``flashcompile.codecs.presets``), or a mapping
            from state name (or ``"param"``) to a codec; unnamed states keep the flash default.
        compile: run the plan through ``torch.compile`` (default) or eagerly (for debugging).
        flat: keep each group's params, grads and states in flat buffers and step them in one
            launch (:mod:`flashcompile.runtime.arena`). Default: on for CUDA params. Params then become
            views into those buffers, and ``zero_grad`` points grads into the gradient buffer and
            zeroes it in place (grads stay allocated, as with ``set_to_none=False``); a step
            copies gradients it did not make, never replacing them. FSDP2 (DTensor) params keep
            their weight shards in FSDP2's storage: only grads and states go flat
            (:class:`flashcompile.runtime.distributed.ShardBucket`).
        max_grad_norm: clip the gradients of all the optimizer's params to this total L2 norm
            inside the step, as ``torch.nn.utils.clip_grad_norm_`` then ``step()`` would, reading
            the gradients once for the norm and once in the kernel, which scales them as it reads
            them (``.grad`` keeps the unclipped values; :attr:`last_grad_norm` holds the norm).
            Under gradient release each bucket is clipped alone (:mod:`flashcompile.optim.clipping`).
        **hyperparameters: the rule's hyperparameters; missing ones take the rule's defaults.
            torch.optim's ``foreach``, ``fused``, ``capturable`` and ``differentiable`` are taken
            too (:mod:`flashcompile.optim.hyperparameters` says what each means here).
    """

    # GradScaler hands fused optimizers grad_scale and found_inf instead of unscaling fp16 grads
    _step_supports_amp_scaling = True
    # torch.optim.Adam/AdamW refuse tensor lr or betas with foreach=True (and capturable=False)
    _refuses_tensor_hyperparameters_with_foreach = False
    # flat buckets: grads as views into one buffer autograd accumulates into (True), or the grads
    # autograd makes, concatenated into a buffer per step (False); see Bucket
    grad_views = True

    def __init__(self, params: Iterable, rule: Rule, *, codecs: str | Mapping[str, Any] = "flash",
                 compile: bool = True, flat: bool | None = None,
                 max_grad_norm: float | None = None, **hyperparameters: Any):
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a flashcompile.rule, got {type(rule).__name__}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got "
                             f"{max_grad_norm!r}")
        owner = type(self).__name__ if type(self) is not Optimizer else f"Optimizer({rule.name})"
        implementation = _hyper.implementation_flags(hyperparameters, owner)
        unknown = set(hyperparameters) - set(rule.defaults)
        if unknown:
            raise TypeError(
                f"{owner} got unknown hyperparameters {sorted(unknown)}; it takes "
                f"{sorted(rule.defaults)}, torch.optim's {sorted(_hyper.IMPLEMENTATION_FLAGS)} "
                "and codecs=, compile=, flat=, max_grad_norm="
            )
        defaults = {**rule.defaults, **hyperparameters}
        # as torch.optim: every hyperparameter is checked before the params are read
        _hyper.check_tensor_inputs({k: defaults[k] for k in rule.floats},
                                   implementation["foreach"], implementation["capturable"],
                                   self._refuses_tensor_hyperparameters_with_foreach)
        self._checked_hyperparameters(rule, defaults)
        self.rule = rule
        # other rules param groups name (group["rule"]: the rule's name, its Rule kept here)
        self._group_rules: dict[str, Rule] = {}
        # a mapping may name states of any group's rule (each group takes its own rule's
        # entries): checked against every rule once the groups are in (_check_codec_names)
        self.codecs_spec = codecs if isinstance(codecs, Mapping) else check_codec_spec(codecs,
                                                                                       rule)
        self.compile = compile
        self.flat = flat
        self._buckets: dict[tuple, Bucket] = {}
        self._buckets_of_group: dict[int, tuple] = {}
        self._gradient_release = None  # set by flashcompile.enable_gradient_release
        self._plans: dict[tuple, Plan] = {}
        self._per_tensor: dict[int, PerTensor] = {}  # by id(param), see _step_one
        self._tensor_graphs = TensorGraphs()  # CUDA: per-tensor steps replayed (tensor_graph)
        self._grad_unscale: float | None = None  # 1 / GradScaler's scale during a step (amp.py)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: torch.Tensor | None = None  # the norm max_grad_norm last clipped
        self._factors: dict[torch.device, torch.Tensor] = {}  # this step's gradient factor
        self._shared = SharedByRule()  # the shared numbers of rules that have them (Prodigy's d)
        super().__init__(params, {**defaults, **implementation})
        self._check_codec_names()
        self.state = OptimizerState()  # counts its changes; missing keys say where a state lives

    # ---- construction-time checks -------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's. A group may name its own rule (``"rule"``: a rule, or the name of a
        drop-in class such as ``"adamw"``, whose defaults the group then takes): Muon's matrices
        and AdamW's other params in one optimizer, one state dict, one scheduler."""
        if param_group.get("rule") is not None:
            param_group = dict(param_group)
            rule, defaults = groups.resolve(param_group["rule"])
            if rule is not self.rule:
                known = self._group_rules.setdefault(rule.name, rule)
                if known is not rule:
                    raise ValueError(f"two different rules are named {rule.name!r}")
                param_group["rule"] = rule.name
                self.codecs_for(rule)  # the mapping's entries for its states fit them
                for k, v in defaults.items():
                    param_group.setdefault(k, v)
            else:
                del param_group["rule"]
        super().add_param_group(param_group)  # warns about duplicate params, as torch.optim
        group = self.param_groups[-1]
        _drop_duplicates(group)
        try:
            self.hyperparameters_of(group)
            rule = self.rule_of(group)
            for name in rule.shared:  # visible before the first step, as prodigyopt's d
                group.setdefault(name, rule.shared_start(name, group))
            index = len(self.param_groups) - 1
            for i, p in enumerate(group["params"]):
                traced = trace(rule, dict(self.flags_of(group) + rule.param_flag_values(p)))
                check_facts(traced)
                guards.check_param(p, f"param {i} of group {index} (shape {tuple(p.shape)})")
                distributed.check_sharded(p, traced)
                guards.check_matrix(rule, traced, p)
        except Exception:
            self.param_groups.pop()
            raise

    def codecs_for(self, rule: Rule) -> str | dict[str, Any]:
        """The optimizer's ``codecs=`` as ``rule`` takes them: a preset name, or the mapping's
        entries for ``rule``'s states and the master weight (checked)."""
        if not isinstance(self.codecs_spec, Mapping):
            return self.codecs_spec
        mine = {k: v for k, v in self.codecs_spec.items() if k == PARAM or k in rule.states}
        return check_codec_spec(mine, rule)

    def _check_codec_names(self) -> None:
        """Every state a ``codecs=`` mapping names belongs to some group's rule (a typo would
        otherwise be ignored by all), and every entry fits each rule that has the state."""
        if not isinstance(self.codecs_spec, Mapping):
            return
        rules = [self.rule, *self._group_rules.values()]
        for rule in rules:
            self.codecs_for(rule)
        known = {PARAM}.union(*(r.states for r in rules))
        unknown = sorted(set(self.codecs_spec) - known)
        if unknown:
            raise ValueError(
                f"codecs names unknown state {unknown[0]!r}; the rules here have states "
                + "; ".join(f"{r.name} {list(r.states)}" for r in rules)
                + " (and 'param' for the master weight)")

    def rule_of(self, group: Mapping[str, Any]) -> Rule:
        """The rule that steps ``group``: its own (``group["rule"]``) or the optimizer's."""
        name = group.get("rule")
        return self.rule if name is None or name == self.rule.name else self._group_rules[name]

    def hyperparameters_of(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as Python values, each checked against its range."""
        return self._checked_hyperparameters(self.rule_of(group), group)

    def _checked_hyperparameters(self, rule: Rule, group: Mapping[str, Any]) -> dict[str, Any]:
        """:func:`flashcompile.optim.hyperparameters.values` (a class whose torch twin takes
        other values than floats overrides this: Adafactor's ``eps1=None``)."""
        return _hyper.values(rule, group)

    # ---- plans and storage: the runtime, release, checkpoints and testing call these --------------

    def plan_for(self, p: torch.Tensor, flags: tuple[tuple[str, bool], ...]) -> Plan:
        """The plan that steps ``p`` under ``flags`` (:meth:`flags_of` its group)."""
        # memoised: resolving costs sympy work per call, and per-tensor steps (gradient release)
        # ask once per param per step
        rule, rule_flags = self.rule, flags
        if flags and flags[0][0] == RULE_FLAG:  # a group of another rule (flags_of)
            rule, rule_flags = self._group_rules[flags[0][1]], flags[1:]
        own = rule.param_flag_values(p) if rule.param_flags else ()  # Adafactor's "matrix"
        key = (p.dtype, p.device.type, flags, self.compile, own)
        if key not in self._plans:
            rule, flags = amp.rule_and_flags(rule, rule_flags)
            flags += own
            live = trace(rule, dict(flags)).live_states()
            codecs = resolve_codecs(rule, self.codecs_for(rule), p.dtype, live)
            self._plans[key] = get_plan(PlanKey(rule, flags, codecs, p.device.type, self.compile))
        return self._plans[key]

    def flags_of(self, group: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """The group's static flags, sorted (plus the unscale flag inside a GradScaler step); a
        group of another rule than the optimizer's starts with ``(RULE_FLAG, its name)``."""
        rule = self.rule_of(group)
        flags = tuple(sorted((k, rule.static_value(k, group[k])) for k in rule.flags))
        flags += rule.zero_flags(group)
        if rule is not self.rule:
            flags = ((RULE_FLAG, rule.name), *flags)
        return flags + (amp.UNSCALE,) if self.scales_gradients else flags

    @property
    def scales_gradients(self) -> bool:
        """Whether steps multiply each gradient by a factor on the device (GradScaler's unscale
        during its step, ``max_grad_norm`` always: the plan stays the same from step to step)."""
        return self._grad_unscale is not None or self.max_grad_norm is not None

    def _set_factor(self, factor: torch.Tensor | float, device: torch.device) -> torch.Tensor:
        """Make ``factor`` the gradient factor of this step's launches on ``device`` (one tensor
        per device, written in place: launches and graphs recorded with it read the new value)."""
        held = self._factors.get(device)
        if held is None:
            held = self._factors[device] = torch.ones(1, device=device)
        if isinstance(factor, torch.Tensor):
            held.copy_(factor.reshape(1))
        else:
            held.fill_(factor)
        return held

    def _prepare_factors(self) -> None:
        """This step's gradient factor on every device the params are on: 1 / GradScaler's scale,
        times the clip coefficient of ``max_grad_norm`` (computed on the device, never synced)."""
        inverse = self._grad_unscale if self._grad_unscale is not None else 1.0
        devices = {p.device for g in self.param_groups for p in g["params"] if p.grad is not None}
        if self.max_grad_norm is None:
            for device in devices:
                self._set_factor(inverse, device)
            return
        norm, coefficient = clipping.coefficient(self, self.max_grad_norm, inverse)
        self.last_grad_norm = norm
        for device in devices:
            self._set_factor(coefficient.to(device) * inverse, device)

    def init_state(self, p: torch.Tensor, plan: Plan, state: dict[str, Any],
                   into: Mapping[str, torch.Tensor] | None = None) -> None:
        """Allocate missing fields by encoding the initial values (zeros; the param for 'param'
        and for the states the rule ``starts`` there),
        in the param's memory order (flashcompile.codecs.layout). ``into``: flat buffer views by state
        key; every such field ends up there (missing ones encoded in place, adopted or loaded
        ones copied in) and the state holds the view."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        for name in plan.key.rule.scalar_states:  # 0-d fp32 on the host, as torch.optim's
            state.setdefault(name, torch.tensor(0.0))
        if plan.shaped:  # one fp32 number per row or column, in the state as torch.optim's
            plan.init_factored(p, state)
        for name, codec in plan.codecs.items():
            for f in codec.fields:  # set before the first step (a pre-hook): adopt or refuse
                key = state_key(name, f)
                if key in plan.owned_fields and isinstance(state.get(key), torch.Tensor):
                    state[key] = layout.adopt_field(p, codec, f, key, state[key])
            missing = [f for f in codec.fields if state_key(name, f) in plan.owned_fields
                       and state_key(name, f) not in state]
            if not missing:
                continue
            out = None if into is None else [
                into.get(state_key(name, f)) if f in missing else None for f in codec.fields]
            if name == PARAM or plan.key.rule.starts.get(name) == "param":
                encoded = layout.encode_flat(codec, layout.flat(p.detach(), layout.memory_order(p)),
                                             out)
            else:
                encoded = layout.encode_zeros(codec, p.numel(), p.device, out)
            for f, t in zip(codec.fields, encoded):
                if f in missing:
                    state[state_key(name, f)] = t
        for key, view in (into or {}).items():
            if state[key] is not view:
                view.copy_(state[key])
                state[key] = view

    # ---- the step -------------------------------------------------------------------------------

    def check_can_step(self) -> None:
        """Raise if the optimizer cannot step now (a subclass's state: schedule-free AdamW in
        eval mode). Subclasses override this, not ``step``: torch wraps each class's ``step``
        with its hooks, and a ``step`` calling its parent's would run them twice."""

    @amp.scaled_step  # guards, then GradScaler's found_inf (skip) and grad_scale (unscale)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self.check_can_step()
        if self._gradient_release is not None:  # params were stepped inside backward
            return self._gradient_release.end_iteration(closure)
        if not self.state and distributed.initialising_state():
            return self._allocate_state()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.scales_gradients:
            self._prepare_factors()
        for index, group in enumerate(self.param_groups):
            flags = self.flags_of(group)
            scalars = ScalarCache(self.hyperparameters_of(group))
            stepped = [b for b in self._flat_buckets(index, group, flags)
                       if self._step_bucket(b, group, scalars)]
            if sum(len(b.params) for b in stepped) == len(group["params"]):
                continue  # the common case: every param in a bucket (checked without a loop)
            done = {id(p) for b in stepped for p in b.params}
            self._step_each([p for p in group["params"] if p.grad is not None and id(p) not in done],
                            flags, scalars)
        self.finish_shared()
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: Mapping[str, Any] | None = None) -> None:
        """Step one parameter now from its current ``.grad`` (what gradient release calls from
        each parameter's post-accumulate-grad hook). ``group``: its param group, if known."""
        group = self._group_of(p) if group is None else group
        if self.max_grad_norm is not None and self._gradient_release is not None:
            self._release_factor([p], p.device)
        self._step_one(p, self.flags_of(group), ScalarCache(self.hyperparameters_of(group)))

    def _step_bucket(self, bucket, group: Mapping[str, Any],
                     scalars: ScalarCache | None = None) -> bool:
        """Step a flat bucket of ``group``'s params in one launch; False if it cannot (nothing
        done: its params then step one by one). ``scalars``: the group's cache, if at hand."""
        scalars = scalars or ScalarCache(self.hyperparameters_of(group))
        numbers = self._shared.for_plan(self, bucket.plan, bucket.device)
        shared = bucket.stores_scalar_states  # one vector per scalar state: read one, store all
        held = (() if not bucket.plan.key.rule.scalar_states else [self.state[bucket.params[0]]]
                if shared
                else [self.state[p] for p in bucket.params])
        factor = self._factors.get(bucket.device) if self.scales_gradients else None
        if bucket.try_step(functools.partial(scalars, bucket.plan, states=held,
                                             advance=not shared), factor, numbers):
            return True
        bucket.uniform_steps = None  # re-checked when it next tries
        return False

    def _step_and_free(self, bucket, group: Mapping[str, Any]) -> None:
        """Gradient release: step the params of ``bucket`` that have a gradient (in one launch
        when all do) and free their gradients."""
        stepped = [p for p in bucket.params if p.grad is not None]
        if self.max_grad_norm is not None and stepped:
            self._release_factor(stepped, bucket.device)
        if len(stepped) < len(bucket.params) or not self._step_bucket(bucket, group):
            for p in stepped:
                self.step_param(p, group)
        for p in stepped:
            p.grad = None

    def _release_factor(self, params: Sequence[torch.Tensor], device: torch.device) -> None:
        """``max_grad_norm`` under gradient release: the factor that clips these params' gradients
        to their share of the norm (:func:`flashcompile.optim.clipping.bucket_coefficient`)."""
        every = [p for g in self.param_groups for p in g["params"]]
        if getattr(self, "_release_total", (None,))[0] != len(every):
            self._release_total = (len(every), sum(p.numel() for p in every))
        share = sum(p.numel() for p in params) / max(self._release_total[1], 1)
        self._set_factor(clipping.bucket_coefficient([p.grad for p in params],
                                                     self.max_grad_norm, share), device)

    def _allocate_state(self) -> None:
        """Allocate every param's state as a first step would find it, stepping nothing.

        For DCP's ``get_state_dict``/``set_state_dict`` on a fresh optimizer, which create state by
        stepping at lr 0 with zero gradients: that step would count (bias corrections, Rprop's step
        sizes and NAdam's momentum product would start one step late); this leaves a fresh state.
        """
        for group in self.param_groups:
            flags = self.flags_of(group)
            for p in group["params"]:
                if p.grad is not None:
                    local = to_local(p)
                    self.init_state(local, self.plan_for(local, flags), self.state[p])

    def _group_of(self, p: torch.Tensor) -> Mapping[str, Any]:
        for g in self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        raise KeyError(f"the parameter of shape {tuple(p.shape)} is not in this optimizer")

    def _step_one(self, p: torch.Tensor, flags, scalars: ScalarCache) -> None:
        """Step one param in one launch of its plan's ``step_one`` (per-tensor path)."""
        self._step_each([p], flags, scalars)

    def _step_each(self, params: Sequence[torch.Tensor], flags, scalars: ScalarCache) -> None:
        """Step each of ``params`` in its own launch (per-tensor path). Their step counts advance
        in one call, their scalar states in one call per set of values: per param, either cost
        about as much host time as the launch's own bookkeeping."""
        if not params:
            return
        first = to_local(params[0])
        numbers = self._shared.for_plan(self, self.plan_for(first, flags), first.device)
        if self._tensor_graphs.replay(params, flags, self.state, scalars):
            return
        ready = [self._per_tensor_ready(p, flags) for p in params]
        steps = [r.state["step"] for r in ready]
        torch._foreach_add_(steps, 1.0)
        # every count read in one call (one .item() per param cost 0.4 us on CPU)
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        values = [scalars(r.plan, int(n), (r.state,), defer=True) for r, n in zip(ready, counts)]
        for p, r, v in zip(params, ready, values):
            self._launch_one(p, r, v, scalars, numbers)
        scalars.advance_deferred()
        self._tensor_graphs.after_eager(params, ready, flags, values)

    def _per_tensor_ready(self, p: torch.Tensor, flags) -> PerTensor:
        """``p``'s per-tensor arguments, its state allocated (checked: its gradient fits)."""
        ready = self._per_tensor.get(id(p))
        # optimizer.state's change counter; None where a plain mapping replaced it
        changes = self.state.changes if getattr(self.state, "tracked", False) else None
        if ready is not None and ready.steps_again(p, (flags, self.compile), self.state.get(p),
                                                   changes):
            return ready  # as last step: same plan, storage and state (the common case)
        guards.check_grad(self, p, p.grad)
        state = self.state[p]
        local = p.to_local() if is_dtensor(p) else p  # FSDP2: this rank's shard
        plan = self.plan_for(local, flags)
        ready = self._per_tensor.get(id(p))
        if ready is None or not ready.holds(local, plan, state):
            self.init_state(local, plan, state)
            ready = self._per_tensor[id(p)] = PerTensor(local, plan, state)
        ready.key, ready.param_is_local = (flags, self.compile), local is p
        ready.changes_seen = changes.count if changes is not None else None
        return ready

    def _launch_one(self, p: torch.Tensor, ready: PerTensor, values: list[float],
                    scalars: ScalarCache, numbers=None) -> None:
        grad, plan, combine = p.grad, ready.plan, None
        if not ready.param_is_local:  # FSDP2: a view of its storage; grad likewise
            combine = distributed.shard_sums(p)  # norms over a sharded param: sum over ranks
            p, grad = p.to_local(), grad.to_local()
        factor = self._factors.get(ready.device) if self.scales_gradients else None
        if plan.shaped:  # the parameter in its own shape, its gradient likewise
            factored = [ready.stored[name] for name in plan.factored]
            plan.step_shaped(p, grad, scalars.tensor(values, GROUP, ready.device), ready.fields,
                             factored, ready.order, factor)
            if p.is_cuda and ready.param_is_local:  # for a CUDA graph of the per-tensor steps
                ready.launch = plan.bind_shaped(p, grad, ready.fields, factored, ready.order,
                                                factor)
            return
        # a view where autograd laid it like p (a contiguous one: one call, not three)
        grad = (grad.view(-1) if ready.order is None and grad.is_contiguous()
                else layout.flat(grad.detach(), ready.order))
        if plan.stages:
            if ready.matrices is None:
                ready.matrices = plan.matrices([p], p.device)
            plan.run(ready.weight, grad, ready.stored, values, combine, ready.matrices, factor)
        elif plan.reduces:
            plan.run(ready.weight, grad, ready.stored, values, combine, factor=factor)
        else:
            s = scalars.tensor(values, ready.tail, ready.device)
            if plan.traced.device:  # the gradient factor, shared numbers (most plans: none)
                ready.device_args = plan.device_args(factor, ready.device, numbers)
            if ready.launch is not None:
                ready.launch(s, grad, ready.weight, *ready.fields, *ready.device_args)
            else:
                plan.call_one(s, grad, ready.weight, ready.fields, factor, numbers)
                ready.launch = plan.bind_one(s, grad, ready.weight, ready.fields, factor, numbers)
        if ready.copies:  # a param with gaps in its storage: its values were copied out
            p.copy_(ready.weight.view(p.shape))

    def finish_shared(self) -> None:
        """Update the rules' shared numbers from this step's totals (every param has stepped):
        ``step()`` calls it, and gradient release at the end of the iteration."""
        self._shared.finish(self)

    def _flat_buckets(self, index: int, group: Mapping[str, Any], flags) -> list[Bucket]:
        """The group's buckets (one per dtype and device), built or rebuilt as needed.

        The common case (same params, flags and buffers as last step) costs one check per param.
        """
        cached = self._buckets_of_group.get(index)
        if (cached is not None and cached[0] is group["params"] and cached[1] == flags
                and cached[2] == len(group["params"])
                and all(b.state is self.state and b.intact() for b in cached[3])):
            return cached[3]
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            flat = self.flat if self.flat is not None else p.device.type == "cuda"
            # sparse and meta (no data) params take the per-tensor path, whose checks refuse them
            if flat and p.grad is not None and not p.grad.is_sparse and p.device.type != "meta":
                by_kind.setdefault((p.dtype, p.device, is_dtensor(p)), []).append(p)
        out = []
        for kind in by_kind:
            # params that never had a gradient stay out: torch.optim never steps them (in a
            # bucket they would take zero-gradient steps, and weight decay, every step)
            params = [p for p in group["params"] if p.grad is not None
                      and (p.dtype, p.device, is_dtensor(p)) == kind]
            plan = self.plan_for(params[0], flags)
            if not plan.steps_flat:
                # padding lanes would need masks (or would add to a reduction): only params that
                # fill whole groups (no padding lanes) may share a launch
                params = [p for p in params if not kind[2] and plan.steps_flat_over([p.numel()])]
                if not params:
                    continue
            key = (index, *kind)
            bucket = self._buckets.get(key)
            if (bucket is None or bucket.plan is not plan or bucket.params != params
                    or bucket.state is not self.state or not bucket.intact()):
                # FSDP2 shards keep their weights where FSDP2 all-gathers them from: a shard bucket
                # stages them; a Bucket would re-point p.data
                make = ShardBucket if kind[2] else Bucket
                bucket = self._buckets[key] = make(params, plan, self.state, self.init_state,
                                                   keep_grads=self.grad_views)
            out.append(bucket)
        self._buckets_of_group[index] = (group["params"], flags, len(group["params"]), out)
        return out

    def _release_flat_grads(self) -> None:
        """Drop the flat gradient buffers (params keep their grads only while they are views into
        them): gradient release frees each grad right after its step, so no buffer may hold them."""
        for bucket in self._buckets.values():
            for p in bucket.params:
                if p.grad is not None and to_local(p.grad).data_ptr() in bucket._grad_ptrs:
                    p.grad = None
        self._buckets.clear()
        self._buckets_of_group.clear()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's params, one norm and one
        multiply per flat bucket (:mod:`flashcompile.optim.clipping`); returns the total norm."""
        return clipping.clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, except that params in flat buffers keep their gradients in the buffer,
        zeroed in one memset: autograd then accumulates straight into it (with ``grad_views =
        False``, flat params' grads are set to None as any other's). With ``set_to_none`` the next
        step still skips, and sets to None, the gradients no backward accumulated into (each has
        its own version counter), as torch.optim skips None gradients; an in-place write from
        outside (torch's ``clip_grad_norm_`` multiplying every gradient) counts as reaching it."""
        buckets = tuple(b for b in self._buckets.values() if b.keep_grads)
        if getattr(self, "_flat_ids", (None,))[0] != buckets:  # rebuilt only with the buckets
            self._flat_ids = (buckets, {id(p) for b in buckets for p in b.params})
        flat = self._flat_ids[1]
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in flat or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()
        for bucket in self._buckets.values():
            bucket.zero_grad(set_to_none)


def _drop_duplicates(group: dict[str, Any]) -> None:
    """Keep the first of a param listed twice in one group (torch.optim warns and, per tensor,
    steps it twice; a flat bucket would step it once): each param steps once per step."""
    params, seen, keep = group["params"], set(), []
    for i, p in enumerate(params):
        if id(p) not in seen:
            seen.add(id(p))
            keep.append(i)
    if len(keep) != len(params):
        group["params"] = [params[i] for i in keep]
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in keep]
