"""rlx-optim's KronPsgd (seed 002) in float64, element by element as the crate
writes it: forward / back substitution with the crate's zero-pivot rule, the
Frobenius normaliser of the full A A^T - B B^T, the upper-triangular keep,
(Q_L^T Q_L) g (Q_R Q_R^T), the max-abs clip and the heavy-ball update. Written
independently of torchopt_ext (plain loops over rows / columns)."""

from __future__ import annotations

import torch

PIVOT_FLOOR = 1e-12


def _solve_lower_transposed(ql: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """X with ql^T X = g by forward substitution, row by row."""
    m = g.shape[0]
    x = g.clone()
    for i in range(m):
        s = x[i] - (ql[:i, i].unsqueeze(1) * x[:i]).sum(0)
        d = ql[i, i]
        x[i] = s / d if abs(float(d)) > PIVOT_FLOOR else torch.zeros_like(s)
    return x


def _solve_upper_right(qr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Y with Y qr = x, column by column."""
    n = x.shape[1]
    y = x.clone()
    for j in range(n):
        s = y[:, j] - (y[:, :j] * qr[:j, j]).sum(1)
        d = qr[j, j]
        y[:, j] = s / d if abs(float(d)) > PIVOT_FLOOR else torch.zeros_like(s)
    return y


def _factor_step(q, d, precond_lr, eps):
    scale = precond_lr / (float(d.square().sum().sqrt()) + eps)
    keep = torch.triu(torch.ones_like(d))  # j >= i
    return q - scale * (q @ (d * keep))


class KronPSGDReference:
    def __init__(self, params, lr, precond_lr=0.1, momentum=0.9, weight_decay=0.0, eps=1e-8, clip=1.0):
        self.params = list(params)
        self.lr, self.precond_lr, self.mu = lr, precond_lr, momentum
        self.wd, self.eps, self.clip = weight_decay, eps, clip
        self.v = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.ql = [torch.eye(p.shape[0], dtype=torch.float64) if p.dim() == 2 else None for p in self.params]
        self.qr = [torch.eye(p.shape[1], dtype=torch.float64) if p.dim() == 2 else None for p in self.params]

    @torch.no_grad()
    def step(self):
        for i, p in enumerate(self.params):
            g = p.grad.to(torch.float64)
            w = p.to(torch.float64)
            if p.dim() != 2:
                self.v[i] = self.mu * self.v[i] + g + self.wd * w
            else:
                ql, qr = self.ql[i], self.qr[i]
                a = ql @ g @ qr.T
                b = _solve_upper_right(qr, _solve_lower_transposed(ql, g))
                self.ql[i] = _factor_step(ql, a @ a.T - b @ b.T, self.precond_lr, self.eps)
                self.qr[i] = _factor_step(qr, a.T @ a - b.T @ b, self.precond_lr, self.eps)
                ql, qr = self.ql[i], self.qr[i]
                pg = (ql.T @ ql) @ g @ (qr @ qr.T)
                max_abs = float(torch.nan_to_num(pg.abs(), nan=0.0).max())
                scale = self.clip / max_abs if max_abs > self.clip else 1.0
                self.v[i] = self.mu * self.v[i] + (scale * pg + self.wd * w)
            p.copy_((w - self.lr * self.v[i]).to(p.dtype))
