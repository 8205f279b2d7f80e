"""The generic Schedule-Free wrapper in float64, written from rollfast.md §4.2
(with the SF+ Polyak scalar rho of step 3 when polyak=True, else rho = 1),
over plain SGD (delta = -gamma_eff * g) as the base."""

from __future__ import annotations

import math


class ScheduleFreeSGDReference:
    """x/y/z kept explicitly; `lr(k)` is the learning rate of step k."""

    def __init__(
        self,
        params,
        lr,
        b1=0.9,
        weighting_mode="practical",
        r=0.0,
        weight_lr_power=2.0,
        use_lr_max=False,
        c_warmup=0,
        b1_anneal_steps=0,
        b1_max=0.965,
        adamc_weight_decay=0.0,
        lr_max_init=1e-8,
        polyak=False,
        polyak_beta=0.0,
        polyak_f_star=0.0,
        polyak_eps=1e-30,
    ):
        self.y = [p.detach().double().clone() for p in params]
        self.z = [p.clone() for p in self.y]
        self.lr = lr
        self.cfg = dict(
            b1=b1,
            mode=weighting_mode.lower(),
            r=r,
            p=weight_lr_power,
            use_lr_max=use_lr_max,
            c_warmup=c_warmup,
            anneal=b1_anneal_steps,
            b1_max=b1_max,
            adamc=adamc_weight_decay,
            polyak=polyak,
            polyak_beta=polyak_beta,
            f_star=polyak_f_star,
            polyak_eps=polyak_eps,
        )
        self.k = 0
        self.weight_sum = 0.0
        self.lr_max = lr_max_init
        self.b1 = b1
        self.g1_ema = 0.0
        self.polyak_count = 0
        self.rho = 1.0

    def _beta_next(self) -> float:
        c = self.cfg
        if c["anneal"] == 0:
            return c["b1"]
        frac = min((self.k + 1) / c["anneal"], 1.0)
        return 1.0 - math.exp((1 - frac) * math.log(1 - c["b1"]) + frac * math.log(1 - c["b1_max"]))

    def step(self, grads, loss=None):
        c = self.cfg
        gamma = self.lr(self.k)
        beta_prev = max(self.b1, 1e-8)
        beta_next = self._beta_next()
        rho = 1.0
        if c["polyak"]:
            inner = sum(float((g.double() * (z - y)).sum()) for g, y, z in zip(grads, self.y, self.z))
            l1 = sum(float(g.double().abs().sum()) for g in grads)
            self.polyak_count += 1
            b = c["polyak_beta"]
            self.g1_ema = b * self.g1_ema + (1 - b) * math.sqrt(math.pi / 2) * l1
            g1_hat = self.g1_ema / (1 - b**self.polyak_count)
            rho = max(0.0, float(loss) - c["f_star"] + (beta_next / beta_prev) * inner) / max(g1_hat, c["polyak_eps"])
            self.rho = rho
        gamma = rho * gamma
        self.lr_max = max(self.lr_max, gamma)
        g_hat = self.lr_max if (c["use_lr_max"] or c["mode"] == "power") else gamma
        w = {"schedulet": g_hat, "practical": g_hat ** c["p"], "power": g_hat ** c["p"], "theoretical": 1.0}[c["mode"]]
        w *= (self.k + 1) ** c["r"]
        if self.k < c["c_warmup"]:
            ck = 1.0
        else:
            self.weight_sum += w
            ck = w / max(self.weight_sum, 1e-30) if self.weight_sum > 0 else 0.0
        for i, g in enumerate(grads):
            y, z = self.y[i], self.z[i]
            z_next = z - gamma * g.double() - gamma**2 * c["adamc"] * y
            y_next = (beta_next / beta_prev) * (1 - ck) * (y - (1 - beta_prev) * z) + (
                beta_next * ck + 1 - beta_next
            ) * z_next
            self.y[i], self.z[i] = y_next, z_next
        self.k += 1
        self.b1 = beta_next

    def x(self):
        beta = max(self.b1, 1e-8)
        return [(y - (1 - beta) * z) / beta for y, z in zip(self.y, self.z)]
