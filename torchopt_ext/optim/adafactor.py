"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost")."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import (
    DTensor,
    FusedOptimizer,
    check_lr,
    check_non_negative,
    check_range,
    check_state_dtype,
    draw_seed,
)


class Adafactor(FusedOptimizer):
    r"""Drop-in for ``torch.optim.Adafactor`` (same argument names, defaults,
    state keys and math), with the Hugging Face extras as keyword-only options.

    Per param, with step ``t`` and ``G`` the gradient (negated with ``maximize``):

    - ``rho_t = min(lr, 1/sqrt(t))`` (``relative_step=True``; with
      ``warmup_init`` also ``min(.., 1e-6 t)``), else ``rho_t = lr``;
    - ``alpha_t = max(eps2, RMS(theta)) * rho_t`` (``scale_parameter=True``), else ``rho_t``;
    - ``theta *= 1 - lr * weight_decay`` (torch's ``lr``, not ``alpha_t``);
    - params with ``dim >= 2`` are factored over their last two dims: row and
      column EMAs ``row_var``/``col_var`` of ``mean(G^2)`` with weight
      ``1 - beta2_t = t^beta2_decay``, ``V = row_var col_var / max(mean(row_var), eps1)``;
      vectors and 0-d params keep a full EMA ``variance``;
    - ``U = G / sqrt(max(V, eps1^2))``, clipped to ``U / max(1, RMS(U) / d)``;
    - ``theta -= alpha_t U``; with ``beta1`` set, a first moment of the scaled
      update ``exp_avg = beta1 exp_avg + (1 - beta1) alpha_t U`` is applied
      instead (Hugging Face semantics; ``exp_avg`` exists only then).

    ``eps=(None, 1e-3)``: ``eps1=None`` is ``torch.finfo(param.dtype).eps``.
    The state (``step``, ``row_var``/``col_var`` or ``variance``) has torch's
    keys and shapes, so a ``torch.optim.Adafactor`` checkpoint loads; a factored
    (R, C) param keeps R + C state elements. ``foreach`` is accepted and
    ignored (one fused op call per param group). ``state_dtype``,
    ``stochastic_rounding`` and ``seed`` as in :class:`torchopt_ext.optim.Adam`;
    math is fp32 for bf16/fp16 params. DTensor (FSDP2) params work by
    gathering: RMS and the factored means span the whole tensor, so the op
    runs on full tensors and each rank keeps its slice; the state is DTensors
    with the param's placements (see ``_base.WholeTensors``).

    Differences from ``transformers.optimization.Adafactor`` (HF): HF adds
    ``eps1`` (1e-30) to ``G^2`` before averaging and divides by the plain mean
    of ``row_var``; here (as in torch) the EMAs are of ``G^2`` alone and
    ``eps1`` clamps the mean and ``V``. HF's ``lr=None`` means relative step
    (here ``relative_step=True`` caps ``rho_t`` at ``lr``, so HF's
    ``lr=None, warmup_init=True`` is ``lr=1e-2`` here) and HF rejects an
    explicit lr with ``relative_step``. HF scales weight decay by ``alpha_t``
    (``theta -= wd * alpha_t * theta``), torch and this class by ``lr``. HF
    defaults: ``eps=(1e-30, 1e-3)``, ``clip_threshold`` (= ``d``) 1.0,
    ``decay_rate`` (= ``beta2_decay``) -0.8. HF's ``beta1`` and
    ``warmup_init`` are the ones here. ``timm.optim.Adafactor``: relative step
    iff ``lr is None``, ``eps=1e-30`` and ``eps_scale=1e-3``, factors only
    when both dims are >= ``min_dim_size_to_factor`` (16) and, for ndim > 2,
    over dims (0, 1) instead of the last two, applies ``scale_parameter`` only
    in relative-step mode and writes ``alpha_t`` into ``group['lr']``.
    """

    _op = "adafactor_step_"
    _whole_tensor_op = True  # RMS(theta), RMS(U), row/col means
    _state_keys = ("row_var", "col_var", "variance", "exp_avg")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[Optional[float], float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        beta1: Optional[float] = None,
        relative_step: bool = True,
        scale_parameter: bool = True,
        warmup_init: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=tuple(eps),
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            beta1=beta1,
            relative_step=relative_step,
            scale_parameter=scale_parameter,
            warmup_init=warmup_init,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        if not group["beta2_decay"] <= 0.0:
            raise ValueError(f"Invalid beta2_decay: must be <= 0, got {group['beta2_decay']}")
        eps = group["eps"]
        if len(eps) != 2:
            raise ValueError(f"Invalid eps: expected (eps1, eps2), got {eps}")
        if eps[0] is not None:
            check_non_negative("eps[0] (eps1)", eps[0])
        check_non_negative("eps[1] (eps2)", eps[1])
        if not group["d"] >= 1.0:
            raise ValueError(f"Invalid d (clipping threshold): must be >= 1, got {group['d']}")
        check_non_negative("weight_decay value", group["weight_decay"])
        if group["beta1"] is not None:
            check_range("beta1", group["beta1"], 0.0, 1.0)
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("Invalid warmup_init: warmup_init=True requires relative_step=True")
        check_state_dtype(group["state_dtype"])

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        shape = list(p.shape)
        if key == "row_var" and p.dim() >= 2:
            return tuple(shape[:-1] + [1])
        if key == "col_var" and p.dim() >= 2:
            return tuple(shape[:-2] + [1] + shape[-1:])
        if key == "variance" and p.dim() < 2:
            return tuple(shape)
        if key == "exp_avg":
            return tuple(shape)
        return None

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        dtype = group["state_dtype"] or p.dtype
        if DTensor is not None and isinstance(p, DTensor):
            # Sharded like the param (a size-1 dim sharded leaves some ranks an
            # empty slice), so DCP can save and reshard it.
            from torch.distributed.tensor import distribute_tensor

            zeros = torch.zeros(self._state_shape(p, key), dtype=dtype, device=p.to_local().device)
            return distribute_tensor(zeros, p.device_mesh, p.placements, src_data_rank=None)
        return torch.zeros(self._state_shape(p, key), dtype=dtype, device=p.device)

    def _init_group(self, group, params, grads, state_steps, row_vars, col_vars, variances, exp_avgs):
        # row_vars/col_vars hold only the factored (dim >= 2) params' state and
        # variances only the others', each in param order: the op's layout.
        unwrap, unwrap_input = self._unwrappers()
        for _, p, state in self._params_with_grad(group):
            keys = ("row_var", "col_var") if p.dim() >= 2 else ("variance",)
            if group["beta1"] is not None:
                keys += ("exp_avg",)
            for key in keys:
                if key not in state:
                    state[key] = self._new_state(p, group, key)
            if p.dim() >= 2:
                row_vars.append(unwrap(state["row_var"]))
                col_vars.append(unwrap(state["col_var"]))
            else:
                variances.append(unwrap(state["variance"]))
            if group["beta1"] is not None:
                exp_avgs.append(unwrap(state["exp_avg"]))
            params.append(unwrap(p))
            grads.append(unwrap_input(p.grad))
            state_steps.append(state["step"])

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        eps1, eps2 = group["eps"]
        return dict(
            beta2_decay=group["beta2_decay"],
            eps1=eps1,
            eps2=eps2,
            d=group["d"],
            weight_decay=group["weight_decay"],
            beta1=group["beta1"],
            relative_step=group["relative_step"],
            scale_parameter=group["scale_parameter"],
            warmup_init=group["warmup_init"],
            maximize=group["maximize"],
        )
