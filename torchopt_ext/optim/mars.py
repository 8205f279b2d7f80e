"""MARS (Yuan et al. 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
Models"), approximate mode, with the AdamW and Lion update rules."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    adamw_fallback_step,
    check_betas,
    check_lr,
    check_non_negative,
    check_state_dtype,
    draw_seed,
    local,
    lr_tensor,
    norm_layout,
    shard_sum_rows,
)

_MARS_TYPES = ("mars-adamw", "mars-lion")


class MARS(FusedOptimizer):
    """MARS with the argument names and defaults of the official implementation.

    2-D params (all params with ``optimize_1d=True``) take the MARS step: the
    variance-reduced gradient ``c = g + gamma*b1/(1-b1)*(g - g_prev)``, clipped
    to unit L2 norm per tensor, drives an AdamW (``mars_type="mars-adamw"``) or
    Lion (``"mars-lion"``) update. On the first step ``g_prev = 0``, so
    ``c = (1 + gamma*b1/(1-b1)) g`` before clipping (the official behaviour;
    timm instead uses ``c = g``). Other params take AdamW with ``betas_1d``,
    ``weight_decay_1d`` and learning rate ``lr * lr_1d / lr_at_construction``
    (so a schedule scales both branches alike).

    FSDP2 (sharded DTensors on one 1-D mesh): the step runs on the local
    shards; ``mars_norm_sqs`` gives each shard's ||c||^2, one all-reduce sums
    them per tensor, and ``mars_step_`` clips with the whole-tensor norm.
    Other DTensor layouts, or ``opt.distributed_mode = "gather"``, gather the
    DTensors whole for the op instead.

    Not provided: ``mars_type="mars-shampoo"`` (needs the Newton-Schulz core of
    the spectral optimizers) and the exact mode ``is_approx=False``.
    """

    _op = "mars_step_"
    distributed_mode = "shards"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "last_grad")
    _device_steps = True  # the CUDA kernels read and advance device counters

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 3e-3,
        betas: tuple[float, float] = (0.95, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        gamma: float = 0.025,
        is_approx: bool = True,
        mars_type: str = "mars-adamw",
        optimize_1d: bool = False,
        lr_1d: float = 3e-3,
        betas_1d: tuple[float, float] = (0.9, 0.95),
        weight_decay_1d: float = 0.1,
        *,
        maximize: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        if not is_approx:
            raise ValueError("is_approx=False (exact MARS with a second gradient evaluation) is not supported")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            gamma=gamma,
            mars_type=mars_type,
            optimize_1d=optimize_1d,
            lr_1d_factor=lr_1d / float(lr) if float(lr) > 0 else 0.0,
            betas_1d=tuple(betas_1d),
            weight_decay_1d=weight_decay_1d,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        check_non_negative("lr_1d value", lr_1d)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("epsilon value (eps)", group["eps"])
        check_betas(group["betas"])
        check_betas(group["betas_1d"])
        check_non_negative("weight_decay value", group["weight_decay"])
        check_non_negative("weight_decay_1d value", group["weight_decay_1d"])
        check_non_negative("gamma value", group["gamma"])
        if group["mars_type"] not in _MARS_TYPES:
            raise ValueError(
                f"Invalid mars_type: must be one of {_MARS_TYPES}, got {group['mars_type']!r}"
                + (
                    " (mars-shampoo needs the Newton-Schulz core, not built yet)"
                    if "shampoo" in group["mars_type"]
                    else ""
                )
            )
        if group["amsgrad"] and group["mars_type"] == "mars-lion":
            raise ValueError("Invalid amsgrad: it applies to mars_type='mars-adamw' only")
        check_state_dtype(group["state_dtype"])

    def _is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["optimize_1d"] or p.dim() == 2

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        if key == "exp_avg_sq":
            return group["mars_type"] == "mars-adamw"
        if key == "max_exp_avg_sq":
            return group["amsgrad"]
        return True

    def _init_group(
        self,
        group,
        params,
        grads,
        state_steps,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        last_grads,
        params_1d,
        grads_1d,
        steps_1d,
        exp_avgs_1d,
        exp_avg_sqs_1d,
    ):
        unwrap, unwrap_input = self._unwrappers()
        for _, p, state in self._params_with_grad(group):
            if self._is_matrix(group, p):
                lists = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads)
                for key, out in zip(self._state_keys, lists):
                    if self._uses_state(group, key):
                        if key not in state:
                            state[key] = self._new_state(p, group, key)
                        out.append(unwrap(state[key]))
                params.append(unwrap(p))
                grads.append(unwrap_input(p.grad))
                state_steps.append(state["step"])
            else:
                for key, out in (("exp_avg", exp_avgs_1d), ("exp_avg_sq", exp_avg_sqs_1d)):
                    if key not in state:
                        state[key] = self._new_state(p, group, key)
                    out.append(local(state[key]))
                params_1d.append(local(p))
                grads_1d.append(local(p.grad))
                steps_1d.append(state["step"])

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            gamma=group["gamma"],
            mars_type=group["mars_type"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_args()
        for group in self.param_groups:
            lists = [[] for _ in range(12)]
            matrices = [p for p in group["params"] if p.grad is not None and self._is_matrix(group, p)]
            layout = norm_layout(matrices, self.distributed_mode)
            if (layout == "gather") != self._gather_now:
                self._gather_now = layout == "gather"
            self._init_group(group, *lists)
            params, grads, state_steps, exp_avgs, exp_avg_sqs, max_sqs, last_grads = lists[:7]
            params_1d, grads_1d, steps_1d, exp_avgs_1d, exp_avg_sqs_1d = lists[7:]
            lr = lr_tensor(group)
            rounding = self._rounding_args(group)
            if params:
                state_lists = (exp_avgs, exp_avg_sqs, max_sqs, last_grads)
                extra = {}
                if layout == "sharded":
                    # The clip needs whole-tensor norms: local sums of squares, all-reduced.
                    sums = torch.ops.torchopt_ext.mars_norm_sqs(
                        params, grads, *state_lists, state_steps, lr, **self._op_kwargs(group), **amp
                    )
                    extra["norm_sqs"] = shard_sum_rows(matrices, sums)
                torch.ops.torchopt_ext.mars_step_(
                    params,
                    grads,
                    *state_lists,
                    state_steps,
                    lr,
                    **self._op_kwargs(group),
                    **rounding,
                    **amp,
                    **extra,
                )
                self._whole_tensors.write_back()
            adamw_fallback_step(
                params_1d,
                grads_1d,
                exp_avgs_1d,
                exp_avg_sqs_1d,
                steps_1d,
                lr * group["lr_1d_factor"],
                betas=group["betas_1d"],
                eps=group["eps"],
                weight_decay=group["weight_decay_1d"],
                maximize=group["maximize"],
                **rounding,
                **amp,
            )
        return loss
