"""RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate")."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_adam_like, draw_seed, torch_switches


class RAdam(FusedOptimizer):
    """Drop-in for ``torch.optim.RAdam`` (same argument names and defaults):
    un-adapted, bias-corrected momentum steps while the rectification term is
    undefined (rho_t <= 5, the first 5 steps with beta2=0.999), rectified Adam
    after. Coupled weight decay unless ``decoupled_weight_decay=True``."""

    _op = "radam_step_"
    _device_steps = True
    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        defaults.update(
            torch_switches(type(self).__name__, foreach=foreach, capturable=capturable, differentiable=differentiable)
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_like(group)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )
