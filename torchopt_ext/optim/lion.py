"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_betas, check_lr, check_non_negative, check_state_dtype, draw_seed


class Lion(FusedOptimizer):
    """Drop-in for ``lion_pytorch.Lion`` (same argument names and defaults):
    ``p *= 1 - lr*wd; p -= lr * sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g``.

    ``decoupled_weight_decay=True`` divides weight_decay by the constructor's
    lr, as lion-pytorch does, so the decay per step follows the schedule's
    lr / initial-lr ratio. Extra arguments ``maximize``, ``state_dtype``,
    ``stochastic_rounding`` and ``seed`` as in :class:`torchopt_ext.optim.Adam`.
    """

    _op = "lion_step_"
    _device_steps = True
    _state_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            decay_reference_lr=float(lr),
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"], high_inclusive=True)
        check_non_negative("weight_decay value", group["weight_decay"])
        if group["decoupled_weight_decay"] and not group["decay_reference_lr"] > 0:
            raise ValueError("Invalid lr: decoupled_weight_decay divides by the initial lr, which must be > 0")
        check_state_dtype(group["state_dtype"])

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if group["decoupled_weight_decay"]:
            weight_decay = weight_decay / group["decay_reference_lr"]
        return dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=group["maximize"])
