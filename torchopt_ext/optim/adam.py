"""Adam (coupled L2 weight decay by default) on the fused torchopt_ext kernel."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_lr,
    check_non_negative,
    check_range,
    check_state_dtype,
    draw_seed,
    local,
)


class Adam(FusedOptimizer):
    """Drop-in for ``torch.optim.Adam`` (same argument names and defaults).

    Extra arguments: ``state_dtype`` (storage dtype of the moments; default the
    param's dtype, math is always fp32 or wider), ``stochastic_rounding`` (bf16
    params are rounded stochastically after each update) and ``seed`` (its
    random stream; default drawn from torch's generator). Weight decay is
    coupled (added to the gradient) unless ``decoupled_weight_decay=True``.
    """

    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _name = "Adam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed) if stochastic_rounding else (seed or 0),
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("epsilon value (eps)", group["eps"])
        if len(group["betas"]) != 2:
            raise ValueError(f"Invalid betas: expected two values, got {group['betas']}")
        check_range("beta parameter at index 0 (betas[0])", group["betas"][0], 0.0, 1.0)
        check_range("beta parameter at index 1 (betas[1])", group["betas"][1], 0.0, 1.0)
        check_non_negative("weight_decay value", group["weight_decay"])
        check_state_dtype(group["state_dtype"])

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = self._grad_of(p, self._name)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step()
                state["exp_avg"] = self._new_state_tensor(p, group)
                state["exp_avg_sq"] = self._new_state_tensor(p, group)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = self._new_state_tensor(p, group)
            params.append(local(p))
            grads.append(local(grad))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            if group["amsgrad"]:
                if "max_exp_avg_sq" not in state:
                    raise RuntimeError(f"{self._name}: amsgrad was turned on after the first step")
                max_exp_avg_sqs.append(local(state["max_exp_avg_sq"]))
            state_steps.append(state["step"])

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return group["decoupled_weight_decay"]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_kwargs()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            torch.ops.torchopt_ext.adam_step_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                self._lr_tensor(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled_weight_decay=self._decoupled(group),
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                stochastic_rounding=group["stochastic_rounding"],
                seed=group["seed"],
                **amp,
            )
        return loss
