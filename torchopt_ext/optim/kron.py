"""PSGD Kron (rollfast's ``kron``): a Kronecker-factored Lie-group
preconditioner per tensor, one dense or diagonal factor per axis."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_lr,
    check_non_negative,
    check_range,
    check_stacked,
    check_state_dtype,
    draw_seed,
    is_dtensor,
    local,
    lr_tensor,
    math_dtype,
    sharded_stacked,
    sharded_stacked_group,
)
from ._ownership import OwnedStateMixin
from .prism import _clip_amps

_MODES = ("EQ", "Q0.5EQ1.5", "Q0p5EQ1p5", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER")
_MEMORY_SAVE_MODES = (None, "one_diag", "all_diag")
_CLIP_MODES = ("per_tensor_rms", "global_rms")


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: float = 500.0
) -> Callable[[Any], Any]:
    """rollfast's schedule p(n) = clamp(exp(-decay (n - flat_start)), min_prob,
    max_prob) of the 1-based step n. Works on tensors (no host sync), so a
    compiled step stays one graph. The default (``None``) is this schedule with
    its defaults, evaluated inside the op."""

    def schedule(n: Any) -> Any:
        n = torch.as_tensor(n, dtype=torch.float64)
        return torch.clamp(torch.exp(-decay * (n - flat_start)), min_prob, max_prob)

    return schedule


class Kron(OwnedStateMixin, FusedOptimizer):
    """PSGD Kron (argument names and defaults of rollfast's ``kron``, with ``lr``
    as the learning rate; math in docs/design.md and rollfast.md §2).

    Per param group and step (t = step count before this step, g = grad):

    - optional raw global clip of the group's grads (``raw_global_grad_clip``
      c): a spike ``||g|| > c`` scales them by ``c / ||g||``; it skips the step
      instead when ``permissive_spike_protection=False``, or when the update
      probability p is below 1 (rollfast: permissive protection only holds
      during the flat start). A skipped step changes nothing: params, every
      state tensor, step counts and the generator stay as they were;
    - momentum ``m = (1 - beta) g + beta m`` with ``beta = min(t / (1 + t), b1)``
      (none when ``b1 == 0``);
    - on a param's first step its factors are set to ``s^(1/k) I`` (k factors)
      with ``s = preconditioner_init_scale`` or, when None, rollfast's lazy
      ``(max over the group's new params of mean |g|^4 + damping^4)^(-1/8)``;
    - with probability p (``preconditioner_update_probability``: None = the
      default schedule ``clamp(exp(-0.001 (n - 500)), 0.03, 1)`` of the 1-based
      step n, a float, or a callable of the step tensor, e.g.
      :func:`precond_update_prob_schedule`) the factors take one
      Lipschitz-normalized step of ``preconditioner_mode`` ("Q0.5EQ1.5"
      default, "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER") fitted on g
      (``whiten_grad=True``) or m, with noise ``(damping + eps |G|) V``;
      with probability 0.01 the factor norms are then balanced;
    - ``d = P m`` (``P g`` without momentum), with the new factors when
      ``update_preconditioner_first``;
    - post-clip ``grad_clip_max_amps=(a_rms, a_el)``: ``per_tensor_rms``
      (``d *= min(1, a_rms / (rms(d) + tiny))``, clamp to ``±a_el``) or
      ``global_rms`` (one factor over the group, no element cap); None: off;
    - ``p -= lr * (d + weight_decay * p)`` (Magma, when on, scales this).

    Factors: axis i of a param gets a dense ``d_i x d_i`` factor unless
    ``d_i <= 1``, ``d_i > max_size_triangular``, ``d_i^2 > max_skew_triangular *
    numel``, ``ndim < min_ndim_triangular`` or ``memory_save_mode`` ("one_diag":
    the largest axis; "all_diag": all) makes it diagonal. Every param is
    preconditioned (no AdamW fallback); 0-d params have one scalar factor.

    State per param: ``Q`` (all factors flattened back to back, in
    ``precond_dtype``, default float32), ``L`` (one Lipschitz estimate per
    factor), ``mu`` (``mu_dtype``, default float32; bf16 is stored with
    stochastic rounding), ``magma_score`` with ``use_magma``, ``step``. Math is
    float32 (float64 for float64 params). The generator (``seed``; None draws
    one from torch's default generator) is one ``torch.Generator`` state per
    optimizer, kept in every param group as ``rng_state`` (the same tensor) and
    saved with ``state_dict``; the order of its draws is documented in
    ``csrc/include/torchopt_ext/functional/kron.h``. The group's step is its
    first param's count. NaN/Inf grads propagate (a NaN norm is no spike).

    ``stacked=True`` (a group option, rollfast's scanned layers, §2.6): every
    param of the group has shape (L, ...) and is L independent layers; slice
    ``p[i]`` gets its own factors, laid out from ``p.shape[1:]``, so ``Q``,
    ``L`` and ``magma_score`` carry a leading L axis (``mu`` is param-shaped).
    The op updates the slices of a param as batches of at most
    ``stacked_chunk_size`` slices (None: all L at once; smaller chunks bound
    the batched temporaries), with the draws taken per slice in the order of
    L separate params listed slice by slice (params in group order), so the
    generator, the lazy init scale and Magma's keys are those of the slices
    as params (one update-gate draw per group step, as without stacking).
    Unlike rollfast, slices do not share one key and the init scale uses every
    slice, not only ``g[0]``; Magma scores each slice. Params need >= 2 dims.
    A stacked FSDP2 param (a ``Shard(0)`` DTensor on a 1-D mesh) is sharded
    along L, so each rank steps its own whole slices with state sharded the
    same way, without gathering; the op draws and drops the other ranks'
    slices' draws, so every rank keeps the single-process generator. There,
    the lazy init scale (a max over all slices) costs one all-reduce of a
    float64 on a param's first step, and ``raw_global_grad_clip`` and
    ``grad_clip_mode="global_rms"`` (group-wide norms) are not supported.

    ``batch_equal_shapes`` (a group option): problems of one shape (the
    slices of a stacked param, and unstacked params of equal shape and math
    dtype) are updated as one batch (True: bmm chains, at most
    ``stacked_chunk_size`` problems each) or one at a time (False). None (the
    default): batched on CUDA, on the CPU only for slices of at most 8192
    elements, where bmm beats a loop of mm (docs/benchmarks.md). The draws are
    the same either way, so results agree to rounding.

    CUDA params: the op runs on the params' device (ATen / cuBLAS, disable
    TF32 for fp32-exact GEMMs); the generator, the update gate and the draws
    stay on the host (copied to the device), so a step makes no device sync
    except the lazy init scale on a param's first step, a CUDA ``found_inf``
    and ``raw_global_grad_clip``'s skip decision. lr must be a float or CPU
    tensor. With ``use_magma`` the scores live on the param's device and a
    CUDA step applies the multiplier there (no sync).
    """

    _op = "kron_step_"
    _state_keys = ("mu", "Q", "L", "magma_score")
    # magma_score is one value per param, or per slice with ``stacked``: it
    # has a _state_shape instead of being a scalar key.
    _whole_tensor_op = True  # factors act on whole axes
    # On the param's owner only with distributed_mode "owner" / "replicated"
    # (_ownership.OwnedStateMixin); the gather path keeps Q / L as DTensors.
    _owner_state_keys = ("Q", "L", "magma_score")

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        b1: float = 0.9,
        weight_decay: float = 0.0,
        preconditioner_update_probability: Union[None, float, Callable[[Any], Any]] = None,
        max_size_triangular: int = 8192,
        max_skew_triangular: float = 1.0,
        min_ndim_triangular: int = 2,
        memory_save_mode: Optional[str] = None,
        whiten_grad: bool = True,
        update_preconditioner_first: bool = True,
        preconditioner_lr: float = 0.1,
        preconditioner_init_scale: Optional[float] = None,
        mu_dtype: Optional[torch.dtype] = None,
        precond_dtype: Optional[torch.dtype] = None,
        preconditioner_mode: str = "Q0.5EQ1.5",
        beta_lipschitz: float = 0.9,
        track_lipschitz: bool = True,
        damping: float = 1e-9,
        grad_clip_max_amps: Any = (2.0, 10.0),
        grad_clip_mode: str = "per_tensor_rms",
        raw_global_grad_clip: Optional[float] = None,
        permissive_spike_protection: bool = True,
        newton_schulz_iters: int = 5,
        use_magma: bool = False,
        magma_p: float = 0.5,
        magma_tau: float = 2.0,
        seed: Optional[int] = None,
        *,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        stacked: bool = False,
        stacked_chunk_size: Optional[int] = None,
        batch_equal_shapes: Optional[bool] = None,
    ) -> None:
        seed = draw_seed(seed, True)
        generator = torch.Generator()
        generator.manual_seed(seed)
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            max_skew_triangular=max_skew_triangular,
            min_ndim_triangular=min_ndim_triangular,
            memory_save_mode=memory_save_mode,
            whiten_grad=whiten_grad,
            update_preconditioner_first=update_preconditioner_first,
            preconditioner_lr=preconditioner_lr,
            preconditioner_init_scale=preconditioner_init_scale,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            state_dtype=mu_dtype,
            preconditioner_mode=preconditioner_mode,
            beta_lipschitz=beta_lipschitz,
            track_lipschitz=track_lipschitz,
            damping=damping,
            grad_clip_max_amps=grad_clip_max_amps,
            grad_clip_mode=grad_clip_mode,
            raw_global_grad_clip=raw_global_grad_clip,
            permissive_spike_protection=permissive_spike_protection,
            newton_schulz_iters=newton_schulz_iters,
            use_magma=use_magma,
            magma_p=magma_p,
            magma_tau=magma_tau,
            maximize=maximize,
            stochastic_rounding=stochastic_rounding,
            seed=seed,
            stacked=stacked,
            stacked_chunk_size=stacked_chunk_size,
            batch_equal_shapes=batch_equal_shapes,
            # One generator per optimizer: every group holds this same tensor.
            rng_state=generator.get_state(),
        )
        super().__init__(params, defaults)
        self._init_distributed_mode()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("b1 value", group["b1"], 0.0, 1.0)
        check_non_negative("weight_decay value", group["weight_decay"])
        prob = group["preconditioner_update_probability"]
        if prob is not None and not callable(prob):
            if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
                raise ValueError(
                    "Invalid preconditioner_update_probability: must be None, a float in [0, 1] or a callable "
                    f"of the step, got {prob!r}"
                )
        for name in ("max_size_triangular", "min_ndim_triangular"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name}: must be an int >= 0, got {value!r}")
        check_non_negative("max_skew_triangular value", group["max_skew_triangular"])
        if group["memory_save_mode"] not in _MEMORY_SAVE_MODES:
            raise ValueError(
                f"Invalid memory_save_mode: must be one of {_MEMORY_SAVE_MODES}, got {group['memory_save_mode']!r}"
            )
        if not group["whiten_grad"] and group["b1"] == 0:
            raise ValueError("Invalid whiten_grad=False: fitting on the momentum needs b1 > 0")
        if not (math.isfinite(group["preconditioner_lr"]) and group["preconditioner_lr"] > 0):
            raise ValueError(f"Invalid preconditioner_lr: must be > 0, got {group['preconditioner_lr']}")
        scale = group["preconditioner_init_scale"]
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"Invalid preconditioner_init_scale: must be None or > 0, got {scale}")
        check_state_dtype(group["mu_dtype"])
        check_state_dtype(group["precond_dtype"])
        group["state_dtype"] = group["mu_dtype"]
        if group["preconditioner_mode"] not in _MODES:
            raise ValueError(
                f"Invalid preconditioner_mode: must be one of {_MODES}, got {group['preconditioner_mode']!r}"
            )
        check_range("beta_lipschitz value", group["beta_lipschitz"], 0.0, 1.0)
        check_non_negative("damping value", group["damping"])
        _clip_amps(group["grad_clip_max_amps"])
        if group["grad_clip_mode"] not in _CLIP_MODES:
            raise ValueError(f"Invalid grad_clip_mode: must be one of {_CLIP_MODES}, got {group['grad_clip_mode']!r}")
        clip = group["raw_global_grad_clip"]
        if clip is not None and not clip > 0:
            raise ValueError(f"Invalid raw_global_grad_clip: must be None or > 0, got {clip}")
        iters = group["newton_schulz_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or not 1 <= iters < 100:
            raise ValueError(f"Invalid newton_schulz_iters: must be an int in [1, 100), got {iters!r}")
        check_range("magma_p value", group["magma_p"], 0.0, 1.0, high_inclusive=True)
        if not group["magma_tau"] > 0:
            raise ValueError(f"Invalid magma_tau: must be > 0, got {group['magma_tau']}")
        if group["use_magma"] and group["b1"] == 0:
            raise ValueError("Invalid use_magma=True: Magma needs momentum (b1 > 0)")
        check_stacked(group)
        chunk = group["stacked_chunk_size"]
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"Invalid stacked_chunk_size: must be None or an int >= 1, got {chunk!r}")
        batch = group.setdefault("batch_equal_shapes", None)  # absent from older checkpoints
        if batch is not None and not isinstance(batch, bool):
            raise ValueError(f"Invalid batch_equal_shapes: must be None, True or False, got {batch!r}")

    # -- state ------------------------------------------------------------------

    @staticmethod
    def _slice_shape(p: torch.Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        """The shape the factors precondition: p's, or one slice's when stacked."""
        return tuple(p.shape[1:]) if group["stacked"] else tuple(p.shape)

    def _layout(self, p: torch.Tensor, group: dict[str, Any]) -> list[int]:
        return list(
            torch.ops.torchopt_ext.kron_factor_layout(
                list(self._slice_shape(p, group)),
                max_size_triangular=group["max_size_triangular"],
                max_skew_triangular=float(group["max_skew_triangular"]),
                min_ndim_triangular=group["min_ndim_triangular"],
                memory_save_mode=group["memory_save_mode"],
            )
        )

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        if key == "mu":
            return tuple(p.shape)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        # Stacked: one entry per slice along a leading L axis.
        lead = (p.shape[0],) if group["stacked"] else ()
        if key == "magma_score":
            return lead
        shape = self._slice_shape(p, group)
        dense = self._layout(p, group)
        if key == "L":
            return (*lead, len(dense))
        if len(shape) == 0:
            return (*lead, 1)
        return (*lead, sum(d * d if flag else d for d, flag in zip(shape, dense)))

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        if key == "mu":
            return group["mu_dtype"] or math_dtype(p)
        if key == "Q":
            return group["precond_dtype"] or math_dtype(p)
        if key == "magma_score":
            return torch.float32
        return math_dtype(p)

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "mu":
            # zeros_like keeps a DTensor param's mesh and placements.
            return torch.zeros_like(p, dtype=self._state_dtype(p, group, key), memory_format=torch.preserve_format)
        shape = self._state_shape(p, key)
        if key == "magma_score":
            # One value per param (per slice when stacked), on the param's device.
            score = torch.full(shape, 0.5, dtype=torch.float32, device=p.device)
            if group["stacked"] and sharded_stacked(p):
                # One score per slice, sharded along L like the param.
                from torch.distributed.tensor import distribute_tensor

                return distribute_tensor(score, p.device_mesh, p.placements, src_data_rank=None)
            return score
        # Zeros: the op sets the factors on the param's first step.
        zeros = torch.zeros(shape, dtype=self._state_dtype(p, group, key), device=p.device)
        if is_dtensor(p):
            # The flat factors are sharded with the param's placements (as
            # Adafactor's factored state), so DCP reshards them like any
            # DTensor; the step gathers them whole (_whole_tensor_op).
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(zeros, p.device_mesh, p.placements, src_data_rank=None)
        return zeros

    def _init_group(self, group, params, grads, state_steps, mus, qs, ls, magma_scores):
        # One entry per param (a stacked param whole: the op batches its slices).
        unwrap, unwrap_input = self._unwrappers()
        if self._sharded_stacked_group(group):
            # Shard(0) of a stacked param holds whole slices: step the local
            # shards (state is sharded the same way), no gather.
            unwrap = unwrap_input = local
        for _, p, state in self._params_with_grad(group):
            for key in ("Q", "L"):
                if key not in state:
                    state[key] = self._new_state(p, group, key)
            qs.append(unwrap(state["Q"]))
            ls.append(unwrap(state["L"]))
            if group["b1"] > 0:
                if "mu" not in state:
                    state["mu"] = self._new_state(p, group, "mu")
                mus.append(unwrap(state["mu"]))
            if group["use_magma"]:
                if "magma_score" not in state:  # also when Magma is turned on later
                    state["magma_score"] = self._new_state(p, group, "magma_score")
                magma_scores.append(local(state["magma_score"]))
            params.append(unwrap(p))
            grads.append(unwrap_input(p.grad))
            state_steps.append(state["step"])

    @staticmethod
    def _sharded_stacked_group(group: dict[str, Any]) -> bool:
        """Whether a stacked group holds FSDP2 DTensor params (then all must be
        Shard(0) on one 1-D mesh: sharded along L, whole slices per rank)."""
        if not sharded_stacked_group("Kron", group):
            return False
        if group["raw_global_grad_clip"] is not None or (
            group["grad_clip_max_amps"] is not None and group["grad_clip_mode"] == "global_rms"
        ):
            raise NotImplementedError(
                "Kron: stacked=True with sharded (DTensor) params does not support raw_global_grad_clip or "
                "grad_clip_mode='global_rms' (group-wide norms over all ranks' slices)"
            )
        return True

    @staticmethod
    def _stacked_slices(group: dict[str, Any]) -> list[int]:
        """Per param (first global slice, total slices) of this rank's shard:
        Shard(0) follows torch.chunk (ceil(L / n) slices per rank)."""
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            total, ranks = p.shape[0], p.device_mesh.size()
            size = -(-total // ranks)
            out += [min(p.device_mesh.get_local_rank() * size, total), total]
        return out

    def _sharded_init_scale(self, group, params, grads, state_steps, amp) -> Optional[float]:
        """The lazy init scale over every rank's fresh slices (the op only sees
        its own): the op's per-slice mean |g|^4, then one all-reduce (max) of
        a float64, on a param's first step only."""
        if group["preconditioner_init_scale"] is not None or not any(float(s) == 0 for s in state_steps):
            return group["preconditioner_init_scale"]
        import torch.distributed as dist

        largest = 0.0
        scale = amp.get("grad_scale")
        for p, g, s in zip(params, grads, state_steps):
            if float(s) != 0:
                continue
            if scale is not None:
                g = g / float(scale)  # the op divides the grads first
            g = g.to(math_dtype(p))
            for i in range(g.shape[0]):
                if g[i].numel() > 0:
                    largest = max(largest, float(g[i].abs().pow(4).mean()))
        total = torch.tensor(largest, dtype=torch.float64)
        mesh = next(p for p in group["params"] if is_dtensor(p)).device_mesh
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=mesh.get_group())
        return (float(total) + group["damping"] ** 4) ** (-1.0 / 8.0)

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            rng_state=group["rng_state"],
            b1=group["b1"],
            weight_decay=group["weight_decay"],
            max_size_triangular=group["max_size_triangular"],
            max_skew_triangular=float(group["max_skew_triangular"]),
            min_ndim_triangular=group["min_ndim_triangular"],
            memory_save_mode=group["memory_save_mode"],
            whiten_grad=group["whiten_grad"],
            update_preconditioner_first=group["update_preconditioner_first"],
            preconditioner_lr=group["preconditioner_lr"],
            preconditioner_init_scale=group["preconditioner_init_scale"],
            preconditioner_mode=group["preconditioner_mode"],
            beta_lipschitz=group["beta_lipschitz"],
            track_lipschitz=group["track_lipschitz"],
            damping=group["damping"],
            grad_clip_max_amps=_clip_amps(group["grad_clip_max_amps"]),
            grad_clip_mode=group["grad_clip_mode"],
            raw_global_grad_clip=group["raw_global_grad_clip"],
            permissive_spike_protection=group["permissive_spike_protection"],
            newton_schulz_iters=group["newton_schulz_iters"],
            maximize=group["maximize"],
            use_magma=group["use_magma"],
            magma_p=group["magma_p"],
            magma_tau=group["magma_tau"],
        )

    @staticmethod
    def _update_probability(group: dict[str, Any], state_steps: list[torch.Tensor]) -> Optional[torch.Tensor]:
        prob = group["preconditioner_update_probability"]
        if prob is None:
            return None  # the default schedule, evaluated in the op
        if callable(prob):
            # A tensor of the 1-based step: no host sync, compiles into the graph.
            return torch.as_tensor(prob(state_steps[0] + 1), dtype=torch.float64).reshape(())
        return torch.tensor(float(prob), dtype=torch.float64)

    def _group_step(self, group: dict[str, Any], amp: dict[str, Any]) -> None:
        params, grads, state_steps, mus, qs, ls, magma_scores = [], [], [], [], [], [], []
        self._init_group(group, params, grads, state_steps, mus, qs, ls, magma_scores)
        if not params:
            return
        kwargs = self._op_kwargs(group)
        stacked_slices = None
        if self._sharded_stacked_group(group):
            stacked_slices = self._stacked_slices(group)
            kwargs["preconditioner_init_scale"] = self._sharded_init_scale(group, params, grads, state_steps, amp)
        # The ownership path's arguments override (the lazy init scale).
        kwargs.update(group.get("_owner_op_kwargs", {}))
        torch.ops.torchopt_ext.kron_step_(
            params,
            grads,
            mus,
            qs,
            ls,
            magma_scores,
            state_steps,
            lr_tensor(group),
            update_probability=self._update_probability(group, state_steps),
            stochastic_rounding=group["stochastic_rounding"],
            seed=group["seed"],
            stacked=group["stacked"],
            stacked_chunk_size=group["stacked_chunk_size"],
            stacked_slices=stacked_slices,
            batch_equal_shapes=group["batch_equal_shapes"],
            **kwargs,
            **amp,
        )
        self._whole_tensors.write_back()

    # -- ownership (distributed_mode; _ownership.OwnedStateMixin) --------------

    def _owner_supported(self, group: dict[str, Any]) -> bool:
        # Group-wide quantities the owners do not see: the raw global clip and
        # the global post-clip take the gather path; stacked groups are local.
        return (
            not group["stacked"]
            and group["raw_global_grad_clip"] is None
            and (group["grad_clip_max_amps"] is None or group["grad_clip_mode"] != "global_rms")
        )

    def _owner_param_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        return ["mu"] if group["b1"] > 0 else []

    def _owner_held_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        return ["Q", "L"] + (["magma_score"] if group["use_magma"] else [])

    def _owner_op_kwargs(self, group, params, owned, whole, plan) -> dict[str, Any]:
        # The op replays the generator draws of the params other ranks step
        # (group_shapes) and keys Magma / rounding by group index, so each
        # owner's call draws what the single-process call draws.
        shapes: list[int] = []
        for p in params:
            shapes += [p.dim(), *p.shape, int(p.dtype == torch.float64)]
        kwargs: dict[str, Any] = {"param_indices": list(owned), "group_shapes": shapes}
        fresh = [j for j, p in enumerate(params) if float(self.state[p]["step"]) == 0]
        if fresh and group["preconditioner_init_scale"] is None:
            # rollfast's lazy scale takes the max over the group's new params:
            # each owner computes its params' term as the op would, one
            # all-reduce takes the max, and the op gets the scale.
            import torch.distributed as dist

            largest = torch.zeros((), dtype=torch.float64)
            for j in fresh:
                if j not in whole or params[j].numel() == 0:
                    continue
                p = params[j]
                g = whole[j][1].reshape(p.shape).to(p.grad.dtype)
                if self._amp_args()["grad_scale"] is not None:
                    g = g / self._amp_args()["grad_scale"]
                term = g.to(math_dtype(p)).abs().pow(4).mean().item()
                largest = torch.maximum(largest, torch.tensor(term, dtype=torch.float64))
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=plan.group)
            kwargs["preconditioner_init_scale"] = (float(largest) + group["damping"] ** 4) ** (-1.0 / 8.0)
        return kwargs

    def _owner_after_step(self, group, plan) -> None:
        # Owners advanced the generator identically; ranks that own nothing
        # here did not draw: every rank takes the first owner's state.
        import torch.distributed as dist

        from ._ownership import count_comm_bytes

        state = group["rng_state"]
        dist.broadcast(state, group=plan.group, group_src=plan.layouts[0].owner)
        count_comm_bytes(state.numel() * (plan.world_size - 1) if plan.rank == plan.layouts[0].owner else 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.param_groups:
            self.param_groups[-1]["rng_state"] = self.param_groups[0]["rng_state"]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # One generator per optimizer: every group shares the first group's state.
        shared = self.param_groups[0]["rng_state"]
        for group in self.param_groups:
            group["rng_state"] = shared
