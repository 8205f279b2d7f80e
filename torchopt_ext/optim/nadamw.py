"""NAdamW: NAdam (Dozat 2016) with torch's momentum-decay schedule and
decoupled weight decay."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_adam_like, check_non_negative, draw_seed, torch_switches


class NAdamW(FusedOptimizer):
    """``torch.optim.NAdam(..., decoupled_weight_decay=True)`` as a fused
    optimizer (same argument names; lr=2e-3, momentum_decay=4e-3). Defaults
    differ from torch's NAdam only where the W asks for it: weight decay is
    decoupled and weight_decay defaults to 1e-2, as in AdamW. With
    ``decoupled_weight_decay=False`` it is torch's coupled NAdam.

    State per param: ``step``, ``mu_product`` (float32 scalar, as torch keeps
    it), ``exp_avg``, ``exp_avg_sq``; a torch.optim.NAdam checkpoint loads.
    For a CUDA param ``step`` and ``mu_product`` live on its device (the CUDA
    kernel advances both: no host sync, so ``step()`` can be captured in a
    CUDA graph); loading a checkpoint moves them there.
    """

    _op = "nadam_step_"
    _state_keys = ("exp_avg", "exp_avg_sq", "mu_product")
    _scalar_state_keys = ("mu_product",)
    # mu_product lives with the counter: on a CUDA param's device it is
    # advanced by the op's CUDA pre-kernel.
    _device_steps = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = True,
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
            momentum_decay=momentum_decay,
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
        check_non_negative("momentum_decay value", group["momentum_decay"])

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "mu_product":
            return torch.ones((), dtype=torch.float32, device=self._scalar_device(p))
        return super()._new_state(p, group, key)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum_decay=group["momentum_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )
