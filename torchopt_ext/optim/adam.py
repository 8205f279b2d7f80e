"""Adam (coupled L2 weight decay by default) on the fused torchopt_ext kernel."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_adam_like, draw_seed


class Adam(FusedOptimizer):
    """Drop-in for ``torch.optim.Adam`` (same argument names and defaults).

    Extra arguments: ``state_dtype`` (storage dtype of the moments; default the
    param's dtype, math is always fp32 or wider), ``stochastic_rounding`` (bf16
    params are rounded stochastically after each update) and ``seed`` (its
    random stream; default drawn from torch's generator). Weight decay is
    coupled (added to the gradient) unless ``decoupled_weight_decay=True``.
    """

    _op = "adam_step_"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

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
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_like(group)

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        return key != "max_exp_avg_sq" or group["amsgrad"]

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return group["decoupled_weight_decay"]

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=self._decoupled(group),
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )
