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

import inspect
import math
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
    _device_steps = True  # weight_sum / lr_max live with the counter (advanced by the CUDA kernel)

    # Subclasses define `_beta(group) -> float`: the b1 / momentum that mixes
    # x and z into y (used by the train/eval switch).

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "z":
            dtype = group["state_dtype"] or p.dtype
            return p.detach().to(dtype=dtype, copy=True, memory_format=torch.preserve_format)
        if key == "weight_sum":
            return torch.zeros((), dtype=torch.float64, device=self._scalar_device(p))
        if key == "lr_max":
            # The schedulefree package starts lr_max at -1 (any lr >= 0 replaces it).
            return torch.full((), -1.0, dtype=torch.float64, device=self._scalar_device(p))
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
                    device = self._scalar_device(p)
                    state["step"] = torch.tensor(float(k), dtype=torch.float32, device=device)
                    state["weight_sum"] = torch.tensor(float(weight_sum), dtype=torch.float64, device=device)
                    state["lr_max"] = torch.tensor(float(lr_max), dtype=torch.float64, device=device)

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
    ``b1_anneal_steps > 0`` moves ``1 - b1`` log-linearly to ``1 - b1_max``
    (``frac = min((k+1) / b1_anneal_steps, 1)``). ``lr_max`` starts at
    ``lr_max_init`` (rollfast's 1e-8).

    Schedule-Free+ Polyak scalar (``polyak=True``; rollfast.md §4.2 step 3):
    ``rho = max(0, f - polyak_f_star + (b1_next / b1_prev) <g, z - y>) /
    max(g1, polyak_eps)`` with ``f`` the loss at y (from ``step(closure)`` or
    ``step(loss=...)``), ``g1`` the bias-corrected EMA (``polyak_beta``) of
    ``sqrt(pi/2) ||g||_1``, both sums over every param of the wrapper. The
    step then uses ``gamma_eff = rho * gamma`` everywhere: the base optimizer
    steps with its groups' lr scaled by rho for this step (so
    ``z_{k+1} = z_k + rho * delta_k`` exactly when the base update is linear in
    lr, as for every optimizer here and in torch.optim), and ``lr_max``, the
    weights and AdamC use ``gamma_eff``. The Polyak state
    ``[g1 EMA, count, rho]`` is in ``state_dict``. ``rho`` is read on the host
    to scale the lr (CPU tensors: no device sync).
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
        *,
        lr_max_init: float = 1e-8,
        polyak: bool = False,
        polyak_beta: float = 0.0,
        polyak_f_star: float = 0.0,
        polyak_eps: float = 1e-30,
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
        check_non_negative("lr_max_init", lr_max_init)
        check_range("polyak_beta", polyak_beta, 0.0, 1.0)
        if not polyak_eps > 0:
            raise ValueError(f"Invalid polyak_eps: must be > 0, got {polyak_eps}")
        if not math.isfinite(polyak_f_star):
            raise ValueError(f"Invalid polyak_f_star: must be finite, got {polyak_f_star}")
        self.base_optimizer = base_optimizer
        self.train_mode = True
        # [g1 EMA, count, rho] of the Polyak scalar (SF+).
        self.polyak_state = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
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
            lr_max_init=lr_max_init,
            polyak=polyak,
            polyak_beta=polyak_beta,
            polyak_f_star=polyak_f_star,
            polyak_eps=polyak_eps,
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
            lr_max = self.defaults.get("lr_max_init", 0.0)
            group["sf_state"] = torch.tensor([0.0, 0.0, lr_max, self.defaults["b1"]], dtype=torch.float64)
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

    def _polyak_rho(self, loss: Any, active: list) -> float:
        """Runs the Polyak op over every active param and returns rho."""
        if loss is None:
            raise ValueError("ScheduleFree(polyak=True).step() needs the loss: pass a closure or loss=")
        opts = self.defaults
        loss_t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss), dtype=torch.float64)
        params = [p for ps, _ in active for p in ps]
        zs = [z for _, zs in active for z in zs]
        # The same params, in the same order, as _active(create=True) took.
        grads = [local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.ops.torchopt_ext.schedulefree_polyak_(
            params,
            grads,
            zs,
            self.polyak_state,
            loss_t.to(device="cpu").reshape(()),
            self._sf_state(self.param_groups[0]),
            b1=opts["b1"],
            b1_anneal_steps=opts["b1_anneal_steps"],
            b1_max=opts["b1_max"],
            f_star=opts["polyak_f_star"],
            polyak_beta=opts["polyak_beta"],
            polyak_eps=opts["polyak_eps"],
        )
        return float(self.polyak_state[2])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, loss: Any = None) -> Any:
        """One step. With ``polyak=True`` the loss at y is needed: from
        ``closure`` or the ``loss`` argument (a float or one-element tensor)."""
        if not self.train_mode:
            raise RuntimeError(
                "ScheduleFree.step() called in eval mode: the params hold the averaged point x; "
                "call optimizer.train() before training steps"
            )
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        opts = self.defaults
        ops = torch.ops.torchopt_ext
        active = [self._active(group, create=True) for group in self.param_groups]
        rho = self._polyak_rho(loss, active) if opts.get("polyak") else None
        pending = []
        for group, (params, zs) in zip(self.param_groups, active):
            lr = self._lr_tensor(group)
            if rho is not None:
                lr = lr * rho
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
        if rho is None:
            self.base_optimizer.step()
        else:
            # gamma_eff = rho * gamma for the base step too; restored after.
            saved = [group["lr"] for group in self.param_groups]
            for group in self.param_groups:
                group["lr"] = group["lr"] * rho
            try:
                self.base_optimizer.step()
            finally:
                for group, lr in zip(self.param_groups, saved):
                    group["lr"] = lr
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
            "polyak_state": self.polyak_state.clone(),
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
        if "polyak_state" in state_dict:
            self.polyak_state = state_dict["polyak_state"].detach().to(device="cpu", dtype=torch.float64).clone()


def _inherit(value: Optional[bool], schedule_free_plus: bool) -> bool:
    """rollfast's SF+ knobs: None means "as schedule_free_plus"."""
    return schedule_free_plus if value is None else bool(value)


def schedule_free_with_wsd(
    base: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.1,
    decay_fraction: float = 0.1,
    weighting_mode: str = "practical",
    sf_b1: float = 0.9,
    state_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 0.0,
    *,
    schedule_free_plus: bool = False,
    sf_r: float = 0.0,
    sf_c_warmup: int = 0,
    sf_weight_lr_power: float = 2.0,
    sf_use_lr_max: Optional[bool] = None,
    polyak: Optional[bool] = None,
    use_adamc: Optional[bool] = None,
    sf_b1_anneal_steps: int = 0,
    sf_b1_max: float = 0.965,
    polyak_beta: float = 0.0,
    polyak_f_star: float = 0.0,
    lr_max_init: float = 1e-8,
    **wsd_options: Any,
) -> tuple[ScheduleFree, Any]:
    """The part rollfast's convenience wrappers share (rollfast.md §4.4):
    :class:`ScheduleFree` around ``base`` (built with no weight decay of its
    own and its groups at their peak lrs) plus one
    :class:`torchopt_ext.schedules.WSD` on the base's groups, so the schedule
    drives the step size of every group and, through each group's lr, the
    averaging weights. ``weight_decay`` acts at y (rollfast's
    ``add_decayed_weights``: ``lr_group * wd * y`` per step) or, with
    ``use_adamc``, as AdamC (``lr_group^2 * wd * y``). SF+ knobs:
    ``sf_use_lr_max``, ``polyak`` and ``use_adamc`` default to
    ``schedule_free_plus``. Returns ``(optimizer, scheduler)``; call
    ``scheduler.step()`` after each ``optimizer.step()``."""
    from ..schedules import WSD

    adamc = _inherit(use_adamc, schedule_free_plus)
    optimizer = ScheduleFree(
        base,
        b1=sf_b1,
        weighting_mode=weighting_mode,
        r=sf_r,
        weight_lr_power=sf_weight_lr_power,
        use_lr_max=_inherit(sf_use_lr_max, schedule_free_plus),
        c_warmup=sf_c_warmup,
        b1_anneal_steps=sf_b1_anneal_steps,
        b1_max=sf_b1_max,
        weight_decay_at_y=0.0 if adamc else weight_decay,
        adamc_weight_decay=weight_decay if adamc else 0.0,
        state_dtype=state_dtype,
        lr_max_init=lr_max_init,
        polyak=_inherit(polyak, schedule_free_plus),
        polyak_beta=polyak_beta,
        polyak_f_star=polyak_f_star,
    )
    scheduler = WSD(optimizer, total_steps, warmup_fraction, decay_fraction, **wsd_options)
    return optimizer, scheduler


_SF_PLUS_KNOBS = (
    "schedule_free_plus",
    "sf_r",
    "sf_c_warmup",
    "sf_weight_lr_power",
    "sf_use_lr_max",
    "polyak",
    "use_adamc",
    "sf_b1_anneal_steps",
    "sf_b1_max",
    "polyak_beta",
    "polyak_f_star",
)


def _split_knobs(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SF+ knobs, the rest: WSD options)."""
    knobs = {k: options.pop(k) for k in _SF_PLUS_KNOBS if k in options}
    return knobs, options


def _split_base_options(
    options: dict[str, Any], wrapper: str, base_name: str, forbidden: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(SF+ knobs, WSD options, the base optimizer's options) of a convenience
    wrapper's keyword arguments; the base options it sets itself are refused."""
    from ..schedules import WSD

    knobs, rest = _split_knobs(dict(options))
    wsd_names = set(inspect.signature(WSD.__init__).parameters) - {"self", "optimizer"}
    wsd_options = {k: rest.pop(k) for k in list(rest) if k in wsd_names}
    for name in forbidden:
        if name in rest:
            raise TypeError(f"{wrapper}() sets {base_name}'s {name!r} itself")
    return knobs, wsd_options, rest


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
    **options: Any,
) -> tuple[ScheduleFree, Any]:
    """rollfast's ``schedule_free_adam`` for torch: Schedule-Free around AdamW
    with one WSD schedule driving both the step size and the averaging weights.

    Returns ``(optimizer, scheduler)``: a :class:`ScheduleFree` wrapping
    ``torchopt_ext.optim.AdamW(params, lr, betas=(b1, b2), eps)`` (``b1``
    defaults to 0.0 and ``b2`` to 0.999, as rollfast's: the averaging replaces
    momentum; 0.9 / 0.95 with ``schedule_free_plus=True``), and a
    :class:`torchopt_ext.schedules.WSD` on it with ``total_steps``,
    ``warmup_fraction`` and ``decay_fraction``. Call ``scheduler.step()`` after
    each ``optimizer.step()``. With the default ``"practical"`` weighting each
    step's weight is its scheduled lr squared, so the WSD decay also fades the
    average. ``weight_decay`` acts at y, inside the step (rollfast's
    ``add_decayed_weights``), or as AdamC (``z -= lr^2 * wd * y``) with
    ``use_adamc=True``. ``sf_b1`` is the interpolation's beta; ``lr_max``
    starts at ``eps`` (rollfast). Keyword-only extras: the SF+ knobs of
    :func:`schedule_free_with_wsd` (``schedule_free_plus``, ``sf_r``,
    ``sf_c_warmup``, ``sf_weight_lr_power``, ``sf_use_lr_max``, ``polyak``,
    ``use_adamc``, ``sf_b1_anneal_steps``, ``sf_b1_max``, ``polyak_beta``,
    ``polyak_f_star``) and any other ``WSD`` option.
    """
    from .adamw import AdamW

    knobs, wsd_options = _split_knobs(dict(options))
    plus = knobs.get("schedule_free_plus", False)
    betas = (
        (0.9 if plus else 0.0) if b1 is None else b1,
        (0.95 if plus else 0.999) if b2 is None else b2,
    )
    base = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0, state_dtype=state_dtype)
    return schedule_free_with_wsd(
        base,
        total_steps,
        warmup_fraction,
        decay_fraction,
        weighting_mode,
        sf_b1,
        state_dtype,
        weight_decay,
        lr_max_init=eps,
        **knobs,
        **wsd_options,
    )


def schedule_free_prism(
    params: Iterable[Any],
    lr: float,
    total_steps: int,
    warmup_fraction: float = 0.1,
    decay_fraction: float = 0.1,
    weighting_mode: str = "practical",
    sf_b1: float = 0.9,
    state_dtype: Optional[torch.dtype] = None,
    prism_b1: float = 0.0,
    weight_decay: float = 0.0,
    adam_lr: Optional[float] = None,
    adam_b1: Optional[float] = None,
    adam_b2: Optional[float] = None,
    adam_eps: float = 1e-8,
    **options: Any,
) -> tuple[ScheduleFree, Any]:
    """rollfast's ``schedule_free_prism`` (rollfast.md §4.4): Schedule-Free
    around :class:`torchopt_ext.optim.PRISM` (``b1=prism_b1=0``,
    ``nesterov=False``, no Magma; with b1 = 0, D = 0 and the shaping is
    NS(g)) with WSD driving the step sizes and the averaging weights.

    ``params`` is split into two base groups: the 2-D params (PRISM, peak lr
    ``lr``) and the others (AdamW fallback, peak lr ``adam_lr`` or ``lr``,
    betas ``(adam_b1, adam_b2)`` defaulting to (0.0, 0.999), or (0.9, 0.95)
    with ``schedule_free_plus=True``): the WSD scheduler scales each group from
    its own peak, so the fallback runs on its own WSD, and the wrapper weights
    and decays each group with its own lr, as rollfast's dual schedule does.
    ``weight_decay`` acts at y (or AdamC with ``use_adamc``); ``state_dtype``
    is z's and the PRISM momentum's. Other keyword arguments: PRISM options
    (``gamma``, ``ns_iters``, ``ns_coeffs``, ``mode``, ``grad_clip_max_amps``,
    ``raw_global_grad_clip``, ``permissive_spike_protection``, ...), the SF+
    knobs of :func:`schedule_free_with_wsd` and WSD options.
    """
    from .prism import PRISM

    knobs, wsd_options, rest = _split_base_options(
        options,
        "schedule_free_prism",
        "PRISM",
        ("b1", "nesterov", "use_magma", "adam_betas", "adam_lr", "lr", "weight_decay"),
    )
    plus = knobs.get("schedule_free_plus", False)
    params = list(params)
    if params and isinstance(params[0], dict):
        raise TypeError("schedule_free_prism() takes a flat iterable of params (it builds the groups itself)")
    matrices = [p for p in params if p.dim() == 2]
    others = [p for p in params if p.dim() != 2]
    adam_peak = lr if adam_lr is None else adam_lr
    groups = []
    if matrices:
        groups.append({"params": matrices, "lr": lr, "use_prism": None})
    if others:
        # A group of its own at its own peak lr: the fallback's WSD and SF weights.
        groups.append({"params": others, "lr": adam_peak, "use_prism": False, "adam_lr_ratio": 1.0})
    base = PRISM(
        groups,
        lr=lr,
        b1=prism_b1,
        nesterov=False,
        weight_decay=0.0,
        mu_dtype=state_dtype,
        adam_betas=(
            (0.9 if plus else 0.0) if adam_b1 is None else adam_b1,
            (0.95 if plus else 0.999) if adam_b2 is None else adam_b2,
        ),
        adam_eps=adam_eps,
        **rest,
    )
    return schedule_free_with_wsd(
        base,
        total_steps,
        warmup_fraction,
        decay_fraction,
        weighting_mode,
        sf_b1,
        state_dtype,
        weight_decay,
        **knobs,
        **wsd_options,
    )


def schedule_free_kron(
    params: Iterable[Any],
    lr: float,
    total_steps: int,
    warmup_fraction: float = 0.1,
    decay_fraction: float = 0.1,
    weighting_mode: str = "practical",
    sf_b1: float = 0.9,
    state_dtype: Optional[torch.dtype] = None,
    weight_decay: float = 0.0,
    **options: Any,
) -> tuple[ScheduleFree, Any]:
    """rollfast's ``schedule_free_kron`` (rollfast.md §4.4): Schedule-Free
    around :class:`torchopt_ext.optim.Kron` (``b1=0``, ``whiten_grad=True``,
    no Magma, no decay of its own) with WSD driving the step size and the
    averaging weights. ``weight_decay`` acts at y (or AdamC with
    ``use_adamc``); ``state_dtype`` is z's (Kron keeps no momentum with
    b1 = 0, so rollfast does not forward ``mu_dtype``). Other keyword
    arguments: Kron options (``preconditioner_mode``, ``preconditioner_lr``,
    ``grad_clip_max_amps``, ``raw_global_grad_clip``, ``seed``, ...), the SF+
    knobs of :func:`schedule_free_with_wsd` and WSD options.
    """
    from .kron import Kron

    knobs, wsd_options, rest = _split_base_options(
        options, "schedule_free_kron", "Kron", ("b1", "whiten_grad", "use_magma", "mu_dtype", "lr", "weight_decay")
    )
    base = Kron(params, lr=lr, b1=0.0, whiten_grad=True, weight_decay=0.0, use_magma=False, **rest)
    return schedule_free_with_wsd(
        base,
        total_steps,
        warmup_fraction,
        decay_fraction,
        weighting_mode,
        sf_b1,
        state_dtype,
        weight_decay,
        **knobs,
        **wsd_options,
    )
