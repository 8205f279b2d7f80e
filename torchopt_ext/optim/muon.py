"""Muon (Jordan et al. 2024): momentum orthogonalized by Newton-Schulz, with
an AdamW fallback for the params that are not matrices."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from ._base import (
    check_betas,
    check_lr,
    check_non_negative,
    check_range,
    check_state_dtype,
    draw_seed,
)
from ._matrix import MatrixOptimizer

_ADJUST_LR_FNS = ("original", "match_rms_adamw")
_NORMALIZATIONS = ("frobenius", "spectral", "aol", "schatten")


NS_PRESETS = ("standard", "dion", "polar_express")


def ns_coefficient_table(preset: str, steps: int = 5) -> torch.Tensor:
    """The (steps or 5, 3) float64 table of a Newton-Schulz preset: "standard"
    (3.4445, -4.7750, 2.0315), "dion" (Dion's 5 rows) or "polar_express"
    (Polar Express coefficients computed in C++ for ``steps`` iterations with
    rollfast's l = 1e-3, safety 2e-2, cushion 0.0241)."""
    return torch.ops.torchopt_ext.ns_coefficient_table(preset, steps)


def _coefficient_args(coefficients: Any, argument: str) -> tuple[list[float], str]:
    """(flat table, preset name) for the op; a preset name gives ([], name)."""
    if isinstance(coefficients, str):
        name = coefficients.lower()
        if name not in NS_PRESETS:
            raise ValueError(
                f"Invalid {argument}: unknown preset {coefficients!r}; "
                f"expected one of {NS_PRESETS} or (a, b, c) triples"
            )
        return [], name
    try:
        return _flatten_coefficients(coefficients), ""
    except ValueError as e:
        raise ValueError(str(e).replace("ns_coefficients", argument)) from None


def _flatten_coefficients(coefficients: Any) -> list[float]:
    """One (a, b, c) triple or a table of them, as the op's flat list."""
    flat_triple = len(coefficients) > 0 and not isinstance(coefficients[0], Sequence)
    rows = [coefficients] if flat_triple else coefficients
    flat = []
    for row in rows:
        if not isinstance(row, Sequence) or len(row) != 3:
            raise ValueError(f"Invalid ns_coefficients: expected (a, b, c) triples, got {coefficients!r}")
        flat.extend(float(x) for x in row)
    if not flat or not all(math.isfinite(x) for x in flat):
        raise ValueError(f"Invalid ns_coefficients: expected finite (a, b, c) triples, got {coefficients!r}")
    return flat


class Muon(MatrixOptimizer):
    """Drop-in for ``torch.optim.Muon`` (same names and defaults) that also takes
    the params Muon does not orthogonalize.

    Matrix params: ``B = lerp(B, g, 1 - momentum)``; ``U = lerp(g, B, momentum)``
    (Nesterov) or ``B``; ``O = NS(U)`` (``ns_steps`` quintic Newton-Schulz
    iterations with ``ns_coefficients``, in ``ns_dtype``, bf16 by default as in
    torch); ``p *= 1 - lr * weight_decay``; ``p -= lr * s * O`` with
    ``s = sqrt(max(1, rows/cols))`` (``adjust_lr_fn=None``/``"original"``) or
    ``0.2 * sqrt(max(rows, cols))`` (``"match_rms_adamw"``, Moonlight).

    Routing: by default 2-D params take Muon and every other param (0-D, 1-D,
    >= 3-D) takes AdamW with ``adam_lr`` (default: ``lr``; it follows lr
    schedules in proportion), ``adam_betas``, ``adam_eps`` and
    ``adam_weight_decay`` (default: ``weight_decay``). A param group's
    ``use_muon`` overrides this: ``False`` sends a group (embeddings, heads) to
    AdamW; ``True`` sends >= 3-D params (conv kernels) to Muon as
    ``(shape[0], rest)`` matrices.

    Extras: ``ns_coefficients`` may be a table of triples (one per iteration,
    the last repeated) or a preset name: ``"standard"``, ``"dion"`` (Dion's
    5 rows) or ``"polar_express"`` (computed for ``ns_steps``, see
    :func:`ns_coefficient_table`); ``matrix_dims`` (a :class:`MatrixDims` for
    the group's params with that many dims, or ``{param: spec}``) treats
    conv kernels or stacked ``(L, in, out)`` weights as batches of matrices,
    each orthogonalized on its own, with the lr scale of one matrix; ``ns_normalization`` ``"frobenius"`` (torch's
    ``X / max(||X||_F, eps)``), ``"spectral"``, ``"aol"`` or ``"schatten"``;
    ``ns_dtype=torch.float32`` for an fp32 iteration; ``maximize``;
    ``state_dtype`` (momentum storage), ``stochastic_rounding``/``seed`` for
    bf16 params, as in :class:`torchopt_ext.optim.AdamW`.

    Magma (``use_magma``, ``magma_p``, ``magma_tau``; rollfast's defaults):
    each matrix's update, weight decay included, is scaled by ``z * s`` with
    ``s <- 0.9 s + 0.1 sigmoid(cos(g, B) / tau)`` (state ``magma_score``) and
    ``z ~ Bernoulli(p)`` drawn per tensor and step from a counter-based hash of
    ``seed`` (drawn from torch's generator when None), so runs repeat and all
    ranks agree. Expect ~0.25x attenuation with the defaults (rollfast suggests
    ~4x the lr). The AdamW fallback is masked too, as rollfast masks every
    leaf (Magma of :class:`AdamW`, its own draws). State keys follow
    torch: ``momentum_buffer`` (plus ``step``), and ``exp_avg``/``exp_avg_sq``
    for AdamW-routed params.
    """

    _op = "muon_step_"
    _momentum_key = "momentum_buffer"
    _route_key = "use_muon"

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Any = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
        *,
        ns_normalization: str = "frobenius",
        ns_dtype: Optional[torch.dtype] = torch.bfloat16,
        matrix_dims: Any = None,
        adam_lr: Optional[float] = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: Optional[float] = None,
        maximize: bool = False,
        use_magma: bool = False,
        magma_p: float = 0.5,
        magma_tau: float = 2.0,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
    ) -> None:
        if adam_lr is not None:
            check_non_negative("adam_lr value", adam_lr)
        lr_value = float(lr)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_normalization=ns_normalization,
            ns_dtype=ns_dtype,
            matrix_dims=matrix_dims,
            use_muon=None,
            adam_lr_ratio=1.0 if adam_lr is None else (adam_lr / lr_value if lr_value > 0 else 0.0),
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
            adam_weight_decay=adam_weight_decay,
            maximize=maximize,
            use_magma=use_magma,
            magma_p=magma_p,
            magma_tau=magma_tau,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding or use_magma),
        )
        super().__init__(params, defaults)
        self._check_spec_keys()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_non_negative("weight_decay value", group["weight_decay"])
        check_range("momentum value", group["momentum"], 0.0, 1.0)
        _coefficient_args(group["ns_coefficients"], "ns_coefficients")
        check_non_negative("epsilon value (eps)", group["eps"])
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps < 100:
            raise ValueError(f"Invalid ns_steps: must be an int in [1, 100), got {steps!r}")
        if group["adjust_lr_fn"] is not None and group["adjust_lr_fn"] not in _ADJUST_LR_FNS:
            raise ValueError(
                f"Invalid adjust_lr_fn: must be None or one of {_ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
            )
        if str(group["ns_normalization"]).lower() not in _NORMALIZATIONS:
            raise ValueError(
                f"Invalid ns_normalization: must be one of {_NORMALIZATIONS}, got {group['ns_normalization']!r}"
            )
        if group["ns_dtype"] is not None and not group["ns_dtype"].is_floating_point:
            raise ValueError(f"Invalid ns_dtype: must be a floating dtype or None, got {group['ns_dtype']}")
        check_betas(group["adam_betas"])
        check_non_negative("adam_eps value", group["adam_eps"])
        if group["adam_weight_decay"] is not None:
            check_non_negative("adam_weight_decay value", group["adam_weight_decay"])
        check_range("magma_p value", group["magma_p"], 0.0, 1.0, high_inclusive=True)
        if not group["magma_tau"] > 0:
            raise ValueError(f"Invalid magma_tau: must be > 0, got {group['magma_tau']}")
        check_state_dtype(group["state_dtype"])
        self._check_matrix_dims(group)
        self._check_routing(group)

    def _adam_weight_decay(self, group: dict[str, Any]) -> float:
        return group["weight_decay"] if group["adam_weight_decay"] is None else group["adam_weight_decay"]

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=_coefficient_args(group["ns_coefficients"], "ns_coefficients")[0],
            ns_preset=_coefficient_args(group["ns_coefficients"], "ns_coefficients")[1],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
            adjust_lr_fn=group["adjust_lr_fn"] or "original",
            ns_normalization=str(group["ns_normalization"]).lower(),
            ns_dtype=group["ns_dtype"],
            maximize=group["maximize"],
            use_magma=group["use_magma"],
            magma_p=group["magma_p"],
            magma_tau=group["magma_tau"],
        )

    # -- whole-matrix ownership hooks (see _matrix.MatrixOptimizer) ----------

    def _owner_momentum(self, group, grads, moments, state_steps, grad_scale):
        # On the grads' device (CUDA params: the op runs there, NCCL reduces the sums there).
        device = grads[0].device if grads else None
        inputs = [torch.empty(m.shape, dtype=m.dtype, device=m.device) for m in moments]
        sums = torch.zeros((len(grads) if group["use_magma"] else 0, 3), dtype=torch.float64, device=device)
        torch.ops.torchopt_ext.muon_momentum_(
            grads,
            moments,
            state_steps,
            inputs,
            sums,
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            use_magma=group["use_magma"],
            grad_scale=grad_scale,
        )
        return [[t] for t in inputs], sums

    def _owner_compute(self, group, whole):
        coefficients, preset = _coefficient_args(group["ns_coefficients"], "ns_coefficients")
        kwargs = dict(
            coefficients=coefficients,
            preset=preset,
            steps=group["ns_steps"],
            normalization=str(group["ns_normalization"]).lower(),
            eps=group["eps"],
            dtype=group["ns_dtype"],
        )
        # Equal shapes in one call (the CPU core still runs them one by one,
        # so a result does not depend on its batch).
        out = [None] * len(whole)
        by_shape = {}
        for j, (x,) in enumerate(whole):
            by_shape.setdefault(tuple(x.shape), []).append(j)
        for idx in by_shape.values():
            batch = torch.ops.torchopt_ext.newton_schulz(torch.stack([whole[j][0] for j in idx]), **kwargs)
            for j, y in zip(idx, batch.unbind(0)):
                out[j] = y
        return out

    def _owner_result_dtype(self, group, input_dtype):
        return group["ns_dtype"] or input_dtype

    def _owner_lr_scale(self, group):
        return group["adjust_lr_fn"] or "original"
