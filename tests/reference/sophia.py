"""Float64 reference of the Sophia update and Hessian EMA, written from
classic.md §12 (op by op, no fusion)."""

from __future__ import annotations

import torch


def sophia_step(params, grads, exp_avgs, hessians, *, lr, beta1, gamma, eps, weight_decay, eps_mode, maximize):
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        g = -g if maximize else g
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_((1 - beta1) * g)
        scaled = gamma * h
        denom = scaled + eps if eps_mode == "add" else torch.clamp(scaled, min=eps)
        p.sub_(lr * torch.clamp(m / denom, -1.0, 1.0))


def update_hessian(hessians, estimates, *, beta2):
    for h, e in zip(hessians, estimates):
        h.mul_(beta2).add_((1 - beta2) * e)
