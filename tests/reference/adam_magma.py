"""Float64 Adam/AdamW + Magma written from rollfast.md §5 (and classic.md §3
for Adam): the reference for torchopt_ext's adam_magma_step_."""

from __future__ import annotations

from typing import Callable

import torch


def adam_magma_reference(
    params: list[torch.Tensor],
    grads_per_step: list[list[torch.Tensor]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
    tau: float,
    keep: Callable[[int, int], bool],
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[list[torch.Tensor], list[float]]:
    """Returns (params, scores) after all steps. keep(t, i) is the draw z of
    tensor i at step t (1-based). Magma masks the update (decay folded in);
    the moments are updated every step. Scores are fp32 state, as rollfast
    keeps them; everything else is float64."""
    b1, b2 = betas
    params = [p.to(torch.float64).clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    scores = [torch.tensor(0.5, dtype=torch.float32) for _ in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.to(torch.float64)
            if maximize:
                g = -g
            p = params[i]
            g_eff = g + weight_decay * p if not decoupled else g
            m[i] = b1 * m[i] + (1 - b1) * g_eff
            v[i] = b2 * v[i] + (1 - b2) * g_eff * g_eff
            second = v[i]
            if amsgrad:
                vmax[i] = torch.maximum(vmax[i], v[i])
                second = vmax[i]
            # Cosine between the raw gradient and the un-corrected moment.
            denom = torch.clamp(g.norm() * m[i].norm(), min=1e-12)
            cos = torch.clamp(torch.nan_to_num((g * m[i]).sum() / denom), -1.0, 1.0)
            # fp32 state: the EMA in float64, rounded to fp32 once.
            scores[i] = (0.9 * scores[i].double() + 0.1 * torch.sigmoid(cos / tau)).float()
            scale = scores[i].item() if keep(t, i) else 0.0
            direction = (m[i] / (1 - b1**t)) / ((second / (1 - b2**t)).sqrt() + eps)
            if decoupled:
                direction = direction + weight_decay * p
            params[i] = p - lr * scale * direction
    return params, [s.item() for s in scores]
