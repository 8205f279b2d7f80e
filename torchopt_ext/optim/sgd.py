"""SGD with momentum, dampening and Nesterov on the fused torchopt_ext kernel."""

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


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` (same argument names and defaults).

    State per param: ``step`` and, when momentum != 0, ``momentum_buffer``
    (initialised to the first gradient, as torch does). Extra arguments
    ``state_dtype``, ``stochastic_rounding`` and ``seed`` as in
    :class:`torchopt_ext.optim.Adam`.
    """

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
            seed=draw_seed(seed) if stochastic_rounding else (seed or 0),
        )
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("momentum value", group["momentum"])
        check_range("dampening value", group["dampening"], 0.0, 1.0, high_inclusive=True)
        check_non_negative("weight_decay value", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_state_dtype(group["state_dtype"])

    def _init_group(self, group, params, grads, momentum_buffers, state_steps):
        has_momentum = group["momentum"] != 0
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = self._grad_of(p, "SGD")
            state = self.state[p]
            if "step" not in state:
                state["step"] = self._new_step()
            if has_momentum and "momentum_buffer" not in state:
                # The kernel copies the gradient in on the buffer's first step.
                state["momentum_buffer"] = self._new_state_tensor(p, group)
                state["step"] = self._new_step()
            params.append(local(p))
            grads.append(local(grad))
            if has_momentum:
                momentum_buffers.append(local(state["momentum_buffer"]))
            state_steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_kwargs()
        for group in self.param_groups:
            params, grads, momentum_buffers, state_steps = [], [], [], []
            self._init_group(group, params, grads, momentum_buffers, state_steps)
            if not params:
                continue
            torch.ops.torchopt_ext.sgd_step_(
                params,
                grads,
                momentum_buffers,
                state_steps,
                self._lr_tensor(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                stochastic_rounding=group["stochastic_rounding"],
                seed=group["seed"],
                **amp,
            )
        return loss
