"""Shared plumbing of the torch.optim front ends: argument checks, tensor lr,
AMP (GradScaler) arguments, DTensor unwrapping and state dtypes."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_lr(lr: Union[float, torch.Tensor]) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError("lr: a Tensor lr must be a one-element floating tensor")
        return
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")


def check_range(name: str, value: float, low: float, high: float, high_inclusive: bool = False) -> None:
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"Invalid {name}: must be in [{low}, {high}{bracket}, got {value}")


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"Invalid {name}: must be >= 0, got {value}")


def check_state_dtype(state_dtype: Optional[torch.dtype]) -> None:
    if state_dtype is not None and state_dtype not in _STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: must be one of {_STATE_DTYPES} or None, got {state_dtype}")


def draw_seed(seed: Optional[int]) -> int:
    """The stochastic-rounding seed: the given one, else one drawn from torch's
    default generator (so torch.manual_seed makes runs repeatable)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (writes to it land in the DTensor), else t."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


class FusedOptimizer(torch.optim.Optimizer):
    """Base of torchopt_ext's torch.optim drop-ins.

    Subclasses define ``_state_keys`` (the floating state tensors besides
    ``step``), ``_init_group`` and ``step``. GradScaler hands the scale and the
    inf flag to the kernel instead of unscaling and syncing on the host.
    """

    _step_supports_amp_scaling = True
    _state_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validates a param group's options (also run for add_param_group)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    @staticmethod
    def _lr_tensor(lr: Union[float, torch.Tensor]) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            return lr
        # float64 keeps a Python float lr exact, as torch.optim uses it.
        return torch.tensor(lr, dtype=torch.float64)

    def _amp_kwargs(self) -> dict[str, Optional[torch.Tensor]]:
        return {
            "grad_scale": getattr(self, "grad_scale", None),
            "found_inf": getattr(self, "found_inf", None),
        }

    @staticmethod
    def _grad_of(p: torch.Tensor, name: str) -> torch.Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError(f"{name} does not support complex parameters")
        return grad

    @staticmethod
    def _new_state_tensor(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        dtype = group["state_dtype"] or p.dtype
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    @staticmethod
    def _new_step() -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        super().load_state_dict(state_dict)
        # Checkpoints from torch.optim lack our extra options: use the defaults.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # torch.optim casts loaded state to the param dtype, which would round
        # fp32 state of bf16 params; reload it from the checkpoint instead, in
        # the group's state_dtype.
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        params_by_id = dict(zip(saved_ids, group_of))
        for pid, saved in state_dict["state"].items():
            p = params_by_id.get(pid)
            if p is None:
                continue
            state = self.state[p]
            dtype = group_of[p]["state_dtype"] or p.dtype
            for key in self._state_keys:
                value = saved.get(key)
                if not torch.is_tensor(value):
                    continue
                if value.shape != p.shape:
                    raise ValueError(
                        f"load_state_dict: state '{key}' has shape {tuple(value.shape)} but its param has "
                        f"shape {tuple(p.shape)}; was the checkpoint saved for another model?"
                    )
                state[key] = value.to(device=p.device, dtype=dtype)
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device="cpu").reshape(())

    def _run_closure(self, closure: Optional[Callable[[], Any]]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
