"""MARS (Yuan et al. 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
Models") with the AdamW, Lion and Shampoo (Newton-Schulz) update rules, in the approximate and the
exact mode."""

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

_MARS_TYPES = ("mars-adamw", "mars-lion", "mars-shampoo")


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

    ``mars_type="mars-shampoo"``: a 2-D param moves by
    ``lr * (sqrt(max(1, rows/cols)) * NS5(m / (1 - b1)) + weight_decay * p)``,
    NS5 being five Newton-Schulz steps with Keller Jordan's coefficients on
    ``X / (||X|| + eps)`` in ``ns_dtype`` (bf16 as the official code; ``None``
    for fp32). Other params of the MARS branch
    (``optimize_1d``) take the mars-adamw rule, as in the official code.
    Sharded DTensors are gathered for the Newton-Schulz step.

    ``is_approx=False`` is the exact mode: ``g_prev`` is the gradient of the
    previous params on the current batch, which the caller provides with the
    official two calls: after a backward pass at the current params on the
    next batch, ``update_previous_grad()``; after ``step()``,
    ``update_last_grad()``. Both read ``p.grad`` as it is (call
    ``GradScaler.unscale_`` first under AMP).

    FSDP2 (sharded DTensors on one 1-D mesh): the step runs on the local
    shards; ``mars_norm_sqs`` gives each shard's ||c||^2, one all-reduce sums
    them per tensor, and ``mars_step_`` clips with the whole-tensor norm.
    Other DTensor layouts, or ``opt.distributed_mode = "gather"``, gather the
    DTensors whole for the op instead.
    """

    _op = "mars_step_"
    distributed_mode = "shards"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "last_grad")
    # The exact mode's copy of the next batch's grads: not an op input, but
    # restored by load_state_dict like the op's state.
    _fallback_state_keys = ("previous_grad",)
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
        ns_dtype: Optional[torch.dtype] = torch.bfloat16,
        maximize: bool = False,
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
            gamma=gamma,
            is_approx=is_approx,
            mars_type=mars_type,
            ns_dtype=ns_dtype,
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
            raise ValueError(f"Invalid mars_type: must be one of {_MARS_TYPES}, got {group['mars_type']!r}")
        if group["ns_dtype"] is not None and not group["ns_dtype"].is_floating_point:
            raise ValueError(f"Invalid ns_dtype: must be a floating dtype or None, got {group['ns_dtype']}")
        if group["amsgrad"] and group["mars_type"] == "mars-lion":
            raise ValueError("Invalid amsgrad: it applies to mars_type='mars-adamw' only")
        check_state_dtype(group["state_dtype"])

    def _is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["optimize_1d"] or p.dim() == 2

    @staticmethod
    def _orthogonalized(group: dict[str, Any], p: torch.Tensor) -> bool:
        """mars-shampoo's Newton-Schulz rule (2-D params of the MARS branch)."""
        return group["mars_type"] == "mars-shampoo" and p.dim() == 2

    def _matrix_keys(self, group: dict[str, Any], p: torch.Tensor) -> tuple[str, ...]:
        """The state a MARS-branch param keeps, in the op's list order."""
        ortho = self._orthogonalized(group, p)
        keys = ["exp_avg"]
        if group["mars_type"] == "mars-adamw" or (group["mars_type"] == "mars-shampoo" and not ortho):
            keys.append("exp_avg_sq")
        if group["amsgrad"] and not ortho:
            keys.append("max_exp_avg_sq")
        keys.append("last_grad")
        return tuple(keys)

    def _op_kwargs(self, group: dict[str, Any], orthogonalized: bool = False) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        mars_type = group["mars_type"]
        if mars_type == "mars-shampoo" and not orthogonalized:
            mars_type = "mars-adamw"
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            gamma=group["gamma"],
            mars_type=mars_type,
            amsgrad=group["amsgrad"] and not orthogonalized,
            maximize=group["maximize"],
        )

    def _init_group(
        self, group, params, grads, state_steps, exp_avgs, exp_avg_sqs, max_sqs, last_grads, *, members=None
    ):
        """The op lists of ``members`` ((param, state) pairs of one rule), by
        default the group's MARS-branch params of the plain rule."""
        unwrap, unwrap_input = self._unwrappers()
        lists = dict(exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs, max_exp_avg_sq=max_sqs, last_grad=last_grads)
        if members is None:
            members = [
                (p, state)
                for _, p, state in self._params_with_grad(group)
                if self._is_matrix(group, p) and not self._orthogonalized(group, p)
            ]
        for p, state in members:
            for key in self._matrix_keys(group, p):
                if key not in state:
                    state[key] = self._new_state(p, group, key)
                lists[key].append(unwrap(state[key]))
            params.append(unwrap(p))
            grads.append(unwrap_input(p.grad))
            state_steps.append(state["step"])

    def _mars_call(self, group, members, orthogonalized, lr, amp) -> None:
        """One mars_step_ call over one rule's MARS-branch (param, state) pairs."""
        matrices = [p for p, _ in members]
        layout = norm_layout(matrices, self.distributed_mode)
        if orthogonalized and layout == "sharded":
            layout = "gather"  # Newton-Schulz needs whole matrices
        self._gather_now = layout == "gather"
        params, grads, steps = [], [], []
        state_lists = ([], [], [], [])
        self._init_group(group, params, grads, steps, *state_lists, members=members)
        kwargs = self._op_kwargs(group, orthogonalized)
        extra = {}
        if layout == "sharded":
            # The clip needs whole-tensor norms: local sums of squares, all-reduced.
            sums = torch.ops.torchopt_ext.mars_norm_sqs(params, grads, *state_lists, steps, lr, **kwargs, **amp)
            extra["norm_sqs"] = shard_sum_rows(matrices, sums)
        torch.ops.torchopt_ext.mars_step_(
            params,
            grads,
            *state_lists,
            steps,
            lr,
            **kwargs,
            **self._rounding_args(group),
            **amp,
            **extra,
            is_approx=group["is_approx"],
            ns_dtype=group["ns_dtype"],
        )
        self._whole_tensors.write_back()
        self._gather_now = False

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_args()
        for group in self.param_groups:
            plain, orthogonalized = [], []
            params_1d, grads_1d, steps_1d, exp_avgs_1d, exp_avg_sqs_1d, max_sqs_1d = [], [], [], [], [], []
            # (param, state) pairs gathered in one pass: a second pass over
            # self.state in a torch.compile'd step lost the state made in the first.
            for _, p, state in self._params_with_grad(group):
                if self._is_matrix(group, p):
                    (orthogonalized if self._orthogonalized(group, p) else plain).append((p, state))
                    continue
                keys = [("exp_avg", exp_avgs_1d), ("exp_avg_sq", exp_avg_sqs_1d)]
                if group["amsgrad"]:  # the official code's 1-D branch honours amsgrad too
                    keys.append(("max_exp_avg_sq", max_sqs_1d))
                for key, out in keys:
                    if key not in state:
                        state[key] = self._new_state(p, group, key)
                    out.append(local(state[key]))
                params_1d.append(local(p))
                grads_1d.append(local(p.grad))
                steps_1d.append(state["step"])
            lr = lr_tensor(group)
            for members, ortho in ((plain, False), (orthogonalized, True)):
                if members:
                    self._mars_call(group, members, ortho, lr, amp)
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
                max_exp_avg_sqs=max_sqs_1d if group["amsgrad"] else None,
                **self._rounding_args(group),
                **amp,
            )
        return loss

    # -- exact MARS (is_approx=False) ------------------------------------------

    @torch.no_grad()
    def update_previous_grad(self) -> None:
        """Exact mode: keep the current grads (the backward pass at the current
        params on the next batch) as ``previous_grad``; no-op for groups with
        ``is_approx=True``."""
        for group in self.param_groups:
            if group["is_approx"]:
                continue
            for p in group["params"]:
                if p.grad is None or not self._is_matrix(group, p):
                    continue
                state = self.state[p]
                if "previous_grad" not in state:
                    state["previous_grad"] = self._new_state(p, group, "previous_grad")
                # g_prev keeps the step's sign convention (negated with maximize).
                grad = p.grad.neg() if group["maximize"] else p.grad
                state["previous_grad"].copy_(grad)

    @torch.no_grad()
    def update_last_grad(self) -> None:
        """Exact mode: after ``step()``, make ``previous_grad`` the next step's
        ``g_prev``."""
        for group in self.param_groups:
            if group["is_approx"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "previous_grad" not in state or not self._is_matrix(group, p):
                    continue
                if "last_grad" not in state:
                    state["last_grad"] = self._new_state(p, group, "last_grad")
                state["last_grad"].copy_(state["previous_grad"])
