"""LAMB in float64 from the spec (classic.md §7, NVLAMB / timm form)."""

from __future__ import annotations

import torch


class LambReference:
    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.01,
        grad_averaging=True,
        max_grad_norm=1.0,
        trust_clip=False,
        always_adapt=False,
        decoupled_decay=False,
    ):
        self.params = params
        self.cfg = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=betas,
            eps=eps,
            wd=weight_decay,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
            decoupled=decoupled_decay,
        )
        self.t = 0
        self.m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.v = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    @torch.no_grad()
    def step(self):
        c = self.cfg
        b1, b2 = c["betas"]
        grads = [p.grad.double() for p in self.params]
        # 1. global clip over all grads
        if c["max_grad_norm"] is not None:
            total = torch.sqrt(sum((g * g).sum() for g in grads))
            s = max(total.item() / c["max_grad_norm"], 1.0)
            grads = [g / s for g in grads]
        # 2. one step counter for the group
        self.t += 1
        bc1 = 1 - b1**self.t if c["bias_correction"] else 1.0
        bc2 = 1 - b2**self.t if c["bias_correction"] else 1.0
        beta3 = 1 - b1 if c["grad_averaging"] else 1.0
        for i, (p, g) in enumerate(zip(self.params, grads)):
            theta = p.double()
            # 3-4. moments and the Adam ratio
            self.m[i] = b1 * self.m[i] + beta3 * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            r = (self.m[i] / bc1) / (self.v[i].sqrt() / bc2**0.5 + c["eps"])
            # 5. weight decay
            if c["wd"] != 0:
                if c["decoupled"]:
                    theta = theta * (1 - c["lr"] * c["wd"])
                else:
                    r = r + c["wd"] * theta
            # 6. trust ratio
            if c["wd"] != 0 or c["always_adapt"]:
                w, q = theta.norm().item(), r.norm().item()
                tau = w / q if w > 0 and q > 0 else 1.0
                if c["trust_clip"]:
                    tau = min(tau, 1.0)
                r = tau * r
            # 7. update
            p.copy_(theta - c["lr"] * r)
