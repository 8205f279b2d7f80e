"""Adafactor in float64 from the spec (classic.md §8) with torch.optim.Adafactor's
epsilon placement and lr-scaled weight decay, plus the Hugging Face extras:
beta1 (momentum of the scaled, clipped update), relative_step=False,
scale_parameter=False and warmup_init."""

from __future__ import annotations

import math

import torch


class AdafactorReference:
    def __init__(
        self,
        params,
        lr=1e-2,
        beta2_decay=-0.8,
        eps=(None, 1e-3),
        d=1.0,
        weight_decay=0.0,
        maximize=False,
        beta1=None,
        relative_step=True,
        scale_parameter=True,
        warmup_init=False,
    ):
        self.params = params
        self.lr, self.decay, self.d, self.wd = lr, beta2_decay, d, weight_decay
        self.eps1 = [eps[0] if eps[0] is not None else torch.finfo(p.dtype).eps for p in params]
        self.eps2 = eps[1]
        self.maximize, self.beta1 = maximize, beta1
        self.relative_step, self.scale_parameter, self.warmup_init = relative_step, scale_parameter, warmup_init
        self.t = 0
        self.state = []
        for p in params:
            s = {}
            if p.dim() >= 2:
                s["R"] = torch.zeros(p.shape[:-1], dtype=torch.float64)  # one value per row
                s["C"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float64)  # one per column
            else:
                s["V"] = torch.zeros(p.shape, dtype=torch.float64)
            if beta1 is not None:
                s["M"] = torch.zeros(p.shape, dtype=torch.float64)
            self.state.append(s)

    @torch.no_grad()
    def step(self):
        self.t += 1
        t = self.t
        for p, s, eps1 in zip(self.params, self.state, self.eps1):
            theta = p.to(torch.float64)
            g = p.grad.to(torch.float64)
            if self.maximize:
                g = -g
            rho = self.lr
            if self.relative_step:
                rho = min(self.lr, 1.0 / math.sqrt(t))
                if self.warmup_init:
                    rho = min(rho, 1e-6 * t)
            rms_theta = theta.pow(2).mean().sqrt().item()
            alpha = max(self.eps2, rms_theta) * rho if self.scale_parameter else rho
            w = t**self.decay  # 1 - beta2_t
            if p.dim() >= 2:
                s["R"] = (1 - w) * s["R"] + w * (g * g).mean(dim=-1)
                s["C"] = (1 - w) * s["C"] + w * (g * g).mean(dim=-2)
                row_mean = s["R"].mean(dim=-1).clamp(min=eps1)  # over the rows of each matrix
                v_hat = s["R"].unsqueeze(-1) * s["C"].unsqueeze(-2) / row_mean[..., None, None]
            else:
                s["V"] = (1 - w) * s["V"] + w * g * g
                v_hat = s["V"]
            u = g / v_hat.clamp(min=eps1 * eps1).sqrt()
            u = u / max(1.0, u.pow(2).mean().sqrt().item() / self.d)
            theta = theta * (1 - self.lr * self.wd)
            if self.beta1 is not None:
                s["M"] = self.beta1 * s["M"] + (1 - self.beta1) * alpha * u
                theta = theta - s["M"]
            else:
                theta = theta - alpha * u
            p.copy_(theta)
