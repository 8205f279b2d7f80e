"""SGD with momentum, dampening and Nesterov on the fused torchopt_ext kernel."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_lr,
    check_non_negative,
    check_range,
    check_state_dtype,
    draw_seed,
    torch_switches,
)


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` (same argument names and defaults).

    State per param: ``step`` and, when momentum != 0, ``momentum_buffer``
    (initialised to the first gradient, as torch does). Extra arguments
    ``state_dtype``, ``stochastic_rounding`` and ``seed`` as in
    :class:`torchopt_ext.optim.Adam`.
    """

    _op = "sgd_step_"
    _device_steps = True
    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        defaults.update(
            torch_switches(type(self).__name__, foreach=foreach, differentiable=differentiable, fused=fused)
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("momentum value", group["momentum"])
        check_range("dampening value", group["dampening"], 0.0, 1.0, high_inclusive=True)
        check_non_negative("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_state_dtype(group["state_dtype"])

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        return group["momentum"] != 0

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        # The kernel copies the gradient into the buffer on its first step,
        # counted from when the buffer exists.
        self.state[p]["step"].zero_()
        return super()._new_state(p, group, key)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
