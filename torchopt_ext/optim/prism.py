"""PRISM (rollfast's ``prism``): momentum shaped with innovation damping, with
an AdamW fallback for the params that are not matrices."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import (
    check_betas,
    check_lr,
    check_non_negative,
    check_range,
    check_state_dtype,
    draw_seed,
    is_dtensor,
    math_dtype,
    sharded_sum_of_squares,
)
from ._matrix import MatrixOptimizer
from .muon import _coefficient_args

_MODES = ("original", "bidirectional")
_ACCUMULATORS = ("ema", "heavy_ball")
_NORMALIZATIONS = ("frobenius", "spectral", "aol", "schatten")


def _nadamw_fallback_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, *, betas, **kwargs) -> None:
    """PRISM's NAdamW fallback (rollfast §3.4 with nesterov): one op call."""
    if params:
        torch.ops.torchopt_ext.prism_nadamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1=betas[0], beta2=betas[1], **kwargs
        )


def _clip_amps(amps: Any) -> list[float]:
    """grad_clip_max_amps as the op's list: [] (None), or (a_rms, a_el); a bare
    float a means (a, 10.0), as rollfast."""
    if amps is None:
        return []
    if isinstance(amps, (int, float)):
        amps = (float(amps), 10.0)
    if len(amps) != 2 or not all(float(a) > 0 for a in amps):
        raise ValueError(f"Invalid grad_clip_max_amps: must be None or two positive caps (rms, element), got {amps!r}")
    return [float(amps[0]), float(amps[1])]


class PRISM(MatrixOptimizer):
    """rollfast's PRISM (argument names and defaults of ``rollfast.prism``, with
    ``lr`` as the learning rate).

    Matrix params, per step (t = step count, beta = ``b1``): optional raw global
    clip (``raw_global_grad_clip``; one norm per step over the PRISM grads of
    every group that sets it, compared with each group's threshold: a spike
    ``||g|| > c`` scales them by ``c / ||g||``; with
    ``permissive_spike_protection=False`` the step is skipped instead: params,
    momentum, Magma scores and step counts stay as they were); momentum
    ``m = (1 - beta) g + beta m`` (``momentum_accumulator="ema"``) or
    ``m = g + beta m`` (``"heavy_ball"``); shaping target ``M`` (Nesterov
    look-ahead ``beta m + (1 - beta) g`` with ``nesterov and shape_nesterov``,
    optionally bias-corrected); innovation ``D = g - m``; shaping:
    ``mode="original"`` orthogonalizes the augmented ``[M, gamma D]`` by
    ``ns_iters`` quintic Newton-Schulz steps (``ns_coeffs``, ``preconditioning``)
    and keeps the ``M`` part; ``"bidirectional"`` computes
    ``H_out^{-1/4} M H_in^{-1/4}`` of the damped Grams by ``inv_steps`` coupled
    polynomial steps (``inv_eps``, ``inv_scale``, ``eps_gram``, ``gamma_l`` /
    ``gamma_r``); then the post-clip (``grad_clip_max_amps=(a_rms, a_el)``:
    ``u *= min(1, a_rms / (rms(u) + 1e-9))``, clamp to ``±a_el``; None: off);
    ``p -= lr * (u + weight_decay * p)``. There is no Muon-style shape factor.

    Orientation: a torch weight is ``(out, in)`` while rollfast's matrices are
    ``(in, out)``, so the augmentation stacks ``M`` and ``gamma D`` along dim 1
    (input features): the damping acts in the output-feature Gram, as in
    rollfast. ``gamma_l`` damps the input-feature (rollfast's left) Gram and
    ``gamma_r`` the output-feature one.

    Routing: by default 2-D params take PRISM and every other param takes AdamW
    (``adam_lr``, default ``lr`` and following lr schedules in proportion;
    ``adam_betas``, ``adam_eps``; ``weight_decay``). A param group's
    ``use_prism`` overrides this (``True`` sends >= 3-D params as
    ``(shape[0], rest)`` matrices). The fallback is plain AdamW by default;
    ``adam_nesterov=True`` gives rollfast's NAdamW form (its ``adamw(nesterov=
    True)``, the default there): ``m_hat = b1 m / (1 - b1^(t+1)) + (1 - b1) g /
    (1 - b1^t)``, ``u = m_hat / (sqrt(v / (1 - b2^t)) + eps)``,
    ``p <- p - lr (u + weight_decay p)``.
    ``matrix_dims`` (a :class:`MatrixDims` for the group's params with that
    many dims, or ``{param: spec}``; rollfast's dimension numbers) makes a
    param a batch of ``(output, reduction)`` matrices, each shaped and
    post-clipped on its own; ``original`` stacks ``gamma D`` along the
    reduction (input-feature) axes, so the damping acts in the output-feature
    Gram under any spec. ``ns_coeffs`` takes the presets ``"standard"``,
    ``"dion"`` and ``"polar_express"`` (computed for ``ns_iters``) as rollfast.

    Numerics: momentum math in fp32 (fp64 for fp64 state), stored in
    ``mu_dtype`` (bf16 with stochastic rounding); the shaping runs in
    ``ns_dtype`` (fp32 by default as rollfast; ``torch.float64`` for exact
    comparisons). NaN/Inf grads propagate into the update (the raw clip treats a
    NaN norm as no spike), as rollfast. Magma (``use_magma``, ``magma_p``,
    ``magma_tau``) as in :class:`Muon`, with the decay folded in. State keys:
    ``mu`` (+ ``magma_score``) for PRISM params, ``exp_avg`` / ``exp_avg_sq``
    (+ ``magma_score``: the fallback is masked too, rollfast §3.4) for AdamW
    ones, and ``step``.
    """

    _op = "prism_step_"
    _momentum_key = "mu"
    _route_key = "use_prism"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        b1: float = 0.95,
        gamma: float = 1.0,
        weight_decay: float = 0.0,
        ns_iters: int = 5,
        ns_coeffs: Any = (3.4445, -4.775, 2.0315),
        mode: str = "original",
        preconditioning: str = "frobenius",
        inv_steps: int = 6,
        inv_eps: float = 1e-5,
        inv_scale: float = 1.001,
        eps_gram: float = 1e-6,
        gamma_l: Optional[float] = None,
        gamma_r: Optional[float] = None,
        nesterov: bool = True,
        shape_nesterov: bool = True,
        bias_correction: bool = False,
        momentum_accumulator: str = "ema",
        grad_clip_max_amps: Any = (2.0, 10.0),
        raw_global_grad_clip: Optional[float] = None,
        permissive_spike_protection: bool = True,
        mu_dtype: Optional[torch.dtype] = None,
        use_magma: bool = False,
        magma_p: float = 0.5,
        magma_tau: float = 2.0,
        seed: Optional[int] = None,
        adam_lr: Optional[float] = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        *,
        adam_nesterov: bool = False,
        ns_dtype: Optional[torch.dtype] = torch.float32,
        matrix_dims: Any = None,
        maximize: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        if adam_lr is not None:
            check_non_negative("adam_lr value", adam_lr)
        lr_value = float(lr)
        defaults = dict(
            lr=lr,
            b1=b1,
            gamma=gamma,
            weight_decay=weight_decay,
            ns_iters=ns_iters,
            ns_coeffs=ns_coeffs,
            mode=mode,
            preconditioning=preconditioning,
            inv_steps=inv_steps,
            inv_eps=inv_eps,
            inv_scale=inv_scale,
            eps_gram=eps_gram,
            gamma_l=gamma_l,
            gamma_r=gamma_r,
            nesterov=nesterov,
            shape_nesterov=shape_nesterov,
            bias_correction=bias_correction,
            momentum_accumulator=momentum_accumulator,
            grad_clip_max_amps=grad_clip_max_amps,
            raw_global_grad_clip=raw_global_grad_clip,
            permissive_spike_protection=permissive_spike_protection,
            mu_dtype=mu_dtype,
            # The base class's name for the state storage dtype (kept equal to mu_dtype).
            state_dtype=mu_dtype,
            use_magma=use_magma,
            magma_p=magma_p,
            magma_tau=magma_tau,
            use_prism=None,
            adam_lr_ratio=1.0 if adam_lr is None else (adam_lr / lr_value if lr_value > 0 else 0.0),
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
            adam_nesterov=adam_nesterov,
            ns_dtype=ns_dtype,
            matrix_dims=matrix_dims,
            maximize=maximize,
            stochastic_rounding=stochastic_rounding,
            # bf16 momentum is always stochastically rounded: a seed is always drawn.
            seed=draw_seed(seed, True),
        )
        super().__init__(params, defaults)
        self._check_spec_keys()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("b1 value", group["b1"], 0.0, 1.0)
        check_non_negative("gamma value", group["gamma"])
        check_non_negative("weight_decay value", group["weight_decay"])
        for name in ("ns_iters", "inv_steps"):
            steps = group[name]
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
                raise ValueError(f"Invalid {name}: must be an int in [1, 100), got {steps!r}")
        _coefficient_args(group["ns_coeffs"], "ns_coeffs")
        if group["mode"] not in _MODES:
            raise ValueError(f"Invalid mode: must be one of {_MODES}, got {group['mode']!r}")
        if str(group["preconditioning"]).lower() not in _NORMALIZATIONS:
            raise ValueError(
                f"Invalid preconditioning: must be one of {_NORMALIZATIONS}, got {group['preconditioning']!r}"
            )
        check_non_negative("inv_eps value", group["inv_eps"])
        if not group["inv_scale"] > 0:
            raise ValueError(f"Invalid inv_scale: must be > 0, got {group['inv_scale']}")
        check_non_negative("eps_gram value", group["eps_gram"])
        for name in ("gamma_l", "gamma_r"):
            if group[name] is not None:
                check_non_negative(f"{name} value", group[name])
        if group["momentum_accumulator"] not in _ACCUMULATORS:
            raise ValueError(
                f"Invalid momentum_accumulator: must be one of {_ACCUMULATORS}, got {group['momentum_accumulator']!r}"
            )
        _clip_amps(group["grad_clip_max_amps"])
        clip = group["raw_global_grad_clip"]
        if clip is not None and not clip > 0:
            raise ValueError(f"Invalid raw_global_grad_clip: must be None or > 0, got {clip}")
        check_state_dtype(group["mu_dtype"])
        group["state_dtype"] = group["mu_dtype"]
        if group["ns_dtype"] is not None and not group["ns_dtype"].is_floating_point:
            raise ValueError(f"Invalid ns_dtype: must be a floating dtype or None, got {group['ns_dtype']}")
        check_betas(group["adam_betas"])
        check_non_negative("adam_eps value", group["adam_eps"])
        if not isinstance(group["adam_nesterov"], bool):
            raise ValueError(f"Invalid adam_nesterov: must be a bool, got {group['adam_nesterov']!r}")
        if group["adam_nesterov"] and group["use_magma"]:
            raise ValueError("Invalid adam_nesterov=True with use_magma=True: the NAdamW fallback has no Magma masking")
        check_range("magma_p value", group["magma_p"], 0.0, 1.0, high_inclusive=True)
        if not group["magma_tau"] > 0:
            raise ValueError(f"Invalid magma_tau: must be > 0, got {group['magma_tau']}")
        self._check_matrix_dims(group)
        self._check_routing(group)

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        dtype = group["mu_dtype"] or p.dtype
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _shared_op_kwargs(self) -> dict[str, Any]:
        """The raw global norm over the PRISM grads of every group that sets
        ``raw_global_grad_clip`` (rollfast's partition sees all PRISM leaves at
        once), in float64; each such group compares it with its own threshold."""
        grads = [
            p.grad
            for group in self.param_groups
            if group["raw_global_grad_clip"] is not None
            for i, p in enumerate(group["params"])
            if p.grad is not None and self._is_matrix(group, p, i)
        ]
        if not grads:
            return {}
        plain = [g for g in grads if not is_dtensor(g)]
        replicated = [g.to_local() for g in grads if is_dtensor(g) and not any(pl.is_shard() for pl in g.placements)]
        total = torch.zeros((), dtype=torch.float64)
        for g in plain + replicated:
            total = total + torch.linalg.vector_norm(g, dtype=torch.float64).square()
        sharded = sharded_sum_of_squares(grads)
        if sharded is not None:
            total = total + sharded
        return {"raw_grad_norm": total.sqrt()}

    def _fallback_step(self, group: dict[str, Any]) -> Any:
        return _nadamw_fallback_step if group["adam_nesterov"] else super()._fallback_step(group)

    def _prepare_group(self, group: dict[str, Any]) -> None:
        group["state_dtype"] = group["mu_dtype"]  # load_state_dict restores state in this dtype

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            b1=group["b1"],
            gamma=group["gamma"],
            weight_decay=group["weight_decay"],
            ns_iters=group["ns_iters"],
            ns_coeffs=_coefficient_args(group["ns_coeffs"], "ns_coeffs")[0],
            ns_preset=_coefficient_args(group["ns_coeffs"], "ns_coeffs")[1],
            prism_mode=group["mode"],  # "mode" clashes with a torch.compile keyword
            preconditioning=str(group["preconditioning"]).lower(),
            inv_steps=group["inv_steps"],
            inv_eps=group["inv_eps"],
            inv_scale=group["inv_scale"],
            eps_gram=group["eps_gram"],
            gamma_l=group["gamma_l"],
            gamma_r=group["gamma_r"],
            nesterov=group["nesterov"],
            shape_nesterov=group["shape_nesterov"],
            bias_correction=group["bias_correction"],
            momentum_accumulator=group["momentum_accumulator"],
            grad_clip_max_amps=_clip_amps(group["grad_clip_max_amps"]),
            raw_global_grad_clip=group["raw_global_grad_clip"],
            permissive_spike_protection=group["permissive_spike_protection"],
            ns_dtype=group["ns_dtype"],
            maximize=group["maximize"],
            use_magma=group["use_magma"],
            magma_p=group["magma_p"],
            magma_tau=group["magma_tau"],
        )

    # -- whole-matrix ownership hooks (see _matrix.MatrixOptimizer) ----------

    def _owner_supported(self, group):
        # The raw global clip decides on the group's whole-gradient norm inside
        # prism_step_: such groups take the gather path.
        return group["raw_global_grad_clip"] is None

    def _owner_momentum(self, group, grads, moments, state_steps, grad_scale):
        def outputs():
            # Math dtype: float32, float64 for float64 state.
            return [torch.empty(m.shape, dtype=math_dtype(m), device=m.device) for m in moments]

        targets, innovations = outputs(), outputs()
        lookahead = outputs() if group["nesterov"] and not group["shape_nesterov"] else []
        # On the grads' device (CUDA params: the op runs there, NCCL reduces the sums there).
        device = grads[0].device if grads else None
        sums = torch.zeros((len(grads) if group["use_magma"] else 0, 3), dtype=torch.float64, device=device)
        torch.ops.torchopt_ext.prism_momentum_(
            grads,
            moments,
            state_steps,
            targets,
            innovations,
            lookahead,
            sums,
            b1=group["b1"],
            nesterov=group["nesterov"],
            shape_nesterov=group["shape_nesterov"],
            bias_correction=group["bias_correction"],
            momentum_accumulator=group["momentum_accumulator"],
            maximize=group["maximize"],
            use_magma=group["use_magma"],
            seed=group["seed"],
            grad_scale=grad_scale,
        )
        extra = [[g] for g in lookahead] if lookahead else [[] for _ in targets]
        return [[m, d, *g] for m, d, g in zip(targets, innovations, extra)], sums

    def _owner_compute(self, group, whole):
        kwargs = self._op_kwargs(group)
        shape_kwargs = {
            key: kwargs[key]
            for key in (
                "b1", "gamma", "ns_iters", "ns_coeffs", "prism_mode", "preconditioning", "inv_steps", "inv_eps",
                "inv_scale", "eps_gram", "gamma_l", "gamma_r", "nesterov", "shape_nesterov",
                "momentum_accumulator", "grad_clip_max_amps", "ns_dtype",
            )
        }  # fmt: skip
        if kwargs["ns_preset"]:  # prism_shape takes the table itself
            table = torch.ops.torchopt_ext.ns_coefficient_table(kwargs["ns_preset"], kwargs["ns_iters"])
            shape_kwargs["ns_coeffs"] = table.flatten().tolist()
        return [
            torch.ops.torchopt_ext.prism_shape(m, d, tail[0] if tail else None, **shape_kwargs) for m, d, *tail in whole
        ]
