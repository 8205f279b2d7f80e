"""Shared front end of the matrix optimizers (Muon, PRISM): routing between
the matrix op and the AdamW fallback, lazily created state, the distributed
paths (whole-matrix ownership, or whole-tensor gathering) and the step loop.
A subclass names its op, its momentum state key and its routing option, and
supplies ``_op_kwargs`` and the ``_owner_*`` hooks of the ownership path."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from ._base import MAGMA_FALLBACK_SEED_SALT, FusedOptimizer, adamw_fallback_step, is_dtensor, local, lr_tensor
from ._ownership import OwnershipPlan

_DISTRIBUTED_MODES = ("owner", "replicated", "gather")


class MatrixOptimizer(FusedOptimizer):
    _momentum_key: str = ""
    # Param-group option that routes explicitly: None (2-D params take the
    # matrix op), True (every >= 2-D param), False (the AdamW fallback).
    _route_key: str = ""
    _whole_tensor_op = True  # matrix functions need the whole matrix
    _scalar_state_keys = ("magma_score",)
    _fallback_state_keys = ("exp_avg", "exp_avg_sq")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._state_keys = (cls._momentum_key, "magma_score")

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        # How DTensor / replicated matrices are stepped (docs/design.md,
        # "Distributed"): "owner" (default): Shard(0) / Replicate() DTensors by
        # whole-matrix ownership, plain tensors locally; "replicated": plain
        # tensors are DDP replicas over `process_group` (None: the default
        # group) and use ownership too; "gather": the all-gather path.
        self.distributed_mode = os.environ.get("TORCHOPT_EXT_DISTRIBUTED_MODE", "owner")
        self.process_group = None
        self._local_only = False

    @property
    def distributed_mode(self) -> str:
        return self._distributed_mode

    @distributed_mode.setter
    def distributed_mode(self, mode: str) -> None:
        if mode not in _DISTRIBUTED_MODES:
            raise ValueError(f"Invalid distributed_mode: must be one of {_DISTRIBUTED_MODES}, got {mode!r}")
        self._distributed_mode = mode

    def _unwrappers(self):
        if self._local_only:  # the ownership path works on local shards
            return local, local
        return super()._unwrappers()

    def _check_routing(self, group: dict[str, Any]) -> None:
        key = self._route_key
        if group[key] not in (None, True, False):
            raise ValueError(f"Invalid {key}: must be None, True or False, got {group[key]!r}")
        for p in group.get("params", ()):
            if group[key] and p.dim() < 2:
                raise ValueError(f"Invalid {key}=True: a param of shape {tuple(p.shape)} is not a matrix")

    def _is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        route = group[self._route_key]
        return p.dim() == 2 if route is None else route

    def _adam_weight_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"]

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Runs at the start of every ``_init_group`` (a hook for subclasses)."""

    # -- whole-matrix ownership (torchopt_ext/optim/_ownership.py) -----------

    def _owner_supported(self, group: dict[str, Any]) -> bool:
        """Whether this group's options can take the ownership path."""
        return True

    def _owner_momentum(self, group, grads, moments, state_steps, grad_scale):
        """The element-wise part on local data: ([per matrix, the tensors the
        owner needs], Magma sums)."""
        raise NotImplementedError

    def _owner_compute(self, group, whole: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The matrix function on the owner: (rows, cols) inputs per matrix ->
        (rows, cols) updates."""
        raise NotImplementedError

    def _owner_result_dtype(self, group: dict[str, Any], input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def _owner_lr_scale(self, group: dict[str, Any]) -> str:
        return "none"

    def _ownership_plan(self, group: dict[str, Any]) -> Optional[OwnershipPlan]:
        if self._distributed_mode == "gather" or not self._owner_supported(group):
            return None
        matrices = [p for p in group["params"] if p.grad is not None and self._is_matrix(group, p)]
        if self._distributed_mode == "owner" and not any(is_dtensor(p) for p in matrices):
            return None  # plain tensors: the single-process step (torch.compile sees only this)
        if group["use_magma"] and any(
            is_dtensor(p) and p.grad is not None and not self._is_matrix(group, p) for p in group["params"]
        ):
            # The Magma-masked AdamW fallback needs whole-tensor cosines, which the
            # ownership path's local shards do not give: gather this group.
            return None
        if self._distributed_mode == "replicated":
            import torch.distributed as dist

            replicated = self.process_group if self.process_group is not None else dist.group.WORLD
        else:
            replicated = None
        return OwnershipPlan.build(matrices, replicated)

    def _owner_step(self, group, plan, params, grads, moments, magma_scores, state_steps, lr, amp) -> None:
        found_inf = amp["found_inf"]
        # Host read of a CPU tensor, as the ops' own found_inf check.
        if found_inf is not None and bool(found_inf.item()):
            return
        pieces, sums = self._owner_momentum(group, grads, moments, state_steps, amp["grad_scale"])
        if group["use_magma"]:
            sums = plan.all_reduce_sums(sums)
        updates = plan.run(
            pieces,
            lambda owned, whole: self._owner_compute(group, whole),
            lambda dtype: self._owner_result_dtype(group, dtype),
        )
        torch.ops.torchopt_ext.matrix_apply_(
            params,
            updates,
            magma_scores,
            state_steps,
            lr,
            weight_decay=group["weight_decay"],
            matrix_sizes=[n for m in plan.layouts for n in (m.rows, m.cols)],
            adjust_lr_fn=self._owner_lr_scale(group),
            magma_sums=sums if group["use_magma"] else None,
            use_magma=group["use_magma"],
            magma_p=group["magma_p"],
            magma_tau=group["magma_tau"],
            **self._rounding_args(group),
        )

    def _init_group(
        self,
        group,
        params,
        grads,
        state_steps,
        moments,
        magma_scores,
        params_adam,
        grads_adam,
        steps_adam,
        exp_avgs,
        exp_avg_sqs,
        magma_scores_adam,
    ):
        self._prepare_group(group)
        name = type(self).__name__
        unwrap, unwrap_input = self._unwrappers()
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{name} does not support complex parameters")
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
            if self._is_matrix(group, p):
                if self._momentum_key not in state:
                    state[self._momentum_key] = self._new_state(p, group, self._momentum_key)
                moments.append(unwrap(state[self._momentum_key]))
                if group["use_magma"]:
                    if "magma_score" not in state:  # also when Magma is turned on later
                        state["magma_score"] = torch.full((), 0.5, dtype=torch.float32)
                    magma_scores.append(state["magma_score"])
                params.append(unwrap(p))
                grads.append(unwrap_input(p.grad))
                state_steps.append(state["step"])
            else:
                for key, out in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
                    if key not in state:
                        state[key] = self._new_state(p, group, key)
                    out.append(local(state[key]))
                if group["use_magma"]:
                    if "magma_score" not in state:
                        state["magma_score"] = torch.full((), 0.5, dtype=torch.float32)
                    magma_scores_adam.append(state["magma_score"])
                params_adam.append(local(p))
                grads_adam.append(local(p.grad))
                steps_adam.append(state["step"])

    @staticmethod
    def _fallback_magma(group: dict[str, Any], scores: list, rounding: dict[str, Any]) -> dict[str, Any]:
        """Rounding and Magma arguments of the AdamW fallback: rollfast masks
        every leaf, so with ``use_magma`` the fallback is masked too, with
        its own draws (salted seed; this also moves its rounding stream)."""
        if not group["use_magma"]:
            return rounding
        return dict(
            rounding,
            seed=rounding["seed"] ^ MAGMA_FALLBACK_SEED_SALT,
            magma_scores=scores,
            magma_p=group["magma_p"],
            magma_tau=group["magma_tau"],
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_args()
        op = getattr(torch.ops.torchopt_ext, self._op)
        for group in self.param_groups:
            lists = [[] for _ in range(11)]
            plan = self._ownership_plan(group)
            self._local_only = plan is not None
            try:
                self._init_group(group, *lists)
            finally:
                self._local_only = False
            params, grads, state_steps, moments, magma_scores = lists[:5]
            params_adam, grads_adam, steps_adam, exp_avgs, exp_avg_sqs, magma_scores_adam = lists[5:]
            lr = lr_tensor(group)
            rounding = self._rounding_args(group)
            if params:
                # Which path the matrices took (read by tests and benchmarks).
                self._last_matrix_path = (
                    "owner" if plan is not None else ("gather" if self._whole_tensors._pending else "local")
                )
            if params and plan is not None:
                self._owner_step(group, plan, params, grads, moments, magma_scores, state_steps, lr, amp)
            elif params:
                op(params, grads, moments, magma_scores, state_steps, lr, **self._op_kwargs(group), **rounding, **amp)
                self._whole_tensors.write_back()
            adamw_fallback_step(
                params_adam,
                grads_adam,
                exp_avgs,
                exp_avg_sqs,
                steps_adam,
                lr * group["adam_lr_ratio"],
                betas=group["adam_betas"],
                eps=group["adam_eps"],
                weight_decay=self._adam_weight_decay(group),
                maximize=group["maximize"],
                **self._fallback_magma(group, magma_scores_adam, rounding),
                **amp,
            )
        return loss
