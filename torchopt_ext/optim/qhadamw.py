"""QHAdamW: quasi-hyperbolic Adam (Ma & Yarats 2019) with decoupled weight decay."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_adam_like, check_range, draw_seed


class QHAdamW(FusedOptimizer):
    """Drop-in for ``qhoptim.pyt.QHAdamW`` (same argument names and defaults;
    the paper recommends ``nus=(0.7, 1.0), betas=(0.995, 0.999)``). The update
    mixes the (bias-corrected) moments with the current gradient:
    ``p -= lr * (nu1*m + (1-nu1)*g) / (sqrt(nu2*v + (1-nu2)*g^2) + eps)``.
    With ``nus=(1, 1)`` it is AdamW. Unlike qhoptim, ``p.grad`` is never
    modified, and ``maximize`` is available."""

    _op = "qhadam_step_"
    _device_steps = True
    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        nus: tuple[float, float] = (1.0, 1.0),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        *,
        maximize: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            nus=tuple(nus),
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_like(group)
        if len(group["nus"]) != 2:
            raise ValueError(f"Invalid nus: expected two values, got {group['nus']}")
        check_range("nu parameter at index 0 (nus[0])", group["nus"][0], 0.0, 1.0, high_inclusive=True)
        check_range("nu parameter at index 1 (nus[1])", group["nus"][1], 0.0, 1.0, high_inclusive=True)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        nu1, nu2 = group["nus"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            nu1=nu1,
            nu2=nu2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=True,
            maximize=group["maximize"],
        )
