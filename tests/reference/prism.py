"""PRISM's matrix branch in float64, written from rollfast.md §3.3 in rollfast's
own orientation: each torch (out, in) weight W is handled as G = W^T, an
(m = in) x (n = out) matrix, so the test also checks the orientation claim
(augmentation along rows there = along dim 1 of the torch weight)."""

from __future__ import annotations

import math

import torch

STANDARD = ((3.4445, -4.775, 2.0315),)
INV_ROOT_ROWS = (
    (3.85003, -10.8539, 8.61893),
    (1.80992, -0.587778, 0.0647852),
    (1.50394, -0.594516, 0.121161),
    (45 / 32, -9 / 16, 5 / 32),
)


def quintic_ns(z, rows, iters):
    """rollfast's quintic NS: transpose when rows > cols, X / (|X|_F + 1e-8),
    X <- a X + (b A + c A^2) X with A = X X^T."""
    transposed = z.shape[0] > z.shape[1]
    x = z.T if transposed else z
    x = x / (x.norm() + 1e-8)
    for i in range(iters):
        a, b, c = rows[min(i, len(rows) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


def _sym(a):
    return 0.5 * (a + a.T)


def bidirectional(m_, d_, gamma_l, gamma_r, inv_steps, inv_eps, inv_scale, eps_gram):
    """H_L^{-1/4} M H_R^{-1/4} (rollfast orientation: H_L is m x m)."""
    g_max = max(gamma_l, gamma_r)
    s = max(math.sqrt(float(m_.square().sum() + g_max**2 * d_.square().sum())), 1e-30)
    m, d = m_ / s, d_ / s
    h_l = _sym(m @ m.T + gamma_l**2 * d @ d.T) + eps_gram * torch.eye(m.shape[0], dtype=m.dtype)
    h_r = _sym(m.T @ m + gamma_r**2 * d.T @ d) + eps_gram * torch.eye(m.shape[1], dtype=m.dtype)
    t_q = 1.05 * h_l.norm()
    t_p = 1.05 * h_r.norm()
    q = h_l / t_q + inv_eps * torch.eye(m.shape[0], dtype=m.dtype)
    p = h_r / t_p + inv_eps * torch.eye(m.shape[1], dtype=m.dtype)
    g = m
    for k in range(inv_steps):
        a, b, c = INV_ROOT_ROWS[min(k, 3)]
        a, b, c = a / inv_scale, b / inv_scale**5, c / inv_scale**9
        w_q = _sym(a * torch.eye(q.shape[0], dtype=q.dtype) + b * q + c * q @ q)
        w_p = _sym(a * torch.eye(p.shape[0], dtype=p.dtype) + b * p + c * p @ p)
        q = _sym(q @ torch.linalg.matrix_power(w_q, 4))
        p = _sym(p @ torch.linalg.matrix_power(w_p, 4))
        g = w_q @ g @ w_p
    return g * t_q ** (-0.25) * t_p ** (-0.25)


class PrismReference:
    """Matrix params only (the AdamW branch is torch's AdamW)."""

    def __init__(
        self,
        params,
        lr,
        b1=0.95,
        gamma=1.0,
        weight_decay=0.0,
        ns_iters=5,
        ns_coeffs=STANDARD,
        mode="original",
        inv_steps=6,
        inv_eps=1e-5,
        inv_scale=1.001,
        eps_gram=1e-6,
        gamma_l=None,
        gamma_r=None,
        nesterov=True,
        shape_nesterov=True,
        bias_correction=False,
        momentum_accumulator="ema",
        grad_clip_max_amps=(2.0, 10.0),
        raw_global_grad_clip=None,
        permissive_spike_protection=True,
    ):
        self.params = params
        self.c = dict(locals())
        self.mu = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        self.count = 0

    def step(self):
        c = self.c
        beta = c["b1"]
        ema = c["momentum_accumulator"] == "ema"
        grads = [p.grad.to(torch.float64) for p in self.params]
        skip = False
        if c["raw_global_grad_clip"] is not None:
            norm = math.sqrt(sum(float(g.square().sum()) for g in grads))
            if norm > c["raw_global_grad_clip"]:
                skip = not c["permissive_spike_protection"]
                grads = [g * (c["raw_global_grad_clip"] / (norm + torch.finfo(torch.float32).tiny)) for g in grads]
        if skip:  # rollfast 1.1: the whole state is kept
            return
        self.count += 1
        t = self.count
        for i, (p, g_torch) in enumerate(zip(self.params, grads)):
            rows = p.shape[0]
            g = g_torch.reshape(rows, -1).T  # rollfast orientation (in, out)
            m_prev = self.mu[i].reshape(rows, -1).T
            m = (1 - beta) * g + beta * m_prev if ema else g + beta * m_prev
            self.mu[i] = m.T.reshape(p.shape).clone()

            def look(x, g=g):
                return beta * x + (1 - beta) * g if ema else beta * x + g

            if c["nesterov"] and c["shape_nesterov"]:
                if c["bias_correction"] and ema:
                    target = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
                else:
                    target = look(m)
            elif not c["nesterov"] and c["bias_correction"] and ema:
                target = m / (1 - beta**t)
            else:
                target = m
            d = g - m
            if c["mode"] == "original":
                z = torch.cat([target, c["gamma"] * d], dim=0)
                o = quintic_ns(z, c["ns_coeffs"], c["ns_iters"])[: target.shape[0]]
            else:
                gl = c["gamma"] if c["gamma_l"] is None else c["gamma_l"]
                gr = c["gamma"] if c["gamma_r"] is None else c["gamma_r"]
                o = bidirectional(target, d, gl, gr, c["inv_steps"], c["inv_eps"], c["inv_scale"], c["eps_gram"])
            if c["nesterov"] and not c["shape_nesterov"]:
                o = look(o)
            if c["grad_clip_max_amps"] is not None:
                a_rms, a_el = c["grad_clip_max_amps"]
                rms = o.square().mean().sqrt()
                o = o * min(1.0, a_rms / (float(rms) + 1e-9))
                o = o.clamp(-a_el, a_el)
            u = o.T.reshape(p.shape)
            with torch.no_grad():
                p.add_(-c["lr"] * (u + c["weight_decay"] * p.to(torch.float64)).to(p.dtype))
