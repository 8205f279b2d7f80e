"""AdamW: Adam with decoupled weight decay, as torch.optim.AdamW."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from .adam import Adam


class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW`` (weight_decay=1e-2, applied as
    ``p *= 1 - lr * weight_decay`` before the update). Extra arguments as in
    :class:`torchopt_ext.optim.Adam`, Magma included (the decoupled decay is
    part of the masked update: a dropped step also skips the decay)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        use_magma: bool = False,
        magma_p: float = 0.5,
        magma_tau: float = 2.0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            use_magma=use_magma,
            magma_p=magma_p,
            magma_tau=magma_tau,
        )

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return True
