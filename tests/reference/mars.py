"""MARS in float64, straight from the spec (classic.md §13), one tensor at a time.

Branch A (2-D params, or all with optimize_1d): c = g + gamma*b1/(1-b1)*(g - g_prev), clipped to
||c|| <= 1; m, v EMAs of c; AdamW: theta -= lr*(wd*theta + m/D), D = (sqrt(v)/sqrt(bc2) + eps)*bc1;
Lion: theta -= lr*(wd*theta + sign(m)); Shampoo (2-D): theta -= lr*(sqrt(max(1, r/c))*NS5(m/(1-b1)) + wd*theta)
with the quintic Newton-Schulz iteration in float64 (other branch-A params: the AdamW rule).
Branch B: AdamW with betas_1d, weight_decay_1d, lr_1d. g_prev is the previous grad (approximate
mode) or, with exact=True, whatever the caller put in state["g_prev"].
"""

from __future__ import annotations

import math

import torch


class MarsReference:
    def __init__(
        self,
        params,
        lr=3e-3,
        betas=(0.95, 0.99),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        gamma=0.025,
        mars_type="mars-adamw",
        optimize_1d=False,
        lr_1d=3e-3,
        betas_1d=(0.9, 0.95),
        weight_decay_1d=0.1,
        exact=False,
    ):
        self.exact = exact
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.amsgrad, self.gamma, self.mars_type, self.optimize_1d = amsgrad, gamma, mars_type, optimize_1d
        self.lr_1d, self.betas_1d, self.wd_1d = lr_1d, betas_1d, weight_decay_1d
        self.state = [
            dict(t=0, m=torch.zeros_like(p, dtype=torch.float64), v=torch.zeros_like(p, dtype=torch.float64))
            for p in params
        ]
        for s, p in zip(self.state, params):
            s["g_prev"] = torch.zeros_like(p, dtype=torch.float64)
            s["v_max"] = torch.zeros_like(p, dtype=torch.float64)

    @torch.no_grad()
    def step(self):
        for p, s in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad.double()
            theta = p.double()
            s["t"] += 1
            t = s["t"]
            if self.optimize_1d or p.dim() == 2:
                b1, b2 = self.betas
                c = g + self.gamma * b1 / (1 - b1) * (g - s["g_prev"])
                norm = c.norm()
                if norm > 1:
                    c = c / norm
                s["m"] = b1 * s["m"] + (1 - b1) * c
                if self.mars_type == "mars-lion":
                    update = self.wd * theta + torch.sign(s["m"])
                elif self.mars_type == "mars-shampoo" and p.dim() == 2:
                    rows, cols = p.shape
                    scale = math.sqrt(max(1.0, rows / cols))
                    update = scale * newton_schulz5(s["m"] / (1 - b1), self.eps) + self.wd * theta
                else:
                    s["v"] = b2 * s["v"] + (1 - b2) * c * c
                    v = s["v"]
                    if self.amsgrad:
                        s["v_max"] = torch.maximum(s["v_max"], v)
                        v = s["v_max"]
                    denom = (v.sqrt() / math.sqrt(1 - b2**t) + self.eps) * (1 - b1**t)
                    update = self.wd * theta + s["m"] / denom
                theta = theta - self.lr * update
            else:
                b1, b2 = self.betas_1d
                s["m"] = b1 * s["m"] + (1 - b1) * g
                s["v"] = b2 * s["v"] + (1 - b2) * g * g
                v = s["v"]
                if self.amsgrad:  # the official 1-D branch honours amsgrad too
                    s["v_max"] = torch.maximum(s["v_max"], v)
                    v = s["v_max"]
                denom = (v.sqrt() / math.sqrt(1 - b2**t) + self.eps) * (1 - b1**t)
                theta = theta - self.lr_1d * (self.wd_1d * theta + s["m"] / denom)
            if not self.exact:
                s["g_prev"] = g
            p.copy_(theta)


def newton_schulz5(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Five quintic steps X <- a X + b (X X^T) X + c (X X^T)^2 X (Keller Jordan's
    a, b, c) on X = M / (||M|| + eps), iterated on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m / (m.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(5):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x
