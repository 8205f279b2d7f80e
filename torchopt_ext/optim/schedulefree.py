"""Schedule-Free optimization (Defazio et al. 2024, "The Road Less Scheduled").

Three front ends over the same C++ math (``torch.ops.torchopt_ext.schedulefree_*``):

- :class:`ScheduleFreeAdamW` and :class:`ScheduleFreeSGD`: fused drop-ins for the
  ``schedulefree`` package's ``AdamWScheduleFree`` / ``SGDScheduleFree``.
- :class:`ScheduleFree`: wraps any ``torch.optim.Optimizer`` (ours or torch's).

Schedule-Free keeps three sequences: z (the base optimizer's iterate), x (the
weighted average of the z's, the point to evaluate) and y = b1 x + (1 - b1) z
(the point gradients are taken at). The params hold y while training and x
after :meth:`eval`; call ``opt.eval()`` before evaluating or checkpointing for
inference and ``opt.train()`` before training again. ``step()`` raises in eval
mode. Optimizers start in train mode (the ``schedulefree`` package starts in
eval mode and requires ``train()`` first; before the first step x = y = z, so
the two are the same apart from that check).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_lr, check_non_negative, check_range, check_state_dtype, draw_seed, local


def _check_schedule(group: dict[str, Any]) -> None:
    check_lr(group["lr"])
    check_non_negative("weight_decay value", group["weight_decay"])
    if not (isinstance(group["warmup_steps"], int) and group["warmup_steps"] >= 0):
        raise ValueError(f"Invalid warmup_steps: must be an int >= 0, got {group['warmup_steps']}")
    check_state_dtype(group["state_dtype"])


class _ScheduleFreeFused(FusedOptimizer):
    """Shared by the fused Schedule-Free optimizers: state creation, the
    train/eval switch and the eval-mode check."""

    _scalar_state_keys = ("weight_sum", "lr_max")

    # Subclasses define `_beta(group) -> float`: the b1 / momentum that mixes
    # x and z into y (used by the train/eval switch).

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "z":
            dtype = group["state_dtype"] or p.dtype
            return p.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
        if key == "weight_sum":
            return torch.zeros((), dtype=torch.float64)
        if key == "lr_max":
            # The schedulefree package starts lr_max at -1 (any lr >= 0 replaces it).
            return torch.full((), -1.0, dtype=torch.float64)
        return super()._new_state(p, group, key)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also loads the schedulefree package's checkpoints, whose step count
        and weighting scalars are per group (``k``, ``weight_sum``, ``lr_max``)
        rather than per param."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if "k" not in group:
                continue
            k, weight_sum, lr_max = group.pop("k"), group.pop("weight_sum", 0.0), group.pop("lr_max", -1.0)
            for key in ("scheduled_lr", "foreach"):
                group.pop(key, None)
            for p in group["params"]:
                state = self.state.get(p)
                if state and "z" in state and "step" not in state:
                    state["step"] = torch.tensor(float(k), dtype=torch.float32)
                    state["weight_sum"] = torch.tensor(float(weight_sum), dtype=torch.float64)
                    state["lr_max"] = torch.tensor(float(lr_max), dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}.step() called in eval mode: the params hold the averaged point x; "
                    "call optimizer.train() before training steps"
                )
        return super().step(closure)

    @torch.no_grad()
    def _set_mode(self, train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            params, zs = [], []
            for p in group["params"]:
                state = self.state.get(p)
                if state and "z" in state:
                    params.append(local(p))
                    zs.append(local(state["z"]))
            if params:
                torch.ops.torchopt_ext.schedulefree_set_mode_(params, zs, beta=self._beta(group), to_eval=not train)
            group["train_mode"] = train

    def eval(self) -> None:
        """Switches the params from y to the averaged point x (for evaluation)."""
        self._set_mode(False)

    def train(self) -> None:
        """Switches the params from x back to y (for training)."""
        self._set_mode(True)


class ScheduleFreeAdamW(_ScheduleFreeFused):
    """Fused drop-in for ``schedulefree.AdamWScheduleFree`` (same argument names
    and defaults). Per step, with k the step count and lr_k the warmed-up lr:

    ``c = (k+1)^r lr_max^weight_lr_power / sum of those weights``,
    ``v = b2 v + (1-b2) g^2``, ``d = g / (sqrt(v/(1-b2^(k+1))) + eps) + wd y``,
    ``y = lerp(y, z, c) + lr_k (b1 (1-c) - 1) d``, ``z = z - lr_k d``.

    State per param: ``z`` and ``exp_avg_sq`` (param-shaped, ``state_dtype``),
    ``step`` plus ``weight_sum`` and ``lr_max`` (float64 scalars), i.e. one buffer
    beyond AdamW's second moment, where the reference implementation keeps x, y
    and z. ``grad`` is not modified (the package overwrites it with the update
    direction). Use :meth:`eval`/:meth:`train` around evaluation; the mode is
    stored in the param groups (``train_mode``) and so in ``state_dict``.
    Extra keyword arguments ``state_dtype``, ``stochastic_rounding`` and ``seed``
    as in :class:`torchopt_ext.optim.Adam`; math is fp32 for bf16/fp16 storage.
    """

    _op = "schedulefree_adamw_step_"
    _state_keys = ("z", "exp_avg_sq", "weight_sum", "lr_max")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            train_mode=True,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_schedule(group)
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: expected two values, got {betas}")
        # beta1 = 0 would divide by zero in eval() (x = (y - (1-b1) z) / b1).
        if not 0.0 < betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0 (betas[0]): must be in (0, 1), got {betas[0]}")
        check_range("beta parameter at index 1 (betas[1])", betas[1], 0.0, 1.0)
        check_non_negative("epsilon value (eps)", group["eps"])

    def _beta(self, group: dict[str, Any]) -> float:
        return group["betas"][0]

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            warmup_steps=group["warmup_steps"],
            r=group["r"],
            weight_lr_power=group["weight_lr_power"],
        )


class ScheduleFreeSGD(_ScheduleFreeFused):
    """Fused drop-in for ``schedulefree.SGDScheduleFree`` (same argument names
    and defaults): as :class:`ScheduleFreeAdamW` with ``d = g + wd y`` and
    ``momentum`` in place of b1. State per param: ``z`` (one param-sized buffer),
    ``step``, ``weight_sum`` and ``lr_max``.
    """

    _op = "schedulefree_sgd_step_"
    _state_keys = ("z", "weight_sum", "lr_max")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            train_mode=True,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding),
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        _check_schedule(group)
        if not 0.0 < group["momentum"] < 1.0:
            raise ValueError(f"Invalid momentum: must be in (0, 1), got {group['momentum']}")

    def _beta(self, group: dict[str, Any]) -> float:
        return group["momentum"]

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            warmup_steps=group["warmup_steps"],
            r=group["r"],
            weight_lr_power=group["weight_lr_power"],
        )


_WEIGHTING_MODES = ("theoretical", "practical", "schedulet", "power")


class ScheduleFree(torch.optim.Optimizer):
    """Schedule-Free wrapper around any optimizer (rollfast.md §4.2).

    The base optimizer steps z: before its step the params are set to z (its
    update delta is taken at the gradient of y), after it the params become
    ``y = b1 x + (1 - b1) z`` with ``x = (1 - c) x + c z``. The weight of step k
    (``gamma`` is the base group's current ``lr``, ``lr_max`` its running max):

    - ``"practical"`` (default): ``gamma^weight_lr_power``, or
      ``lr_max^weight_lr_power`` with ``use_lr_max=True``;
    - ``"power"``: ``lr_max^weight_lr_power``;
    - ``"schedulet"``: ``gamma`` (or ``lr_max``);
    - ``"theoretical"``: 1 (a plain running mean of z);

    times ``(k+1)^r``; ``c = w / sum(w)``, and ``c = 1`` for the first
    ``c_warmup`` steps. The schedulefree package's ``ScheduleFreeWrapper``
    always weights with ``lr_max^2``, i.e. ``"practical"`` with
    ``use_lr_max=True``; the default here follows rollfast and weights by the
    *current* lr squared, so steps taken at a decayed lr count less.
    ``b1_anneal_steps > 0`` moves ``1 - b1`` log-linearly to ``1 - b1_max``.
    ``weight_decay_at_y`` (the package's) and ``adamc_weight_decay`` (AdamC:
    ``z -= lr^2 * lambda * y``) decay z towards zero at y; give the base
    optimizer no weight decay of its own when using them.

    Memory: one extra param-sized buffer per param (``z``, in ``state_dtype``
    or the param's dtype); the base optimizer's state is unchanged. The base
    optimizer steps z in the param itself, so with bf16/fp16 params z is
    rounded to the param dtype once per step whatever ``state_dtype`` is
    (the package's wrapper does the same); the fused optimizers do not have
    this limit. ``param_groups``
    are the base optimizer's, so LR schedulers may be attached to either.
    :meth:`eval` / :meth:`train` switch the params between x and y; the mode
    and the per-group scalars (k, weight sum, lr_max, current b1) are in
    ``state_dict``. The math runs in C++ (``torch.ops.torchopt_ext.schedulefree_wrapper_pre_``
    / ``_post_``), shared with ``torchopt_ext::optim::ScheduleFree``.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        b1: float = 0.9,
        weighting_mode: str = "practical",
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        use_lr_max: bool = False,
        c_warmup: int = 0,
        b1_anneal_steps: int = 0,
        b1_max: float = 0.965,
        weight_decay_at_y: float = 0.0,
        adamc_weight_decay: float = 0.0,
        state_dtype: Optional[torch.dtype] = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if not isinstance(weighting_mode, str) or weighting_mode.lower() not in _WEIGHTING_MODES:
            raise ValueError(
                f"Invalid weighting_mode: must be one of {_WEIGHTING_MODES} (any case), got {weighting_mode!r}"
            )
        if not 0.0 < b1 <= 1.0:
            raise ValueError(f"Invalid b1: must be in (0, 1], got {b1}")
        if not 0.0 < b1_max <= 1.0:
            raise ValueError(f"Invalid b1_max: must be in (0, 1], got {b1_max}")
        if b1_anneal_steps and (b1 >= 1.0 or b1_max >= 1.0):
            raise ValueError("Invalid b1/b1_max: must be < 1 when b1_anneal_steps > 0")
        for name, value in (("c_warmup", c_warmup), ("b1_anneal_steps", b1_anneal_steps)):
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"Invalid {name}: must be an int >= 0, got {value}")
        check_non_negative("weight_decay_at_y", weight_decay_at_y)
        check_non_negative("adamc_weight_decay", adamc_weight_decay)
        check_state_dtype(state_dtype)
        self.base_optimizer = base_optimizer
        self.train_mode = True
        defaults = dict(
            b1=b1,
            weighting_mode=weighting_mode.lower(),
            r=r,
            weight_lr_power=weight_lr_power,
            use_lr_max=use_lr_max,
            c_warmup=c_warmup,
            b1_anneal_steps=b1_anneal_steps,
            b1_max=b1_max,
            weight_decay_at_y=weight_decay_at_y,
            adamc_weight_decay=adamc_weight_decay,
            state_dtype=state_dtype,
        )
        # torch.optim.Optimizer.__init__ sets up the hooks; the groups stay the
        # base optimizer's (see the param_groups property), so it is given none.
        self._initializing = True
        super().__init__([{"params": []}], defaults)
        self._initializing = False

    # The base optimizer's groups, so schedulers and add_param_group reach it.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not getattr(self, "_initializing", False):
            raise AttributeError("ScheduleFree.param_groups are the base optimizer's; change those instead")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._initializing:
            return
        self.base_optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def _sf_state(self, group: dict[str, Any]) -> torch.Tensor:
        if "sf_state" not in group:
            # [k, weight sum, lr_max, b1 used to form y]
            group["sf_state"] = torch.tensor([0.0, 0.0, 0.0, self.defaults["b1"]], dtype=torch.float64)
        return group["sf_state"]

    def _active(self, group: dict[str, Any], create: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, zs = [], []
        for p in group["params"]:
            if create and p.grad is None:
                continue
            state = self.state[p] if create else self.state.get(p, {})
            if "z" not in state:
                if not create:
                    continue
                dtype = self.defaults["state_dtype"] or p.dtype
                state["z"] = p.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
            params.append(local(p))
            zs.append(local(state["z"]))
        return params, zs

    @staticmethod
    def _lr_tensor(group: dict[str, Any]) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr.detach().to(device="cpu", dtype=torch.float64).reshape(())
        return torch.tensor(lr, dtype=torch.float64)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if not self.train_mode:
            raise RuntimeError(
                "ScheduleFree.step() called in eval mode: the params hold the averaged point x; "
                "call optimizer.train() before training steps"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        opts = self.defaults
        ops = torch.ops.torchopt_ext
        pending = []
        for group in self.param_groups:
            params, zs = self._active(group, create=True)
            lr = self._lr_tensor(group)
            sf_state = self._sf_state(group)
            ops.schedulefree_wrapper_pre_(
                params,
                zs,
                sf_state,
                lr,
                weight_decay_at_y=opts["weight_decay_at_y"],
                adamc_weight_decay=opts["adamc_weight_decay"],
            )
            pending.append((params, zs, sf_state, lr))
        self.base_optimizer.step()
        for params, zs, sf_state, lr in pending:
            ops.schedulefree_wrapper_post_(
                params,
                zs,
                sf_state,
                lr,
                weighting_mode=opts["weighting_mode"],
                b1=opts["b1"],
                r=opts["r"],
                weight_lr_power=opts["weight_lr_power"],
                use_lr_max=opts["use_lr_max"],
                c_warmup=opts["c_warmup"],
                b1_anneal_steps=opts["b1_anneal_steps"],
                b1_max=opts["b1_max"],
            )
        return loss

    @torch.no_grad()
    def _set_mode(self, train: bool) -> None:
        if self.train_mode == train:
            return
        for group in self.param_groups:
            params, zs = self._active(group, create=False)
            if params:
                beta = max(float(group["sf_state"][3]), 1e-8)
                torch.ops.torchopt_ext.schedulefree_set_mode_(params, zs, beta=beta, to_eval=not train)
        self.train_mode = train

    def eval(self) -> None:
        """Switches the params from y to the averaged point x (for evaluation)."""
        self._set_mode(False)

    def train(self) -> None:
        """Switches the params from x back to y (for training)."""
        self._set_mode(True)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state_dict (whose param_groups carry ``sf_state``),
        each param's ``z`` by its index in the groups, the mode and the options."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        zs = {index[p]: s["z"] for p, s in self.state.items() if "z" in s and p in index}
        return {
            "base": self.base_optimizer.state_dict(),
            "z": zs,
            "train_mode": self.train_mode,
            "options": dict(self.defaults),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict["base"])
        params = [p for g in self.param_groups for p in g["params"]]
        self.state.clear()
        for i, z in state_dict["z"].items():
            p = params[i]
            if z.shape != p.shape:
                raise ValueError(f"load_state_dict: z of param {i} has shape {tuple(z.shape)}, param {tuple(p.shape)}")
            dtype = self.defaults["state_dtype"] or p.dtype
            self.state[p]["z"] = z.detach().to(device=p.device, dtype=dtype, copy=True)
        for group in self.param_groups:
            if "sf_state" in group:
                group["sf_state"] = group["sf_state"].detach().to(device="cpu", dtype=torch.float64).clone()
        self.defaults.update(state_dict.get("options", {}))
        self.train_mode = bool(state_dict["train_mode"])


def schedule_free_adamw(
    params: Iterable[Any],
    lr: float,
    total_steps: int,
    warmup_fraction: float = 0.1,
    decay_fraction: float = 0.1,
    weighting_mode: str = "practical",
    sf_b1: float = 0.9,
    state_dtype: Optional[torch.dtype] = None,
    b1: Optional[float] = None,
    b2: Optional[float] = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    use_adamc: bool = False,
    **wsd_options: Any,
) -> tuple[ScheduleFree, Any]:
    """rollfast's ``schedule_free_adam`` for torch: Schedule-Free around AdamW
    with one WSD schedule driving both the step size and the averaging weights.

    Returns ``(optimizer, scheduler)``: a :class:`ScheduleFree` wrapping
    ``torchopt_ext.optim.AdamW(params, lr, betas=(b1, b2), eps)`` (``b1``
    defaults to 0.0 and ``b2`` to 0.999, as rollfast's: the averaging replaces
    momentum), and a :class:`torchopt_ext.schedules.WSD` on it with
    ``total_steps``, ``warmup_fraction`` and ``decay_fraction`` (plus any
    other ``WSD`` option in ``wsd_options``). Call ``scheduler.step()`` after
    each ``optimizer.step()``. With the default ``"practical"`` weighting each
    step's weight is its scheduled lr squared, so the WSD decay also fades the
    average. ``weight_decay`` acts at y, inside the step (rollfast's
    ``add_decayed_weights``), or as AdamC (``z -= lr^2 * wd * y``) with
    ``use_adamc=True``. ``sf_b1`` is the interpolation's beta.
    """
    from ..schedules import WSD
    from .adamw import AdamW

    betas = (0.0 if b1 is None else b1, 0.999 if b2 is None else b2)
    base = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, state_dtype=state_dtype)
    optimizer = ScheduleFree(
        base,
        b1=sf_b1,
        weighting_mode=weighting_mode,
        weight_decay_at_y=0.0 if use_adamc else weight_decay,
        adamc_weight_decay=weight_decay if use_adamc else 0.0,
        state_dtype=state_dtype,
    )
    scheduler = WSD(optimizer, total_steps, warmup_fraction, decay_fraction, **wsd_options)
    return optimizer, scheduler
