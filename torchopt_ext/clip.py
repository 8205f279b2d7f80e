"""Spike protection for any optimizer (rollfast.md §2.3 steps 1 and 6, §3.3
step 1), on the clipping core PRISM uses (``csrc/common/clipping.cpp``).

- :func:`raw_global_grad_clip_`: the global L2 norm of all gradients; above
  ``max_norm`` every gradient is scaled by ``max_norm / (norm + tiny)``.
  Returns the spike flag as a 0-d bool tensor on the gradients' device: no
  host sync.
- :class:`SpikeGuard`: wraps an optimizer; ``permissive=True`` clips and
  steps, ``permissive=False`` (strict) skips the whole step on a spike.

Strict mode without a host sync: optimizers that take GradScaler's
``found_inf`` (``_step_supports_amp_scaling``: every torchopt_ext optimizer,
and torch's ``fused=True`` ones) are handed the spike flag as ``found_inf``,
so the op itself leaves params, state and step counters untouched. Any other
optimizer (torch's foreach/for-loop ones, :class:`torchopt_ext.optim.ScheduleFree`)
needs the flag on the host: ``SpikeGuard`` then reads it (one sync; free for
CPU tensors), which is the pattern to use by hand too::

    spike = torchopt_ext.clip.raw_global_grad_clip_(model.parameters(), 1.0)
    if not spike:          # host read
        optimizer.step()

With ``torch.amp.GradScaler``: call ``scaler.unscale_(optimizer)`` first so
the norm is of the true gradients, and use the permissive mode (GradScaler
owns ``found_inf`` during its own ``step``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .optim._base import is_dtensor, local, sharded_sum_of_squares

__all__ = ["raw_global_grad_clip_", "SpikeGuard"]


def _grads(params: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for p in params:
        if isinstance(p, dict):  # a param group
            out.extend(_grads(p["params"]))
        elif p.grad is not None:
            out.append(p.grad)
    return out


def raw_global_grad_clip_(params: Iterable[Any], max_norm: float) -> torch.Tensor:
    """Clips the gradients of ``params`` (tensors or param groups) in place to
    a global L2 norm of ``max_norm`` when they exceed it (a NaN norm is no
    spike) and returns the spike flag (0-d bool tensor, no host sync).
    Gradients must share one device. DTensor gradients (FSDP2) are clipped
    shard by shard with the norm of the whole gradients: the shards' sums of
    squares are all-reduced over their 1-D mesh (replicated and plain
    gradients count once), so every rank takes the same decision."""
    grads = _grads(params)
    if not any(is_dtensor(g) for g in grads):
        return torch.ops.torchopt_ext.raw_global_grad_clip_(grads, float(max_norm))
    total = sharded_sum_of_squares(grads)
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    sharded = [g for g in grads if is_dtensor(g) and any(pl.is_shard() for pl in g.placements)]
    for g in grads:
        if not any(g is s for s in sharded):
            total = total + torch.linalg.vector_norm(local(g), dtype=torch.float64).square()
    shards = [local(g) for g in grads]
    return torch.ops.torchopt_ext.raw_global_grad_clip_(shards, float(max_norm), total.to(shards[0].device))


class SpikeGuard:
    """Wraps ``optimizer``: every :meth:`step` first clips the gradients of all
    its param groups to a global L2 norm of ``max_norm``; on a spike (norm >
    ``max_norm``) ``permissive=True`` steps with the clipped gradients, and
    ``permissive=False`` skips the step (on the device through ``found_inf``
    when the optimizer supports it, else after a host read of the flag).

    ``spike`` (0-d bool tensor) is the last step's flag and ``num_spikes`` a
    running count kept on the device. ``param_groups``, ``state``,
    ``zero_grad``, ``state_dict`` and ``load_state_dict`` are the optimizer's,
    so LR schedulers attach to ``guard.optimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float, permissive: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(max_norm, (int, float)) and max_norm > 0 and max_norm != float("inf")):
            raise ValueError(f"Invalid max_norm: must be a finite number > 0, got {max_norm}")
        self.optimizer = optimizer
        self.max_norm = float(max_norm)
        self.permissive = bool(permissive)
        self.spike: Optional[torch.Tensor] = None
        self.num_spikes = torch.zeros((), dtype=torch.int64)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def _device_skip(self) -> bool:
        opt = self.optimizer
        if not getattr(opt, "_step_supports_amp_scaling", False):
            return False
        if getattr(opt, "found_inf", None) is not None:
            raise RuntimeError(
                "SpikeGuard(permissive=False): the optimizer already has a found_inf (GradScaler's); "
                "use permissive=True with GradScaler"
            )
        return True

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spike = raw_global_grad_clip_(self.optimizer.param_groups, self.max_norm)
        self.spike = spike
        self.num_spikes = self.num_spikes.to(spike.device) + spike.to(torch.int64)
        if self.permissive:
            self.optimizer.step()
        elif self._device_skip():
            opt = self.optimizer
            opt.found_inf = spike.to(torch.float32)
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif not bool(spike):  # host read: the optimizer cannot skip by itself
            self.optimizer.step()
        return loss
