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

# Bytes this process sent to other ranks for optimizer steps (the gather
# path's all-gathers here, the ownership path's all-to-alls in _ownership.py):
# read by benchmarks/bench_distributed.py. Sends to self are not counted.
_COMM = {"bytes": 0}

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


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the C++ math runs in for a tensor of ``t``'s dtype: float64
    for float64, float32 otherwise (bf16/fp16 storage is widened)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def torch_switches(
    name: str,
    *,
    foreach: Optional[bool] = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: Optional[bool] = None,
) -> dict[str, Any]:
    """torch.optim's implementation switches, accepted (and kept in the group,
    as torch.optim does) so a class drops in for its torch.optim namesake: the
    step is always the one fused op, so ``foreach`` and ``fused`` choose
    nothing, and a CUDA step is capturable wherever the class keeps device
    step counters (``_device_steps``). ``differentiable=True`` (autograd
    through the step) is refused: the ops update in place under no_grad."""
    if differentiable:
        raise ValueError(f"{name}: differentiable=True is not supported (the fused step is not differentiable)")
    return dict(foreach=foreach, capturable=capturable, differentiable=False, fused=fused)


def draw_seed(seed: Optional[int], stochastic_rounding: bool) -> int:
    """The stochastic-rounding seed: the given one, else (when rounding is on)
    one drawn from torch's default generator, so torch.manual_seed makes runs
    repeatable."""
    if seed is not None:
        return int(seed)
    if not stochastic_rounding:
        return 0
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def check_betas(betas: Any, high_inclusive: bool = False) -> None:
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected two values, got {betas}")
    check_range("beta parameter at index 0 (betas[0])", betas[0], 0.0, 1.0, high_inclusive)
    check_range("beta parameter at index 1 (betas[1])", betas[1], 0.0, 1.0, high_inclusive)


def check_adam_like(group: dict[str, Any]) -> None:
    """lr, eps, betas, weight_decay and state_dtype of the Adam family."""
    check_lr(group["lr"])
    check_non_negative("epsilon value (eps)", group["eps"])
    check_betas(group["betas"])
    check_non_negative("weight_decay value", group["weight_decay"])
    check_state_dtype(group["state_dtype"])


# XOR-ed into the seed of a matrix optimizer's AdamW fallback when Magma is
# on, so its keep/drop draws (keyed by tensor index within an op call) are
# independent of the matrix branch's. Same constant in C++
# (common::kMagmaFallbackSeedSalt).
MAGMA_FALLBACK_SEED_SALT = 0x2545F4914F6CDD1D


def check_magma(group: dict[str, Any]) -> None:
    """Magma options (rollfast.md §5) of a param group that offers them."""
    check_range("magma_p value", group["magma_p"], 0.0, 1.0, high_inclusive=True)
    if not group["magma_tau"] > 0:
        raise ValueError(f"Invalid magma_tau: must be > 0, got {group['magma_tau']}")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (writes to it land in the DTensor), else t."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


class WholeTensors:
    """Whole-tensor view of DTensor params for ops that need whole-tensor
    quantities (LAMB's trust ratio, MARS's per-tensor clip, Muon's
    Newton-Schulz): ``full(t)`` gathers a DTensor into a plain full tensor
    (every rank computes the same update on identical inputs), and
    ``write_back()`` copies the local slice of each gathered param/state back
    into its shard after the op. Plain tensors pass through untouched, so the
    non-distributed step is unchanged. Costs one all-gather per param and
    state tensor per step and full-size temporaries on every rank.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, torch.Tensor]] = []

    def full(self, t: torch.Tensor, write_back: bool = True) -> torch.Tensor:
        if not is_dtensor(t):
            return t
        whole = t.full_tensor()
        # What this rank's shard costs to gather: sent to every other rank.
        _COMM["bytes"] += t.to_local().numel() * t.element_size() * (t.device_mesh.size() - 1)
        if write_back:
            self._pending.append((t, whole))
        return whole

    def write_back(self) -> None:
        if not self._pending:
            return
        from torch.distributed.tensor import distribute_tensor

        for dt, whole in self._pending:
            # src_data_rank=None: each rank slices its own part, no communication.
            mine = distribute_tensor(whole, dt.device_mesh, dt.placements, src_data_rank=None).to_local()
            shard = dt.to_local()
            if mine.data_ptr() != shard.data_ptr():
                shard.copy_(mine)
        self._pending.clear()


def sharded_sum_of_squares(tensors: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of squares (float64) over the sharded DTensors among ``tensors``,
    all-reduced across their shard group; None when there are none. Replicated
    DTensors and plain tensors are the caller's to add (they are not summed
    across ranks)."""
    sharded = [t for t in tensors if is_dtensor(t) and any(pl.is_shard() for pl in t.placements)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(t.device_mesh != mesh for t in sharded):
        raise NotImplementedError("global norms over DTensors need one 1-D device mesh shared by all params")
    total = torch.zeros((), dtype=torch.float64)
    for t in sharded:
        shard = t.to_local()
        if shard.numel():
            accumulate = None if shard.dtype in (torch.float32, torch.float64) else torch.float32
            total += torch.linalg.vector_norm(shard, dtype=accumulate).to(torch.float64).square()
    import torch.distributed as dist

    dist.all_reduce(total, group=mesh.get_group())
    return total


def norm_layout(tensors: list[Any], distributed_mode: str = "shards") -> str:
    """How a two-stage op (LAMB's trust ratios, MARS's clip: ``*_norm_sqs``
    then ``*_step_(norm_sqs=...)``) handles these params: "local" (no sharded
    DTensor: the fused op computes whole norms itself), "sharded" (sharded
    DTensors on one 1-D mesh: local sums, all-reduced by ``shard_sum_rows``)
    or "gather" (other meshes, or ``distributed_mode="gather"``: the op runs
    on gathered whole tensors)."""
    sharded = [t for t in tensors if is_dtensor(t) and any(pl.is_shard() for pl in t.placements)]
    if not sharded:
        return "local"
    if distributed_mode == "gather":
        return "gather"
    mesh = sharded[0].device_mesh
    if mesh.ndim == 1 and all(t.device_mesh == mesh for t in sharded):
        return "sharded"
    return "gather"


def shard_sum_rows(tensors: list[Any], sums: torch.Tensor) -> torch.Tensor:
    """Row i of ``sums`` holds per-tensor sums over ``tensors[i]``'s local
    shard: rows of sharded DTensors are summed over their (one, 1-D) mesh
    with one all-reduce; rows of replicated DTensors and plain tensors are
    whole already and kept."""
    import torch.distributed as dist

    flags = [is_dtensor(t) and any(pl.is_shard() for pl in t.placements) for t in tensors]
    mesh = next(t.device_mesh for t, f in zip(tensors, flags) if f)
    mask = torch.tensor(flags, device=sums.device).unsqueeze(1)
    reduced = torch.where(mask, sums, torch.zeros_like(sums))
    dist.all_reduce(reduced, group=mesh.get_group())
    _COMM["bytes"] += reduced.numel() * reduced.element_size() * (mesh.size() - 1)
    return torch.where(mask, reduced, sums)


def check_stacked(group: dict[str, Any]) -> None:
    """The PSGD ``stacked`` group option: a bool, and with it every param is
    (L, ...) with at least 2 dims (one preconditioner per slice p[i])."""
    if not isinstance(group["stacked"], bool):
        raise ValueError(f"Invalid stacked: must be a bool, got {group['stacked']!r}")
    if group["stacked"]:
        for i, p in enumerate(group.get("params", [])):
            if p.dim() < 2:
                raise ValueError(
                    f"Invalid stacked=True: params[{i}] has shape {tuple(p.shape)}; a stacked param is "
                    "(L, ...) with at least 2 dims (one preconditioner per slice p[i])"
                )


def sharded_stacked(p: torch.Tensor) -> bool:
    """A DTensor sharded along its first (layer) axis on a 1-D mesh."""
    if not is_dtensor(p):
        return False
    from torch.distributed.tensor import Shard

    return p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),)


def sharded_stacked_group(name: str, group: dict[str, Any]) -> bool:
    """Whether a stacked PSGD group holds DTensor params; then every param
    must be Shard(0) on a 1-D mesh (sharded along L: whole slices per rank),
    else a NotImplementedError naming the param and its placement."""
    params = group.get("params", [])
    if not group["stacked"] or not any(is_dtensor(p) for p in params):
        return False
    for i, p in enumerate(params):
        if not sharded_stacked(p):
            found = f"placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh" if is_dtensor(p) else "plain"
            raise NotImplementedError(
                f"{name}: stacked=True supports DTensor params only as Shard(0) on a 1-D mesh (sharded along "
                f"the layer axis), for every param of the group; params[{i}] is {found}"
            )
    return True


def lr_tensor(group: dict[str, Any]) -> torch.Tensor:
    """A group's lr as the ops take it: a tensor lr as is (a scheduler can
    change it without recompiling), a float as float64 so it stays exact, as
    torch.optim uses it."""
    lr = group["lr"]
    return lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float64)


def adamw_fallback_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    lr: torch.Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool,
    magma_scores: Optional[list[torch.Tensor]] = None,
    magma_p: float = 0.5,
    magma_tau: float = 2.0,
    max_exp_avg_sqs: Optional[list[torch.Tensor]] = None,
    **extra: Any,
) -> None:
    """The AdamW branch of the matrix optimizers (MARS's 1-D branch, Muon's
    and PRISM's fallback): ``adam_step_`` with decoupled decay (amsgrad when
    ``max_exp_avg_sqs`` is given, as MARS's official 1-D branch), or
    ``adam_magma_step_`` when ``magma_scores`` is given (rollfast masks
    every leaf, fallback included; the caller salts the seed with
    ``MAGMA_FALLBACK_SEED_SALT`` so these draws are not the matrix branch's).
    ``extra`` carries the rounding and AMP keyword arguments."""
    if not params:
        return
    kwargs = dict(
        beta1=betas[0],
        beta2=betas[1],
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        amsgrad=max_exp_avg_sqs is not None,
        maximize=maximize,
        **extra,
    )
    if magma_scores is not None:
        if max_exp_avg_sqs is not None:
            raise ValueError("adamw_fallback_step: amsgrad (max_exp_avg_sqs) is not combined with Magma")
        torch.ops.torchopt_ext.adam_magma_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            magma_scores,
            state_steps,
            lr,
            magma_p=magma_p,
            magma_tau=magma_tau,
            **kwargs,
        )
        return
    torch.ops.torchopt_ext.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], state_steps, lr, **kwargs
    )


class FusedOptimizer(torch.optim.Optimizer):
    """Base of torchopt_ext's torch.optim drop-ins.

    A subclass names its op (``_op``), its per-param state (``_state_keys``, in
    the op's argument order) and its hyperparameters (``_op_kwargs``); this
    class keeps the torch.optim bookkeeping: lazily created state in
    ``_init_group`` (which torch.compile runs eagerly), one op call per param
    group, closures, GradScaler's ``grad_scale``/``found_inf`` (passed to the
    kernel instead of unscaling on the host) and state_dict loading.

    Every op takes ``(params, grads, *state lists, state_steps, lr, **kwargs)``.
    """

    _step_supports_amp_scaling = True
    _op: str = ""
    _state_keys: tuple[str, ...] = ()
    # State entries that are one-element tensors rather than param-shaped.
    _scalar_state_keys: tuple[str, ...] = ()
    # Param-shaped state of a fallback branch (e.g. Muon's AdamW for
    # non-matrix params), not passed to `_op` but restored like `_state_keys`.
    _fallback_state_keys: tuple[str, ...] = ()
    # The op needs whole tensors (per-tensor norms, matrix functions): DTensor
    # params and their state are gathered for it (see WholeTensors).
    _whole_tensor_op: bool = False
    # The op takes step counters (and the other one-element state) on a CUDA
    # param's device: they are created there, so a step needs no host sync and
    # can be captured in a CUDA graph (as torch's fused / capturable Adam).
    # Off for ops without CUDA kernels; CPU params always keep CPU counters.
    # One-element state other than the step (``_scalar_state_keys``:
    # NAdamW's mu_product, Schedule-Free's weights) lives with the counter.
    _device_steps: bool = False
    # Set by two-stage optimizers (LAMB, MARS) for a group whose DTensor
    # layout they cannot reduce over (see norm_layout): gather it instead.
    _gather_now: bool = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._check_group(defaults)
        super().__init__(params, defaults)
        self._whole_tensors = WholeTensors()

    def _unwrappers(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(for params/state the op updates, for inputs it only reads): local
        shards, or gathered whole tensors when ``_whole_tensor_op``."""
        if not (self._whole_tensor_op or self._gather_now):
            return local, local
        whole = self._whole_tensors
        return whole.full, lambda t: whole.full(t, write_back=False)

    # -- hooks for subclasses -------------------------------------------------

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validates a param group's options (also run for add_param_group)."""

    # Subclasses define `_op_kwargs(group) -> dict`: the op's keyword
    # hyperparameters for a group.

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        """Whether state `key` is needed with this group's options."""
        return True

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        """The shape of state `key` of param `p` (None: `p` keeps no such state)."""
        return tuple(p.shape)

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        """The dtype state `key` of `p` is kept (and reloaded) in."""
        return group["state_dtype"] or p.dtype

    def _scalar_device(self, p: torch.Tensor) -> torch.device:
        """Where ``p``'s step counter and one-element state live: the param's
        CUDA device with ``_device_steps``, else the CPU."""
        if self._device_steps and p.device.type == "cuda":
            return p.device
        return torch.device("cpu")

    def _new_step(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self._scalar_device(p))

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key in self._scalar_state_keys:
            raise KeyError(f"{type(self).__name__} does not say how to create its scalar state {key!r}")
        dtype = group["state_dtype"] or p.dtype
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    # -- torch.optim plumbing -------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _params_with_grad(self, group: dict[str, Any]):
        """(index, param, state) for each param of ``group`` that has a grad,
        with its step counter created; sparse grads and complex params are
        refused (the fused ops take neither)."""
        name = type(self).__name__
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{name} does not support complex parameters")
            state = self.state[p]
            if "step" not in state:
                state["step"] = self._new_step(p)
            yield index, p, state

    def _init_group(self, group, params, grads, state_steps, *state_lists):
        unwrap, unwrap_input = self._unwrappers()
        for _, p, state in self._params_with_grad(group):
            for key, out in zip(self._state_keys, state_lists):
                if not self._uses_state(group, key):
                    continue
                if key not in state:
                    state[key] = self._new_state(p, group, key)
                out.append(unwrap(state[key]))
            params.append(unwrap(p))
            grads.append(unwrap_input(p.grad))
            state_steps.append(state["step"])

    def _run_closure(self, closure: Optional[Callable[[], Any]]) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _amp_args(self) -> dict[str, Optional[torch.Tensor]]:
        """GradScaler's ``grad_scale`` / ``found_inf`` (set on the optimizer by
        torch.amp.GradScaler.step), passed to the ops."""
        return {"grad_scale": getattr(self, "grad_scale", None), "found_inf": getattr(self, "found_inf", None)}

    @staticmethod
    def _rounding_args(group: dict[str, Any]) -> dict[str, Any]:
        return {"stochastic_rounding": group["stochastic_rounding"], "seed": group["seed"]}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_args()
        for group in self.param_groups:
            self._group_step(group, amp)
        return loss

    def _group_step(self, group: dict[str, Any], amp: dict[str, Any]) -> None:
        """One param group's step (also run by the ownership path on whole
        stand-ins of the params a rank owns, see _ownership.OwnedStateMixin)."""
        params, grads, state_steps = [], [], []
        state_lists = [[] for _ in self._state_keys]
        self._init_group(group, params, grads, state_steps, *state_lists)
        if not params:
            return
        self._run_op(group, params, grads, state_lists, state_steps, amp)
        self._whole_tensors.write_back()

    def _op_for(self, group: dict[str, Any], state_lists: list) -> tuple[str, list, dict[str, Any]]:
        """The op a group's step calls, the state lists it takes and extra
        keyword arguments (a subclass may pick another op per group)."""
        return self._op, state_lists, {}

    def _run_op(self, group, params, grads, state_lists, state_steps, amp) -> None:
        name, op_state_lists, extra = self._op_for(group, state_lists)
        getattr(torch.ops.torchopt_ext, name)(
            params,
            grads,
            *op_state_lists,
            state_steps,
            lr_tensor(group),
            **self._rounding_args(group),
            **self._op_kwargs(group),
            **extra,
            **group.get("_owner_op_kwargs", {}),  # the ownership path's (_ownership.OwnedStateMixin)
            **amp,
        )

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
            for key in self._state_keys + self._fallback_state_keys:
                dtype = self._state_dtype(p, group_of[p], key)
                value = saved.get(key)
                if not torch.is_tensor(value):
                    continue
                if key in self._scalar_state_keys:
                    state[key] = value.detach().to(device=self._scalar_device(p)).reshape(())
                    continue
                expected = self._state_shape(p, key)
                if tuple(value.shape) != expected:
                    raise ValueError(
                        f"load_state_dict: state '{key}' has shape {tuple(value.shape)} but its param "
                        f"(shape {tuple(p.shape)}) needs {expected}; was the checkpoint saved for another model?"
                    )
                state[key] = value.to(device=p.device, dtype=dtype)
            if "step" in state:
                state["step"] = torch.as_tensor(
                    state["step"], dtype=torch.float32, device=self._scalar_device(p)
                ).reshape(())
