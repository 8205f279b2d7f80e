"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
    check_state_dtype,
    draw_seed,
    math_dtype,
)
from ._ownership import OwnedStateMixin

_DATA_FORMATS = ("channels_first", "channels_last")


def _merged_shape(shape: tuple[int, ...], max_precond_dim: int, data_format: str) -> list[int]:
    # Mirrors soap_layout in csrc/functional/soap.cpp (the op checks the sizes).
    if data_format == "channels_last" and len(shape) == 4:
        shape = (shape[0], shape[3], shape[1], shape[2])
    out, current = [], 1
    for d in shape:
        if current * d > max_precond_dim:
            if current > 1:
                out.append(current)
                current = d
            else:
                out.append(d)
                current = 1
        else:
            current *= d
    if current > 1 or not out:
        out.append(current)
    return out


def soap_factor_sizes(shape: tuple[int, ...], group: dict[str, Any]) -> list[int]:
    """Per (merged) dim of a param, the size of its Gram factor (0: none)."""
    limit = group["max_precond_dim"]
    if len(shape) == 1:
        return [shape[0] if group["precondition_1d"] and shape[0] <= limit else 0]
    dims = _merged_shape(tuple(shape), limit, group["data_format"]) if group["merge_dims"] else list(shape)
    return [d if d <= limit else 0 for d in dims]


class SOAP(OwnedStateMixin, FusedOptimizer):
    """SOAP with the names and defaults of the reference ``soap.py``.

    Per param, over its dims (adjacent dims merged up to ``max_precond_dim``
    with ``merge_dims``): Gram factors ``GG_k`` (an EMA with ``shampoo_beta``,
    or ``betas[1]`` when it is negative) and their eigenbases ``Q_k``; dims
    larger than ``max_precond_dim``, and 1-D params unless
    ``precondition_1d``, are not rotated. The first step a param takes only
    builds ``GG`` and ``Q`` (eigh, descending eigenvalues): no update, ``step``
    stays 0. Later steps run Adam on the rotated gradient (``exp_avg`` is kept
    in the rotated basis; ``eps`` is added to the uncorrected ``sqrt(v)`` and
    the bias corrections fold into the step size when ``correct_bias``), rotate
    the update back, optionally divide it by its RMS (``normalize_grads``),
    apply it, then decoupled weight decay ``p -= lr * weight_decay * p``, then
    update ``GG``; every ``precondition_frequency`` steps ``Q`` is refreshed by
    one QR power iteration (float32 eigh/QR, float64 if that fails), with
    ``exp_avg_sq`` permuted to the new eigenvalue order and ``exp_avg``
    re-rotated.

    State: ``step``, ``exp_avg``, ``exp_avg_sq`` (param-shaped, in
    ``state_dtype``), and ``GG``/``Q``: one flat 1-D tensor each holding the
    ``d_k x d_k`` blocks of the preconditioned dims in order (empty when no dim
    is preconditioned); float32, float64 for float64 params. Unlike the
    reference's per-dim lists, this keeps the op schema and state_dict plain
    tensors. ``state_dtype``, ``stochastic_rounding`` and ``seed`` as in
    :class:`torchopt_ext.optim.AdamW`.

    NaN / Inf gradients propagate into the param and state (no skipping);
    eigh / QR only run at init and on refresh steps, where a failure of
    float32 LAPACK retries in float64 and a failure there raises.
    ``torch.amp.GradScaler`` skips a step, the init call included, on
    ``found_inf``. With ``merge_dims`` and ``data_format="channels_last"``, as
    in the reference, the merge is planned on the NCHW order of a 4-D
    param's sizes while the tensor is reshaped as stored.
    """

    _op = "soap_step_"
    _whole_tensor_op = True  # Gram factors and eigenbases of whole matrices
    _state_keys = ("exp_avg", "exp_avg_sq", "GG", "Q")
    _owner_state_keys = ("GG", "Q")  # on the param's owner only (distributed_mode)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)
        self._init_distributed_mode()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        if not group["shampoo_beta"] < 1.0:
            raise ValueError(f"Invalid shampoo_beta: must be < 1 (negative: use betas[1]), got {group['shampoo_beta']}")
        check_non_negative("epsilon value (eps)", group["eps"])
        check_non_negative("weight_decay value", group["weight_decay"])
        for name in ("precondition_frequency", "max_precond_dim"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: must be an int >= 1, got {value!r}")
        if group["data_format"] not in _DATA_FORMATS:
            raise ValueError(f"Invalid data_format: must be one of {_DATA_FORMATS}, got {group['data_format']!r}")
        check_state_dtype(group["state_dtype"])

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        if key in ("GG", "Q"):
            return (sum(d * d for d in soap_factor_sizes(tuple(p.shape), self._group_of(p))),)
        return tuple(p.shape)

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        if key in ("GG", "Q"):
            return math_dtype(p)
        return group["state_dtype"] or p.dtype

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key in ("GG", "Q"):
            numel = sum(d * d for d in soap_factor_sizes(tuple(p.shape), group))
            return torch.zeros(numel, dtype=self._state_dtype(p, group, key), device=p.device)
        return super()._new_state(p, group, key)

    def _owner_param_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def _owner_initial_step(self) -> torch.Tensor:
        return torch.full((), -1.0, dtype=torch.float32)  # as _init_group: the init call

    def _init_group(self, group, params, grads, state_steps, *state_lists):
        for p in group["params"]:
            if p.grad is not None and "step" not in self.state[p]:
                # -1: the op's first call for this param only builds GG and Q
                # (decided in the op, not by a Python branch that torch.compile
                # would bake into the graph) and leaves the step at 0.
                self.state[p]["step"] = torch.full((), -1.0, dtype=torch.float32)
        super()._init_group(group, params, grads, state_steps, *state_lists)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            shampoo_beta=group["shampoo_beta"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            precondition_frequency=group["precondition_frequency"],
            max_precond_dim=group["max_precond_dim"],
            merge_dims=group["merge_dims"],
            precondition_1d=group["precondition_1d"],
            normalize_grads=group["normalize_grads"],
            data_format=group["data_format"],
            correct_bias=group["correct_bias"],
        )
