"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), in the NVLAMB form of
apex FusedLAMB / timm's Lamb."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_adam_like,
    draw_seed,
    is_dtensor,
    local,
    lr_tensor,
    norm_layout,
    shard_sum_rows,
    sharded_sum_of_squares,
)


def _global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all grads as a float64 scalar, without a host sync.

    Per-tensor norms come from torch._foreach_norm in fp32 (fp64 for fp64
    grads): asking it to upcast fp32 to fp64 costs ~20x (a full copy).
    Sharded DTensor grads contribute their all-reduced sum of squares, so
    every rank gets the unsharded norm as a plain tensor.
    """
    sharded_sq = sharded_sum_of_squares(grads)
    if sharded_sq is not None:
        grads = [local(g) for g in grads if not (is_dtensor(g) and any(pl.is_shard() for pl in g.placements))]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(local(g))
    norms = []
    for dtype, group in by_dtype.items():
        accumulate = None if dtype in (torch.float32, torch.float64) else torch.float32
        norms.extend(n.to(torch.float64) for n in torch._foreach_norm(group, 2, dtype=accumulate))
    if sharded_sq is None:
        return torch.linalg.vector_norm(torch.stack(norms))
    rest = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float64)
    return (sharded_sq + rest).sqrt()


class LAMB(FusedOptimizer):
    """Drop-in for ``timm.optim.Lamb`` (same argument names and defaults).

    Per tensor: Adam ratio ``r = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps)`` (plus
    ``weight_decay * p`` unless ``decoupled_decay``), scaled by the trust ratio
    ``||p|| / ||r||`` (1 when either norm is 0; at most 1 with ``trust_clip``)
    whenever weight decay is on or ``always_adapt``. Both norms are computed in
    the fused kernel. ``max_grad_norm`` (None: off) first divides every grad by
    ``max(||all grads|| / max_grad_norm, 1)``, over all param groups, without a
    host sync. Unlike timm, ``p.grad`` is never modified.

    FSDP2 (sharded DTensors on one 1-D mesh): the step runs on the local
    shards; ``lamb_norm_sqs`` gives each shard's ||p||^2 and ||r||^2, one
    all-reduce sums them per tensor, and ``lamb_step_`` uses those whole-tensor
    norms. Other DTensor layouts, or ``opt.distributed_mode = "gather"``,
    gather the DTensors whole for the op instead.
    """

    _op = "lamb_step_"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _device_steps = True  # the CUDA kernels read and advance device counters
    distributed_mode = "shards"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: Optional[float] = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        decoupled_decay: bool = False,
        *,
        maximize: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: must be > 0 or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
            decoupled_decay=decoupled_decay,
            maximize=maximize,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_like(group)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"],
            grad_averaging=group["grad_averaging"],
            trust_clip=group["trust_clip"],
            always_adapt=group["always_adapt"],
            decoupled_decay=group["decoupled_decay"],
            maximize=group["maximize"],
            grad_divisor=self._grad_divisor,
        )

    def _init_group(self, group, params, grads, state_steps, *state_lists):
        originals = [p for p in group["params"] if p.grad is not None]
        gather = norm_layout(originals, self.distributed_mode) == "gather"
        if gather != self._gather_now:
            self._gather_now = gather
        super()._init_group(group, params, grads, state_steps, *state_lists)

    def _run_op(self, group, params, grads, state_lists, state_steps, amp) -> None:
        lr = lr_tensor(group)
        kwargs = self._op_kwargs(group)
        extra = {}
        originals = [p for p in group["params"] if p.grad is not None]
        if norm_layout(originals, self.distributed_mode) == "sharded":
            # Trust ratios need whole-tensor norms: local sums of squares, all-reduced.
            sums = torch.ops.torchopt_ext.lamb_norm_sqs(params, grads, *state_lists, state_steps, lr, **kwargs, **amp)
            extra["norm_sqs"] = shard_sum_rows(originals, sums)
        torch.ops.torchopt_ext.lamb_step_(
            params, grads, *state_lists, state_steps, lr, **self._rounding_args(group), **kwargs, **extra, **amp
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        # The global-norm clip spans every group (timm uses the optimizer-level
        # max_grad_norm), so it is computed once before the per-group ops.
        self._grad_divisor = None
        max_grad_norm = self.defaults["max_grad_norm"]
        if max_grad_norm is not None:
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                norm = _global_grad_norm(grads)
                grad_scale = getattr(self, "grad_scale", None)
                if grad_scale is not None:
                    norm = norm / grad_scale.to(norm.device)  # GradScaler: clip on unscaled grads
                self._grad_divisor = torch.clamp(norm / max_grad_norm, min=1.0)
        return super().step(closure)
