"""Warmup-stable-decay (WSD) learning-rate schedule (rollfast's ``wsd_schedule``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.optim.lr_scheduler import LRScheduler


class WSD(LRScheduler):
    """Warmup, then a constant peak, then a decay to ``final_lr_ratio * peak``.

    Each param group's lr at construction is its peak. At 0-based step count k,
    with T = total_steps, T_w warmup steps and T_d decay steps:

    - ``k <= T_w``: ``peak * shape((k + 1) / (T_w + 1))`` (so step 0 is already
      above zero, and ``k = T_w`` reaches the peak);
    - ``k > T - T_d``: ``peak * (r + (1 - r) * (1 - shape(x)))`` with
      ``x = (k - (T - T_d)) / max(T_d - 1, 1)``, reaching ``r = final_lr_ratio``
      at the last step ``k = T - 1`` and holding it afterwards;
    - otherwise ``peak``.

    ``T_w = warmup_steps`` if given, else ``int(T * warmup_fraction)``; the same
    for the decay. Shapes (per phase, any case): ``"linear"`` x, ``"cosine"``
    (1 - cos(pi x)) / 2, ``"power"`` x**p (``warmup_power`` / ``decay_power``)
    and ``"exponential"`` expm1(a x) / expm1(a) with a = ``exponential_rate``.

    The factor is computed by the same C++ function the LibTorch scheduler
    ``torchopt_ext::schedules::WSD`` uses (op ``torchopt_ext::wsd_lr_factor``).
    Works with float and tensor lrs, like torch's schedulers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.1,
        decay_fraction: float = 0.1,
        warmup_shape: str = "linear",
        decay_shape: str = "linear",
        final_lr_ratio: float = 0.0,
        *,
        warmup_steps: Optional[int] = None,
        decay_steps: Optional[int] = None,
        warmup_power: float = 1.0,
        decay_power: float = 1.0,
        exponential_rate: float = 5.0,
        last_epoch: int = -1,
    ) -> None:
        self.total_steps = total_steps
        self.warmup_fraction = float(warmup_fraction)
        self.decay_fraction = float(decay_fraction)
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.warmup_shape = warmup_shape
        self.decay_shape = decay_shape
        self.final_lr_ratio = float(final_lr_ratio)
        self.warmup_power = float(warmup_power)
        self.decay_power = float(decay_power)
        self.exponential_rate = float(exponential_rate)
        # The C++ side validates every option (ValueError naming it) before
        # torch's base class sets the first lr.
        for name in ("total_steps", "warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value is None or isinstance(value, int)):
                raise ValueError(f"Invalid {name}: must be an int, got {value!r}")
        for name in ("warmup_shape", "decay_shape"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Invalid {name}: must be a str, got {getattr(self, name)!r}")
        self.lr_factor(0)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the peak lr at 0-based step count ``step``."""
        return torch.ops.torchopt_ext.wsd_lr_factor(
            int(step),
            total_steps=self.total_steps,
            warmup_fraction=self.warmup_fraction,
            decay_fraction=self.decay_fraction,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
            warmup_shape=self.warmup_shape,
            decay_shape=self.decay_shape,
            final_lr_ratio=self.final_lr_ratio,
            warmup_power=self.warmup_power,
            decay_power=self.decay_power,
            exponential_rate=self.exponential_rate,
        )

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
