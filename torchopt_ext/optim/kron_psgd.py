"""Triangular Kronecker-factored PSGD as rlx-optim's ``KronPsgd`` (seed 002)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_lr, check_non_negative, check_range, draw_seed, lr_tensor, math_dtype
from ._ownership import OwnedStateMixin


class KronPSGD(OwnedStateMixin, FusedOptimizer):
    """rlx-optim's ``KronPsgd`` with the crate's field names and defaults
    (``lr`` has no default there and none here).

    2-D params ``(m, n)`` keep upper-triangular factors ``ql`` (m x m) and
    ``qr`` (n x n), starting at the identity. Per step, with the gradient ``g``
    as the probe (no Hessian-vector product):

    - ``A = ql g qr^T``, ``B = ql^{-T} g qr^{-1}`` (triangular solves; a pivot
      ``|d| <= 1e-12`` gives a zero unknown, as the crate);
    - ``D_l = A A^T - B B^T``, ``D_r = A^T A - B^T B`` (both from the old
      factors); ``q <- q - precond_lr / (||D||_F + eps) * q triu(D)`` for
      each side (normalised Lie-group step on the upper-triangular group);
    - ``pg = (ql^T ql) g (qr qr^T)`` with the new factors (the crate's right
      factor is ``qr qr^T``, not the ``qr^T qr`` its docs write; kept so runs
      carry over), scaled by ``clip / max|pg|`` when ``max|pg| > clip``;
    - ``v <- momentum v + pg + weight_decay p``; ``p <- p - lr v``.

    Note (the crate's behaviour, kept): with the gradient as probe, ``A == B``
    at ``ql = qr = I``, so ``D = 0`` and the factors never leave their identity
    start; the optimizer is then heavy-ball SGD with a max-abs clip on
    matrices. Factors loaded from a checkpoint away from the identity do move.
    ``D`` is evaluated as ``sym((A - B)(A + B)^T)`` so that fixed point holds
    bitwise (see docs/design.md).

    Every other param (0-D, 1-D, 3-D, 4-D: the crate tests ``shape.len() != 2``)
    takes the crate's fallback ``v <- momentum v + g + weight_decay p``,
    ``p <- p - lr v`` (no clip, no preconditioner). Conv kernels are therefore
    not preconditioned; reshape them yourself if you want that.

    Relation to ``Kron(preconditioner_mode="EQ")`` (rollfast): same
    triangular factors and Lie-group family, but Kron probes with a random
    vector ``V`` and the Hessian-free pair ``(Pg, V)``, normalises each factor
    step by a Lipschitz / spectral-norm bound of its own term and uses
    triangular solves of ``V`` only, updates the preconditioner with a
    probability schedule and keeps an EMA momentum *before* preconditioning
    (whitening the momentum or the gradient); KronPSGD fits on the gradient
    itself every step, normalises by the Frobenius norm of the full
    ``A A^T - B B^T``, preconditions the raw gradient and applies heavy-ball
    momentum *after* preconditioning, with coupled weight decay.

    Extras (not in the crate): ``maximize``; bf16/fp16 params keep fp32 state
    and math (``stochastic_rounding``/``seed`` for the bf16 store). NaN/Inf
    gradients propagate into the params as in the crate (the max-abs clip
    skips NaNs; an Inf makes the clip scale 0 and the update NaN). State:
    ``step``, ``momentum_buffer`` (every param), ``ql``/``qr`` (2-D params).
    """

    _op = "kron_psgd_step_"
    _state_keys = ("momentum_buffer", "ql", "qr")
    _whole_tensor_op = True  # the factors need the whole matrix
    _owner_state_keys = ("ql", "qr")  # on the param's owner only (distributed_mode)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor],
        precond_lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        clip: float = 1.0,
        *,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            precond_lr=precond_lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            clip=clip,
            maximize=maximize,
            state_dtype=None,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)
        self._init_distributed_mode()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("precond_lr value", group["precond_lr"])
        check_range("momentum value", group["momentum"], 0.0, 1.0)
        check_non_negative("weight_decay value", group["weight_decay"])
        if not group["eps"] > 0:
            raise ValueError(f"Invalid eps: must be > 0, got {group['eps']}")
        if not group["clip"] > 0:
            raise ValueError(f"Invalid clip: must be > 0, got {group['clip']}")

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        if key == "momentum_buffer":
            return tuple(p.shape)
        if p.dim() != 2:
            return None
        side = p.shape[0] if key == "ql" else p.shape[1]
        return (side, side)

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        return math_dtype(p)

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        dtype = math_dtype(p)
        if key == "momentum_buffer":
            return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        return torch.eye(self._state_shape(p, key)[0], dtype=dtype, device=p.device)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            precond_lr=group["precond_lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            clip=group["clip"],
            maximize=group["maximize"],
        )

    def _init_group(self, group, params, grads, state_steps, buffers, ql, qr):
        unwrap, unwrap_input = self._unwrappers()
        for _, p, state in self._params_with_grad(group):
            keys = self._state_keys if p.dim() == 2 else self._state_keys[:1]
            for key, out in zip(keys, (buffers, ql, qr)):
                if key not in state:
                    state[key] = self._new_state(p, group, key)
                out.append(unwrap(state[key]))
            params.append(unwrap(p))
            grads.append(unwrap_input(p.grad))
            state_steps.append(state["step"])

    def _owner_eligible(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return p.dim() == 2  # the others are element-wise: local shards

    def _owner_param_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        return ["momentum_buffer"]

    def _group_step(self, group: dict[str, Any], amp: dict[str, Any]) -> None:
        params, grads, state_steps, buffers, ql, qr = [], [], [], [], [], []
        self._init_group(group, params, grads, state_steps, buffers, ql, qr)
        if not params:
            return
        torch.ops.torchopt_ext.kron_psgd_step_(
            params,
            grads,
            buffers,
            ql,
            qr,
            state_steps,
            lr_tensor(group),
            **self._rounding_args(group),
            **self._op_kwargs(group),
            **amp,
        )
        self._whole_tensors.write_back()
