"""The one plan check: every plan, built-in or plugin, passes it before anything consumes it.

``validate_plan(router, batch, plan)`` is what every command calls on every plan it receives
(``route``, ``run``, ``simulate``, ``ep``, ``quality``): a broken plan is one :class:`PlanError`
naming the router, the field and the bad value, never wrong metrics. It checks

- that the router returned a :class:`Plan` at all;
- sizes: ``num_tokens`` is the batch's T, ``num_experts`` the router's E, ``top_k`` a number in
  (0, E] (the mean choices per token);
- ``capacity``: an integer >= 1, or None (dropless);
- ids: ``token_R`` in [0, T), ``expert_R`` in [0, E);
- weights: ``weight_R`` floating point, finite and >= 0; ``aux_loss`` and ``z_loss`` (where the
  router defines them) finite scalars; floating-point ``extras`` finite.

The array checks are reductions read back in one transfer, so a GPU waits once per plan.
Shape letters: T tokens, E experts, R requested assignments.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .contract import Batch, Plan, Router, RoutingError


class PlanError(RoutingError):
    """A router returned a plan that breaks the routing contract; the message names the router,
    the field and the bad value."""


def validate_plan(router: Router, batch: Batch, plan: object, label: str | None = None) -> Plan:
    """Check ``plan``, which ``router`` returned for ``batch``; returns it, or raises PlanError.

    label: how the router is named in the message (a spec label such as ``topk[top_k=4]``);
    default: its registered name.
    """
    name = label or getattr(router, "name", "") or type(router).__name__

    def fail(field: str, value: object, rule: str) -> PlanError:
        return PlanError(f"router {name!r} returned a plan with {field} = {value} ({rule})")

    if not isinstance(plan, Plan):
        raise PlanError(f"router {name!r} returned {type(plan).__name__}, not a Plan")
    t, e = batch.num_tokens, router.config.num_experts
    if plan.num_tokens != t:
        raise fail("num_tokens", plan.num_tokens, f"the batch has T = {t} tokens")
    if plan.num_experts != e:
        raise fail("num_experts", plan.num_experts, f"the router has E = {e} experts")
    cap = plan.capacity
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise fail("capacity", cap, "must be an integer >= 1, or None for dropless")
    k = plan.top_k
    if isinstance(k, bool) or not isinstance(k, Real) or not (math.isfinite(k) and 0 < k <= e):
        raise fail("top_k", k, f"must be a number in (0, E = {e}]")
    if not plan.weight_R.is_floating_point():
        raise fail("weight_R.dtype", plan.weight_R.dtype, "gate weights must be floating point")
    _check_arrays(plan, t, e, fail)
    for field in ("aux_loss", "z_loss"):
        value = getattr(plan, field)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise fail(field, _describe(value), "must be a scalar tensor or None")
        if not math.isfinite(float(value.detach())):
            raise fail(field, float(value.detach()), "must be finite")
    for key, value in plan.extras.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            bad = ~torch.isfinite(value.detach())
            if bool(bad.any()):
                raise fail(f"extras[{key!r}]", value.detach()[bad][0].item(), "must be finite")
    return plan


def _check_arrays(plan: Plan, t: int, e: int, fail) -> None:
    """Ids in range, weights finite and non-negative: one transfer of six numbers on the good path."""
    if plan.num_requests == 0:
        return
    token_R, expert_R, weight_R = plan.token_R, plan.expert_R, plan.weight_R.detach()
    finite_R = torch.isfinite(weight_R)
    stats = torch.stack(
        [
            token_R.min().double(),
            token_R.max().double(),
            expert_R.min().double(),
            expert_R.max().double(),
            (~finite_R).sum().double(),
            torch.where(finite_R, weight_R, 0.0).min().double(),
        ]
    ).tolist()
    t_lo, t_hi, e_lo, e_hi, n_bad, w_lo = stats
    if t_lo < 0 or t_hi >= t:
        raise fail("token_R", f"{int(t_lo if t_lo < 0 else t_hi)}", f"ids must lie in [0, T = {t})")
    if e_lo < 0 or e_hi >= e:
        raise fail("expert_R", f"{int(e_lo if e_lo < 0 else e_hi)}", f"ids must lie in [0, E = {e})")
    if n_bad:
        first = weight_R[~finite_R][0].item()
        raise fail("weight_R", first, f"{int(n_bad)} of {plan.num_requests} gate weights are not finite")
    if w_lo < 0:
        raise fail("weight_R", f"{w_lo:g}", "gate weights must be >= 0")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)}"
    return type(x).__name__
