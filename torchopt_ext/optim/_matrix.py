"""Shared front end of the matrix optimizers (Muon, PRISM): routing between
the matrix op and the AdamW fallback, lazily created state, the distributed
paths (whole-matrix ownership, or whole-tensor gathering) and the step loop.
A subclass names its op, its momentum state key and its routing option, and
supplies ``_op_kwargs`` and the ``_owner_*`` hooks of the ownership path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ._base import MAGMA_FALLBACK_SEED_SALT, FusedOptimizer, adamw_fallback_step, is_dtensor, local, lr_tensor
from ._ownership import DistributedModeMixin, OwnershipPlan


@dataclass(frozen=True)
class MatrixDims:
    """A dimension spec (rollfast's dimension numbers): which axes of a param
    are reduction (input-feature) axes, output-feature axes and batch axes.

    The matrix step sees the param as a batch of ``(prod(output),
    prod(reduction))`` matrices (torch's ``(out, in)`` orientation; an
    ``nn.Linear`` weight is ``MatrixDims(reduction=1, output=0)``), each
    shaped on its own. Examples: a stacked ``(L, in, out)`` weight is
    ``MatrixDims(reduction=1, output=2, batch=0)``; a conv kernel ``(out, in,
    kh, kw)`` is ``MatrixDims(reduction=(1, 2, 3), output=0)`` (one matrix) or
    ``MatrixDims(reduction=1, output=0, batch=(2, 3))`` (one per tap). Axes are
    non-negative, each used once, and together ``0 .. ndim-1``.
    """

    reduction: Union[int, Sequence[int]]
    output: Union[int, Sequence[int]]
    batch: Union[int, Sequence[int]] = ()


_SpecTuple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def _axes(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, Sequence) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
        raise ValueError(f"Invalid matrix_dims: axes must be ints or sequences of ints, got {value!r}")
    return tuple(value)


def normalize_matrix_dims(spec: Any) -> _SpecTuple:
    """A spec (MatrixDims, a dict with reduction/output/batch keys, or a
    (reduction, output[, batch]) tuple) as plain tuples, validated: state_dicts
    then hold only plain data."""
    if isinstance(spec, MatrixDims):
        parts = (spec.reduction, spec.output, spec.batch)
    elif isinstance(spec, dict):
        unknown = set(spec) - {"reduction", "output", "batch"}
        if unknown or "reduction" not in spec or "output" not in spec:
            raise ValueError(
                f"Invalid matrix_dims: a dict spec needs 'reduction' and 'output' (and 'batch'), got {spec!r}"
            )
        parts = (spec["reduction"], spec["output"], spec.get("batch", ()))
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        parts = (*spec, ()) if len(spec) == 2 else tuple(spec)
    else:
        raise ValueError(
            f"Invalid matrix_dims: expected a MatrixDims, dict or (reduction, output[, batch]), got {spec!r}"
        )
    red, out, batch = (_axes(p) for p in parts)
    if not red or not out:
        raise ValueError(f"Invalid matrix_dims: reduction and output axes must not be empty, got {spec!r}")
    axes = red + out + batch
    if len(set(axes)) != len(axes):
        raise ValueError(f"Invalid matrix_dims: reduction, output and batch axes overlap in {spec!r}")
    if sorted(axes) != list(range(len(axes))):
        missing = sorted(set(range(max(axes) + 1)) - set(axes)) if min(axes) >= 0 else []
        raise ValueError(
            f"Invalid matrix_dims: the axes must be exactly 0..{len(axes) - 1} (non-negative, none missing), got "
            f"{spec!r}" + (f"; missing {missing}" if missing else "")
        )
    return red, out, batch


def _encode_spec(spec: Optional[_SpecTuple], out: list[int]) -> None:
    if spec is None:
        out.append(-1)
        return
    for axes in spec:
        out.append(len(axes))
        out.extend(axes)


class MatrixOptimizer(DistributedModeMixin, FusedOptimizer):
    _momentum_key: str = ""
    # Param-group option that routes explicitly: None (2-D params take the
    # matrix op), True (every >= 2-D param), False (the AdamW fallback).
    _route_key: str = ""
    _whole_tensor_op = True  # matrix functions need the whole matrix
    _scalar_state_keys = ("magma_score",)
    # CUDA params: step counters and Magma scores on the device; the ops read
    # them there (kernels/cuda/matrix.cu), so a step needs no host sync.
    _device_steps = True
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
        self._init_distributed_mode()
        self._local_only = False

    def _check_routing(self, group: dict[str, Any]) -> None:
        key = self._route_key
        if group[key] not in (None, True, False):
            raise ValueError(f"Invalid {key}: must be None, True or False, got {group[key]!r}")
        for p in group.get("params", ()):
            if group[key] and p.dim() < 2:
                raise ValueError(f"Invalid {key}=True: a param of shape {tuple(p.shape)} is not a matrix")

    def _check_matrix_dims(self, group: dict[str, Any]) -> None:
        """Validates ``matrix_dims`` and stores it as plain data: None, one spec
        tuple (for the group's params with that many dims), or a list of spec
        tuples / None aligned with ``group["params"]`` (from a {param: spec}
        dict)."""
        value = group.get("matrix_dims")
        if value is None:
            return
        if isinstance(value, dict) and not set(value) <= {"reduction", "output", "batch"}:
            specs = {id(p): normalize_matrix_dims(spec) for p, spec in value.items()}
            if "params" not in group:  # the constructor's defaults: checked in __init__
                return
            from_defaults = value is getattr(self, "defaults", {}).get("matrix_dims")
            ids = {id(p) for p in group["params"]}
            if not from_defaults and not set(specs) <= ids:
                raise ValueError("Invalid matrix_dims: a key of the {param: spec} dict is not a param of this group")
            per_param = [specs.get(id(p)) for p in group["params"]]
            for p, spec in zip(group["params"], per_param):
                if spec is not None and sum(map(len, spec)) != p.dim():
                    raise ValueError(
                        f"Invalid matrix_dims: the spec {spec} has {sum(map(len, spec))} axes but its param has "
                        f"shape {tuple(p.shape)}"
                    )
            group["matrix_dims"] = per_param
        elif isinstance(value, list) and "params" in group and len(value) == len(group["params"]):
            group["matrix_dims"] = [None if v is None else normalize_matrix_dims(v) for v in value]
        else:
            group["matrix_dims"] = normalize_matrix_dims(value)

    def _check_spec_keys(self) -> None:
        """A {param: spec} dict given as a default must name params of this optimizer."""
        value = self.defaults.get("matrix_dims")
        if isinstance(value, dict) and not set(value) <= {"reduction", "output", "batch"}:
            ids = {id(p) for group in self.param_groups for p in group["params"]}
            if not {id(p) for p in value} <= ids:
                raise ValueError(
                    "Invalid matrix_dims: a key of the {param: spec} dict is not a param of this optimizer"
                )

    def _spec_of(self, group: dict[str, Any], p: torch.Tensor, index: int) -> Optional[_SpecTuple]:
        value = group.get("matrix_dims")
        if isinstance(value, list):
            return value[index]
        if value is not None and sum(map(len, value)) == p.dim():
            return value
        return None

    def _is_matrix(self, group: dict[str, Any], p: torch.Tensor, index: int = 0) -> bool:
        route = group[self._route_key]
        if route is not None:
            return route
        return self._spec_of(group, p, index) is not None or p.dim() == 2

    def _adam_weight_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"]

    def _shared_op_kwargs(self) -> dict[str, Any]:
        """Op keyword arguments computed once per step over all groups."""
        return {}

    def _fallback_step(self, group: dict[str, Any]) -> Callable[..., None]:
        """The non-matrix branch's step function (AdamW; PRISM may pick NAdamW)."""
        return adamw_fallback_step

    def _prepare_group(self, group: dict[str, Any]) -> None:
        """Runs at the start of every ``_init_group`` (a hook for subclasses)."""

    # -- whole-matrix ownership (torchopt_ext/optim/_ownership.py) -----------

    def _owner_supported(self, group: dict[str, Any]) -> bool:
        """Whether this group's options can take the ownership path."""
        return True

    def _owner_momentum(self, group, grads, moments, state_steps, grad_scale):
        """The element-wise part on local data: ([per matrix, the tensors the
        owner needs], Magma sums)."""
        raise NotImplementedError(f"{type(self).__name__} must define _owner_momentum (Muon and PRISM do)")

    def _owner_compute(self, group, whole: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The matrix function on the owner: (rows, cols) inputs per matrix ->
        (rows, cols) updates."""
        raise NotImplementedError(f"{type(self).__name__} must define _owner_compute (Muon and PRISM do)")

    def _owner_result_dtype(self, group: dict[str, Any], input_dtype: torch.dtype) -> torch.dtype:
        return input_dtype

    def _owner_lr_scale(self, group: dict[str, Any]) -> str:
        return "none"

    def _ownership_plan(self, group: dict[str, Any]) -> Optional[OwnershipPlan]:
        if self._distributed_mode == "gather" or not self._owner_supported(group):
            return None
        matrices = [p for i, p in enumerate(group["params"]) if p.grad is not None and self._is_matrix(group, p, i)]
        if any(self._spec_of(group, p, i) is not None for i, p in enumerate(group["params"])):
            return None  # dimension specs (batches of matrices) take the gather path
        if self._distributed_mode == "owner" and not any(is_dtensor(p) for p in matrices):
            return None  # plain tensors: the single-process step (torch.compile sees only this)
        return OwnershipPlan.build(matrices, self._replicated_group())

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
        matrix_dims,
    ):
        self._prepare_group(group)
        unwrap, unwrap_input = self._unwrappers()
        for index, p, state in self._params_with_grad(group):
            if self._is_matrix(group, p, index):
                _encode_spec(self._spec_of(group, p, index), matrix_dims)
                if self._momentum_key not in state:
                    state[self._momentum_key] = self._new_state(p, group, self._momentum_key)
                moments.append(unwrap(state[self._momentum_key]))
                if group["use_magma"]:
                    if "magma_score" not in state:  # also when Magma is turned on later
                        state["magma_score"] = torch.full((), 0.5, dtype=torch.float32, device=self._scalar_device(p))
                    magma_scores.append(state["magma_score"])
                params.append(unwrap(p))
                grads.append(unwrap_input(p.grad))
                state_steps.append(state["step"])
            else:
                # The Magma-masked fallback needs whole-tensor cosines: it runs on
                # gathered tensors; without Magma it is element-wise on the shards.
                fb_unwrap, fb_input = FusedOptimizer._unwrappers(self) if group["use_magma"] else (local, local)
                for key, out in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
                    if key not in state:
                        state[key] = self._new_state(p, group, key)
                    out.append(fb_unwrap(state[key]))
                if group["use_magma"]:
                    if "magma_score" not in state:
                        state["magma_score"] = torch.full((), 0.5, dtype=torch.float32, device=self._scalar_device(p))
                    magma_scores_adam.append(state["magma_score"])
                params_adam.append(fb_unwrap(p))
                grads_adam.append(fb_input(p.grad))
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
        shared = self._shared_op_kwargs()
        for group in self.param_groups:
            lists = [[] for _ in range(12)]
            plan = self._ownership_plan(group)
            self._local_only = plan is not None
            try:
                self._init_group(group, *lists)
            finally:
                self._local_only = False
            params, grads, state_steps, moments, magma_scores = lists[:5]
            params_adam, grads_adam, steps_adam, exp_avgs, exp_avg_sqs, magma_scores_adam = lists[5:11]
            # The op's spec list: empty when every matrix takes the default layout.
            matrix_dims = lists[11] if any(v != -1 for v in lists[11]) else []
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
                op(
                    params,
                    grads,
                    moments,
                    magma_scores,
                    state_steps,
                    lr,
                    matrix_dims=matrix_dims,
                    **shared,
                    **self._op_kwargs(group),
                    **rounding,
                    **amp,
                )
            self._fallback_step(group)(
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
            # Gathered params / state (the gather path, the masked fallback) back to their shards.
            self._whole_tensors.write_back()
        return loss
