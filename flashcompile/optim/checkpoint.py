"""Checkpoints of a flashcompile optimizer: compact state dicts, and torch.optim's format.

``state_dict()`` holds the stored fields as they are (int8 codes, fp16 scales, the int8 residual;
DTensor params' state in :mod:`flashcompile.runtime.distributed`'s layout, which DCP reshards).
``load_state_dict`` accepts that, or a torch.optim state dict of the same optimizer (encoded with
this optimizer's codecs), and checks every tensor before anything changes. Each saved param group
also records its params' shapes (``param_shapes``) and, per param dtype, the codecs that encoded
their states (``codecs``): fields of two codecs or two shapes can agree in dtype and size.

Copies (``copy.deepcopy``, ``pickle``, ``torch.save(opt)``) keep what a step needs (the rule by
reference, codecs, options, states); flat buffers and plans are rebuilt at the copy's next step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from flashcompile.codecs import PARAM, layout
from flashcompile.codecs import get as codec_named
from flashcompile.compiler.plan import Plan, state_key
from flashcompile.optim.hyperparameters import IMPLEMENTATION_FLAGS
from flashcompile.optim.shared import SharedByRule
from flashcompile.runtime import distributed, interop
from flashcompile.runtime.distributed import is_dtensor
from flashcompile.runtime.state import OptimizerState, ParamState
from flashcompile.runtime.tensor_graph import TensorGraphs

# rebuilt from the state at the next step; a copy of a released optimizer is not released
_TRANSIENT = ("_buckets", "_buckets_of_group", "_plans", "_gradient_release", "_grad_unscale",
              "_per_tensor", "_flat_ids", "_tensor_graphs", "_factors", "last_grad_norm",
              "_release_total", "_shared")
SAVED_METADATA = ("param_shapes", "codecs")  # per saved group, checked on load and not loaded


def codec_names(plan: Plan) -> str:
    """The identity of a plan's storage: ``param=weight_split(bf16+int8) exp_avg=softsign_int8``."""
    return " ".join(f"{name}={codec.name}" for name, codec in plan.codecs.items())


def _merged(recorded: str | None, names: str) -> str:
    """Two :func:`codec_names` strings as one, each state once (the master weight first)."""
    if recorded is None or recorded == names:
        return names
    items = dict(item.split("=", 1) for item in recorded.split())
    items.update(item.split("=", 1) for item in names.split())
    return " ".join(f"{k}={v}" for k, v in items.items())


class Checkpoints:
    """``state_dict``, ``load_state_dict`` and ``torch_state_dict`` for
    :class:`flashcompile.Optimizer` (a mixin: it uses the optimizer's plans, flags and state)."""

    fixed_hyperparameters: ClassVar[Mapping[str, Any]] = {}  # what the class forces (AdamW: decoupled)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim's keeps defaults, state and param_groups only (hooks are not copied, as in
        # torch); the rule, codecs and options must travel too or the copy cannot step
        return {k: v for k, v in self.__dict__.items()
                if k not in _TRANSIENT and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not isinstance(self.state, OptimizerState):  # a mapping set from outside (torch's)
            self.state = OptimizerState({p: st if isinstance(st, ParamState) else ParamState(st)
                                         for p, st in self.state.items()})
        self.__dict__.setdefault("_buckets", {})
        self.__dict__.setdefault("_buckets_of_group", {})
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_per_tensor", {})
        self.__dict__.setdefault("_tensor_graphs", TensorGraphs())
        self.__dict__.setdefault("_gradient_release", None)
        self.__dict__.setdefault("_grad_unscale", None)
        self.__dict__.setdefault("_factors", {})
        self.__dict__.setdefault("_shared", SharedByRule())
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("max_grad_norm", None)

    def state_dict(self) -> dict[str, Any]:
        """As torch.optim's, plus each group's ``param_shapes`` and ``codecs``. A DTensor param's
        state is in the checkpoint layout of :mod:`flashcompile.runtime.distributed` (DTensors that DCP
        reshards); others stay flat."""
        sd = super().state_dict()
        for group, saved in zip(self.param_groups, sd["param_groups"]):
            saved["param_shapes"] = [list(p.shape) for p in group["params"]]
            codecs = saved["codecs"] = {}
            # where torch's fused and capturable optimizers keep it; ours stays on the host, where
            # the kernel's scalars are computed, and loads back there
            step_on_device = bool(group.get("fused") or group.get("capturable"))
            # torch.optim's ids: in group order, a param listed again keeps its first id
            for p, pid in zip(group["params"], saved["params"]):
                if pid in sd["state"]:
                    plan = self.plan_for(p, self.flags_of(group))
                    # params of one dtype whose plans store different states (Adafactor's
                    # matrices and vectors) record every state's codec
                    codecs[str(p.dtype)] = _merged(codecs.get(str(p.dtype)), codec_names(plan))
                    if is_dtensor(p):
                        sd["state"][pid] = distributed.export_state(p, plan, self.state[p])
                        continue
                    # a copy (weights_only loads plain dicts; the live state stays untouched)
                    entry = sd["state"][pid] = dict(sd["state"][pid])
                    if step_on_device and isinstance(entry.get("step"), torch.Tensor):
                        entry["step"] = entry["step"].to(p.device)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or a torch.optim one of the same optimizer (its fp32
        states are encoded with this optimizer's codecs).

        Stored fields keep their own dtypes (int8 codes, fp16 scales); nothing is cast to the param's
        dtype. A state dict that does not fit raises before anything changes.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        id_map, new_groups = {}, []
        for i, (g, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param group {i}: state dict has {len(saved['params'])} params, optimizer "
                    f"has {len(g['params'])}"
                )
            # torch.optim's groups lack flags it does not have (SGD's decoupled_weight_decay),
            # older ones torch's implementation flags: keep ours. A missing float hyperparameter
            # means another optimizer's state dict. The class's fixed flags win (AdamW stays
            # AdamW with an Adam state dict, as torch's AdamW.__setstate__ forces).
            rule = self.rule_of(g)
            if saved.get("rule") != g.get("rule"):
                raise ValueError(
                    f"param group {i} of the state dict was stepped by rule "
                    f"{saved.get('rule') or 'of its optimizer'}, this one by {rule.name}: it was "
                    "saved by a different optimizer")
            kept = {k: g[k] for k in (*rule.flags, *IMPLEMENTATION_FLAGS, "param_names")
                    if k not in saved and k in g}
            fixed = self.fixed_hyperparameters if rule is self.rule else {}
            saved = {**kept, **saved, **fixed}
            missing = sorted(set(rule.defaults) - set(saved))
            if missing:
                raise ValueError(
                    f"param group {i} of the state dict lacks {rule.name}'s hyperparameters "
                    f"{missing}: it was saved by a different optimizer"
                )
            new = {k: v for k, v in saved.items() if k not in SAVED_METADATA}
            new["params"] = g["params"]
            self.hyperparameters_of(new)
            new_groups.append(new)
            id_map.update(zip(saved["params"], g["params"]))
        where = {pid: (i, j) for i, saved in enumerate(saved_groups)
                 for j, pid in enumerate(saved["params"])}
        new_state = OptimizerState()
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state dict has state for param id {pid}, which no group lists")
            p, (i, j) = id_map[pid], where[pid]
            plan = self.plan_for(p, self.flags_of(new_groups[i]))
            _check_step(saved.get("step"), pid)
            saved = _without_unstored(plan, saved)
            # a group that records its codecs was saved here (torch_state_dict drops them): its
            # states are ours even where they read as torch.optim's (an Adafactor matrix's row_var
            # and col_var with its weight's residual missing)
            encoded = bool(saved_groups[i].get("codecs")) or not interop.is_torch_format(
                plan.key.rule.states, saved, p)
            recorded = (saved_groups[i].get("codecs") or {}).get(str(p.dtype)) if encoded else None
            recorded = recorded and _without_unstored_codecs(plan, recorded)
            reencoded = None
            if recorded is not None and recorded != codec_names(plan) and not is_dtensor(p):
                # saved with other state codecs (an older default): re-encode them
                reencoded = _reencoded(p, plan, saved, recorded, pid)
            converted = reencoded is not None
            saved = reencoded if converted else saved
            # names another optimizer where one saved it
            checked = self._check_saved_state(p, plan, saved, pid, encoded)
            _check_identity(p, plan, saved_groups[i], j, pid, encoded and not converted)
            new_state[p] = ParamState(checked)
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._buckets.clear()  # rebuilt from the loaded tensors at the next step
        self._buckets_of_group.clear()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def torch_state_dict(self) -> dict[str, Any]:
        """This optimizer's state in torch.optim's format (fp32 states shaped like their params),
        loadable by the torch.optim optimizer of the same name."""
        return interop.torch_state_dict(self)

    def _check_saved_state(self, p, plan: Plan, saved: Mapping[str, Any], pid,
                           encoded: bool = True) -> dict[str, Any]:
        expected = dict(plan.owned_fields)
        rule = plan.key.rule
        if is_dtensor(p):
            return distributed.import_state(p, plan, saved, pid, rule.states)
        if not encoded:
            return interop.import_state(p, plan, saved, pid)
        if distributed.is_checkpoint_layout(p, plan, saved):  # e.g. a converted DCP checkpoint
            return distributed.import_state(p, plan, saved, pid, rule.states)
        host = {"step", *rule.scalar_states}
        factored = set(plan.factored)  # fp32 in their own shape (Adafactor's)
        # A scalar state may be missing (saved before the rule had it, as Adam's bound_sq): it
        # loads as 0, which such a state must read as "history unknown" after step 1.
        required = set(expected) | {"step"} | factored
        if not required <= set(saved) <= required | host:
            raise ValueError(
                f"state of param {pid} ({tuple(p.shape)}) has keys {sorted(saved)}, but "
                f"{rule.name} with these codecs stores {sorted(required | host)}: it was "
                "saved by a different optimizer or with different codecs"
            )
        groups = layout.group_count(p.numel())
        out = {k: torch.as_tensor(saved[k], dtype=torch.float32).detach().clone().cpu()
               for k in host if k in saved}
        for name in factored:
            out[name] = interop.factored_state(p, plan, name, saved[name], pid)
        for key, f in expected.items():
            t = saved[key]
            numel = groups * f.width
            if t.dtype != f.dtype or t.numel() != numel:
                raise ValueError(
                    f"state {key!r} of param {pid} is {t.dtype} x {t.numel()}, expected {f.dtype} x "
                    f"{numel} for a param of shape {tuple(p.shape)}: wrong optimizer, codecs or shapes"
                )
            out[key] = t.detach().to(device=p.device, copy=True).reshape(-1)
        return out


def _check_identity(p: torch.Tensor, plan: Plan, group: Mapping[str, Any], index: int, pid,
                    encoded: bool) -> None:
    """The saved param's shape and (``encoded``: a state not in torch.optim's format) codecs, where
    the state dict records them (torch.optim's and older ones carry neither)."""
    shapes = group.get("param_shapes")
    recorded = shapes is not None and len(shapes) == len(group["params"])
    if recorded and tuple(shapes[index]) != tuple(p.shape):
        raise ValueError(
            f"state of param {pid} was saved for a param of shape {tuple(shapes[index])}, but "
            f"this optimizer's param {index} of its group has shape {tuple(p.shape)}: the "
            "state dict belongs to other parameters")
    codecs = group.get("codecs") if encoded else None
    if codecs and str(p.dtype) not in codecs:
        raise ValueError(
            f"state of param {pid} ({tuple(p.shape)}) was saved for {sorted(codecs)} params, this "
            f"one is {p.dtype}: cast the model as it was when saved")
    if codecs and _without_unstored_codecs(plan, codecs[str(p.dtype)]) != codec_names(plan):
        raise _other_codecs(p, plan, codecs[str(p.dtype)], pid)


def _other_codecs(p: torch.Tensor, plan: Plan, recorded: str, pid) -> ValueError:
    return ValueError(
        f"state of param {pid} ({tuple(p.shape)}) was saved with codecs {recorded}; this "
        f"optimizer stores {codec_names(plan)}. Build it with the codecs it was saved with, or "
        "load the saver's torch_state_dict() to re-encode")


def _unstored(plan: Plan) -> set[str]:
    """The rule's per-element states this plan keeps no storage for: never read under its flags
    (SGD's momentum buffer at momentum 0, Adam's max_exp_avg_sq without amsgrad)."""
    rule = plan.key.rule
    return {n for n in rule.states if n not in plan.codecs and n not in rule.scalar_states
            and n not in plan.factored}


def _without_unstored(plan: Plan, saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` without the fields of :func:`_unstored` states: a state dict saved while such a
    state had storage (a momentum buffer at momentum 0, stored before zero_branches; torch.optim's
    ``momentum_buffer: None``) loads, losing nothing the step reads."""
    dead = _unstored(plan)
    return {k: v for k, v in saved.items() if k.split(".", 1)[0] not in dead}


def _without_unstored_codecs(plan: Plan, recorded: str) -> str:
    """A recorded :func:`codec_names` string without the :func:`_unstored` states."""
    dead = _unstored(plan)
    return " ".join(item for item in recorded.split() if item.split("=", 1)[0] not in dead)


def _reencoded(p: torch.Tensor, plan: Plan, saved: Mapping[str, Any], recorded: str,
               pid) -> dict[str, Any] | None:
    """``saved``'s state fields decoded with the codecs it records (``recorded``, as
    :func:`codec_names` writes it) and encoded with ``plan``'s: a checkpoint of an earlier default
    (Rprop's ``prev`` was ``softsign_int8`` before ``sign_int8``) loads into today's optimizer.
    The master weight's codec must match (its fields belong to the saved model), and every saved
    codec must be a registered name. None where the states differ (another optimizer, or another
    flag setting's states): the usual checks then say what differs. A state re-encoded into
    fewer bytes than it was saved in (an 8-bit checkpoint into 4-bit states) warns: precision is
    lost on load, not in training."""
    then = dict(item.split("=", 1) for item in recorded.split())
    now = {name: codec.name for name, codec in plan.codecs.items()}
    refuse = _other_codecs(p, plan, recorded, pid)
    if set(then) != set(now):
        return None
    if then[PARAM] != now[PARAM]:
        raise refuse
    groups = layout.group_count(p.numel())
    out = dict(saved)
    for name, codec in plan.codecs.items():
        if then[name] == codec.name:
            continue
        try:
            old = codec_named(then[name])
        except ValueError:
            raise refuse from None
        fields = []
        for f in old.fields:
            t = saved.get(state_key(name, f))
            lanes = f.width
            if not isinstance(t, torch.Tensor) or t.dtype != f.dtype or t.numel() != groups * lanes:
                raise refuse
            fields.append(t.detach().to(p.device).reshape(groups, lanes))
            del out[state_key(name, f)]
        if codec.bytes_per_value < old.bytes_per_value:
            warnings.warn(
                f"state {name!r} was saved as {old.name} ({old.bytes_per_value:g} B/value) and "
                f"loads into {codec.name} ({codec.bytes_per_value:g} B/value): each value is "
                "re-encoded within the coarser codec's error bound", stacklevel=4)
        for f, t in zip(codec.fields, codec.encode(old.decode(*fields))):
            out[state_key(name, f)] = t.reshape(-1)
    return out


def _check_step(step, pid) -> None:
    if step is None:
        return
    value = float(torch.as_tensor(step, dtype=torch.float64))
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError(f"state of param {pid} has step {value}; a step count must be a whole "
                         "number >= 0 (the steps taken)")
