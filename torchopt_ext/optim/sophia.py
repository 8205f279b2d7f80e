"""SophiaH and SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic
Second-order Optimizer for Language Model Pre-training"); classic.md §12."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from .. import hessian as _hessian
from ._base import FusedOptimizer, check_betas, check_lr, check_non_negative, check_state_dtype, local

_EPS_MODES = ("max", "add")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: must be an integer >= 1, got {value!r}")


class _Sophia(FusedOptimizer):
    """Shared step, state and Hessian refresh of SophiaH and SophiaG.

    State per param: ``step``, ``exp_avg`` (m) and ``hessian`` (h, zeros,
    never bias-corrected). ``step()`` runs no autograd:
    ``t += 1; p *= 1 - lr*wd; m = b1*m + (1-b1)*g; p -= lr * clip(m / denom, -1, 1)``
    with ``denom = max(gamma*h, eps)`` (``eps_mode="max"``, paper/optax) or
    ``gamma*h + eps`` (``eps_mode="add"``, the official SophiaG code).

    Without any Hessian estimate h stays 0 and the step is
    ``lr * sign(m)`` (elements with ``|m| < eps`` move by ``lr * m / eps``):
    a clipped (sign) momentum step.
    """

    _op = "sophia_step_"
    _device_steps = True
    _state_keys = ("exp_avg", "hessian")
    _gamma_key = "gamma"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], seed: Optional[int]) -> None:
        if seed is None:
            # From torch's default generator, so torch.manual_seed makes runs repeatable.
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        defaults["seed"] = int(seed)
        super().__init__(params, defaults)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        self._hessian_calls = 0

    # -- options ----------------------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_non_negative(f"{self._gamma_key} value", group[self._gamma_key])
        if not group["eps"] > 0.0:
            raise ValueError(f"Invalid epsilon value (eps): must be > 0, got {group['eps']}")
        if group["eps_mode"] not in _EPS_MODES:
            raise ValueError(f'Invalid eps_mode: must be "max" or "add", got {group["eps_mode"]!r}')
        check_non_negative("weight_decay value", group["weight_decay"])
        _check_positive_int("update_period", group["update_period"])
        check_state_dtype(group["state_dtype"])

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            beta1=group["betas"][0],
            gamma=group[self._gamma_key],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            eps_mode=group["eps_mode"],
            maximize=group["maximize"],
        )

    # -- Hessian refresh ----------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """The generator of the probes / sampled labels (seeded by ``seed``)."""
        return self._generator

    def _estimate(self, output: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The Hessian-diagonal estimate from the closure's output: an abstract
        hook, defined by SophiaH (Hutchinson) and SophiaG (Gauss-Newton-Bartlett)."""
        raise NotImplementedError(f"{type(self).__name__} must define _estimate (use SophiaH or SophiaG)")

    def _hessian_state(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        # update_hessian may run before the first step: create the whole state.
        state = self.state[p]
        if "step" not in state:
            state["step"] = self._new_step(p)
        for key in self._state_keys:
            if key not in state:
                state[key] = self._new_state(p, group, key)
        return local(state["hessian"])

    @torch.no_grad()
    def _apply_estimates(self, pairs: Sequence[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]) -> None:
        by_group: dict[int, tuple[dict[str, Any], list, list]] = {}
        for group, p, estimate in pairs:
            entry = by_group.setdefault(id(group), (group, [], []))
            entry[1].append(self._hessian_state(p, group))
            entry[2].append(local(estimate.detach()))
        for group, hessians, estimates in by_group.values():
            torch.ops.torchopt_ext.sophia_update_hessian_(hessians, estimates, beta2=group["betas"][1])

    def update_hessian(
        self,
        closure: Optional[Callable[[], Any]] = None,
        *,
        hessian: Union[Sequence[Optional[torch.Tensor]], Mapping[torch.Tensor, torch.Tensor], None] = None,
    ) -> Any:
        """Refreshes the Hessian EMA ``h = b2*h + (1-b2)*hhat``.

        ``update_hessian(closure)``: call once per training iteration. Calls
        are counted; on calls 0, k, 2k, ... (k = a group's ``update_period``)
        the closure is evaluated with autograd on and the estimator runs on
        the params of the groups that are due (see the subclass); other calls
        return None without evaluating it. Returns the closure's output when
        it ran.

        ``update_hessian(hessian=estimates)``: applies an explicit estimate now
        (no counting): a list with one entry per param over all groups in
        order (None skips a param), or a dict param -> estimate.
        """
        if (closure is None) == (hessian is None):
            raise ValueError("update_hessian: pass exactly one of closure or hessian")
        if hessian is not None:
            self._apply_estimates(self._explicit_pairs(hessian))
            return None
        call = self._hessian_calls
        self._hessian_calls += 1
        due = [g for g in self.param_groups if call % g["update_period"] == 0]
        if not due:
            return None
        pairs = [(g, p) for g in due for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            output = closure()
        if not pairs:  # no param of a due group requires grad: nothing to estimate
            return output
        estimates = self._estimate(output, [p for _, p in pairs])
        self._apply_estimates([(g, p, e) for (g, p), e in zip(pairs, estimates)])
        return output

    def _explicit_pairs(self, hessian: Any) -> list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]:
        flat = [(g, p) for g in self.param_groups for p in g["params"]]
        if isinstance(hessian, Mapping):
            group_of = {p: g for g, p in flat}
            pairs = []
            for p, e in hessian.items():
                if p not in group_of:
                    raise ValueError("update_hessian: a key of the hessian dict is not a param of this optimizer")
                pairs.append((group_of[p], p, e))
            return pairs
        hessian = list(hessian)
        if len(hessian) != len(flat):
            raise ValueError(
                f"update_hessian: hessian has {len(hessian)} entries but the optimizer has {len(flat)} params"
            )
        return [(g, p, e) for (g, p), e in zip(flat, hessian) if e is not None]

    # -- checkpoints --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # The refresh schedule and the probe stream resume where they were.
        sd["hessian_calls"] = self._hessian_calls
        sd["generator_state"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "hessian_calls" in state_dict:
            self._hessian_calls = int(state_dict["hessian_calls"])
        if "generator_state" in state_dict:
            self._generator.set_state(state_dict["generator_state"].to(device="cpu", dtype=torch.uint8))


class SophiaH(_Sophia):
    """Sophia with Hutchinson's Hessian estimate.

    ``opt.update_hessian(closure)`` with a closure returning a scalar loss
    (built with autograd on) refreshes h every ``update_period`` calls from
    ``z * (H z)``, averaged over ``n_samples`` probes z (``distribution``
    "rademacher" or "gaussian") drawn from the optimizer's generator, which
    ``seed`` seeds (None: drawn from torch's default generator). The closure
    may compute the training loss, whose ``.backward()`` the caller then runs
    separately (the estimator uses ``autograd.grad`` and does not touch
    ``.grad``). One estimate covers every due group, so ``n_samples`` and
    ``distribution`` are read from the first param group.

    Defaults follow optax's / levanter's Sophia-H (gamma=0.01, eps=1e-12,
    clip at 1, eps_mode "max") with the package's weight_decay=0.1
    (decoupled: ``p *= 1 - lr*wd``). ``state_dtype`` and
    ``stochastic_rounding`` as in :class:`torchopt_ext.optim.Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        weight_decay: float = 0.1,
        *,
        eps: float = 1e-12,
        eps_mode: str = "max",
        update_period: int = 10,
        n_samples: int = 1,
        distribution: str = "rademacher",
        maximize: bool = False,
        seed: Optional[int] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            gamma=gamma,
            weight_decay=weight_decay,
            eps=eps,
            eps_mode=eps_mode,
            update_period=update_period,
            n_samples=n_samples,
            distribution=distribution,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _check_positive_int("n_samples", group["n_samples"])
        if group["distribution"] not in ("rademacher", "gaussian"):
            raise ValueError(f'Invalid distribution: must be "rademacher" or "gaussian", got {group["distribution"]!r}')

    def _estimate(self, output: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
        first = self.param_groups[0]
        return _hessian.hutchinson(
            output,
            params,
            generator=self._generator,
            n_samples=first["n_samples"],
            distribution=first["distribution"],
        )


class SophiaG(_Sophia):
    """Sophia with the Gauss-Newton-Bartlett estimate; drop-in for the
    official ``SophiaG`` (same argument names and defaults).

    ``opt.update_hessian(closure)`` with a closure returning logits
    (..., C) built with autograd on refreshes h every ``update_period`` calls
    from ``B * g * g``: g the gradient of the mean cross-entropy against
    labels sampled from softmax(logits) with the optimizer's generator
    (seeded by ``seed``), B = logits.numel() / C the token count.

    Mapping to the official code: it keeps ``h_off = EMA(g*g)`` and steps with
    ``rho * bs * h_off + 1e-15``; here B sits inside the estimate, so the same
    ``rho`` with B = bs gives the same denominator (``eps_mode="add"``,
    ``eps=1e-15`` by default). ``update_hessian(hessian=...)`` takes estimates
    already scaled by B.
    """

    _gamma_key = "rho"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        maximize: bool = False,
        eps: float = 1e-15,
        eps_mode: str = "add",
        update_period: int = 10,
        seed: Optional[int] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            rho=rho,
            weight_decay=weight_decay,
            eps=eps,
            eps_mode=eps_mode,
            update_period=update_period,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
        )
        super().__init__(params, defaults, seed)

    def _estimate(self, output: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return _hessian.gauss_newton_bartlett(output, params, generator=self._generator)
