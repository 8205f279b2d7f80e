"""Float64 reference of PSGD Kron written from rollfast.md §2.2-2.4 (and LX's
formulas cited there), independent of the C++ code. It consumes a
torch.Generator in the order documented in functional/kron.h, drawing in
`draw_dtype` (the op's math dtype) so its random numbers equal the op's."""

from __future__ import annotations

import math
from typing import Optional

import torch

TINY64 = torch.finfo(torch.float64).tiny


def layout(shape, max_size=8192, max_skew=1.0, min_ndim=2, memory_save_mode=None):
    if len(shape) == 0:
        return [False]
    numel = math.prod(shape)
    forced = [memory_save_mode == "all_diag"] * len(shape)
    if memory_save_mode == "one_diag":
        largest = max(range(len(shape)), key=lambda i: (shape[i], i))
        forced[largest] = True
    return [
        not (d <= 1 or d > max_size or d * d > max_skew * numel or len(shape) < min_ndim or forced[i])
        for i, d in enumerate(shape)
    ]


def _along(x, q, axis, transpose=False):
    if x.dim() == 0:
        return x * q.reshape(())
    if q.dim() == 1:
        shape = [1] * x.dim()
        shape[axis] = q.numel()
        return x * q.reshape(shape)
    m = q.T if transpose else q
    return torch.tensordot(m, x, dims=([1], [axis])).movedim(0, axis)


def apply_q(x, qs):
    for i, q in enumerate(qs):
        x = _along(x, q, i)
    return x


def apply_p(x, qs):
    for i, q in enumerate(qs):
        x = _along(_along(x, q, i), q, i, transpose=True)
    return x


def solve_right(x, qs):
    if x.dim() == 0:
        return x / qs[0].reshape(())
    for i, q in enumerate(qs):
        if q.dim() == 1:
            shape = [1] * x.dim()
            shape[i] = q.numel()
            x = x / q.reshape(shape)
        else:
            # fibers along axis i times q^{-1}
            x = torch.tensordot(x, torch.linalg.inv(q), dims=([i], [0])).movedim(-1, i)
    return x


def gram(x, axis, dense):
    if x.dim() == 0:
        return (x * x).reshape(1)
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return rows @ rows.T if dense else (rows * rows).sum(1)


def norm_lb(A, gen, draw_dtype, skew=False):
    scale = (A.abs().max() if skew else A.diagonal().max()) + TINY64
    a = A / scale
    j = torch.argmax(torch.linalg.vector_norm(a, dim=1))
    v = torch.randn(32, a.shape[1], generator=gen, dtype=draw_dtype).to(torch.float64)
    v = a[j] + torch.sign((a[j] * v).sum(1, keepdim=True)) * v
    for _ in range(2):
        v = v @ a
        v = v / (torch.linalg.vector_norm(v, dim=1, keepdim=True) + TINY64)
        v = v @ a
    return scale * torch.linalg.vector_norm(v, dim=1).max()


def update_factor(q, t1, t2, L, mode, lr_q, beta_l, track, damping, ns_iters, gen, draw_dtype, eps):
    """Returns (new q, new L) for one factor (rollfast §2.4)."""
    dense = q.dim() == 2
    if mode == "EQ":
        t1r = t1
        s = t1 + t2
        ell = norm_lb(s, gen, draw_dtype) if dense else s.max()
    else:
        t1r = t1 + damping
        ell = (norm_lb(t1r, gen, draw_dtype) if dense else t1r.abs().max()) + t2
    if track:
        L = torch.maximum(beta_l * L + (1 - beta_l) * ell, ell)
        eta = lr_q / L
    else:
        eta = lr_q / (ell + TINY64)
    if not dense:
        return (q * (1 - eta * (t1r - t2))).abs(), L
    eye = torch.eye(q.shape[0], dtype=q.dtype)

    def sym(a):
        return 0.5 * (a + a.T)

    if mode == "EQ":
        return q - eta * torch.triu(t1 - t2) @ q, L
    if mode in ("Q0.5EQ1.5", "Q0p5EQ1p5"):
        q = q - eta * (t1r @ q - t2 * q)
        r = q.T - q
        r = r / (norm_lb(r, gen, draw_dtype, skew=True) + TINY64)
        rq = r @ q
        rrq = r @ rq
        tr_rq, tr_rrq = rq.trace(), rrq.trace()
        a = min(float(-tr_rq / tr_rrq), 0.125) if tr_rrq < 0 else 0.125
        return q + a * (rq + 0.5 * a * rrq), L
    if mode == "QUAD":
        s = eta * (t1r @ q - t2 * q)
        p = q - 0.5 * s
        p = p - 0.5 * eta * (p @ t1r - p * t2)
        return sym(p), L
    if mode == "NS":
        qp = q - eta * (t1r @ q - t2 * q)
        sigma = norm_lb(qp.T @ qp, gen, draw_dtype).sqrt()
        x = qp / (sigma + eps)
        for _ in range(ns_iters):
            x = 0.5 * x @ (3 * eye - x.T @ x)
        return sym(x.T @ qp), L
    g_sym = sym(t1r) - t2 * eye
    if mode == "EXP":
        return sym(q @ torch.linalg.matrix_exp(-eta * g_sym)), L
    if mode == "TAYLOR2":
        h = torch.minimum(eta, 0.5 / (ell - t2 + TINY64)) * g_sym
        return sym(q @ (eye - h @ (eye - 0.5 * h))), L
    if mode == "HYPER":
        return sym(q @ (eye - torch.minimum(eta, 0.9 / (ell - t2 + TINY64)) * g_sym)), L
    raise ValueError(mode)


class KronReference:
    """One param group of Kron in float64 (no bf16 storage, no Magma)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        b1=0.9,
        weight_decay=0.0,
        preconditioner_update_probability=None,
        max_size_triangular=8192,
        max_skew_triangular=1.0,
        min_ndim_triangular=2,
        memory_save_mode=None,
        whiten_grad=True,
        update_preconditioner_first=True,
        preconditioner_lr=0.1,
        preconditioner_init_scale=None,
        preconditioner_mode="Q0.5EQ1.5",
        beta_lipschitz=0.9,
        track_lipschitz=True,
        damping=1e-9,
        grad_clip_max_amps=(2.0, 10.0),
        grad_clip_mode="per_tensor_rms",
        raw_global_grad_clip: Optional[float] = None,
        permissive_spike_protection=True,
        newton_schulz_iters=5,
        seed=0,
        draw_dtype=torch.float32,
    ):
        self.params = params
        self.o = dict(locals())
        self.gen = torch.Generator()
        self.gen.manual_seed(seed)
        self.draw_dtype = draw_dtype
        self.eps = torch.finfo(draw_dtype).eps
        self.count = 0
        self.mu = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        self.layouts = [
            layout(tuple(p.shape), max_size_triangular, max_skew_triangular, min_ndim_triangular, memory_save_mode)
            for p in params
        ]
        self.Q = None
        self.L = [torch.zeros(len(lay), dtype=torch.float64) for lay in self.layouts]

    def _probability(self, n):
        prob = self.o["preconditioner_update_probability"]
        if prob is None:
            return min(max(math.exp(-0.001 * (n - 500)), 0.03), 1.0)
        return float(prob(torch.tensor(float(n)))) if callable(prob) else float(prob)

    def _init_q(self, scale):
        self.Q = []
        for p, lay in zip(self.params, self.layouts):
            k = len(lay)
            s = scale ** (1.0 / k)
            if p.dim() == 0:
                self.Q.append([torch.full((1,), s, dtype=torch.float64)])
                continue
            self.Q.append(
                [
                    torch.eye(d, dtype=torch.float64) * s if dense else torch.full((d,), s, dtype=torch.float64)
                    for d, dense in zip(p.shape, lay)
                ]
            )

    @torch.no_grad()
    def step(self):
        o = self.o
        grads = [p.grad.to(torch.float64) for p in self.params]
        n = self.count + 1
        prob = self._probability(n)
        c = o["raw_global_grad_clip"]
        if c is not None:
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            if norm > c:
                if not (o["permissive_spike_protection"] and prob >= 1.0):
                    return  # skipped: nothing changes
                grads = [g * (c / (norm + torch.finfo(torch.float32).tiny)) for g in grads]
        t = self.count
        b1 = o["b1"]
        if b1 > 0:
            beta = min(t / (1 + t), b1)
            self.mu = [(1 - beta) * g + beta * m for g, m in zip(grads, self.mu)]
        if self.Q is None:
            scale = o["preconditioner_init_scale"]
            if scale is None:
                largest = max(float((g.abs() ** 4).mean()) for g in grads)
                scale = (largest + o["damping"] ** 4) ** (-1 / 8)
            self._init_q(scale)
        do_update = float(torch.rand((), generator=self.gen, dtype=torch.float64)) < prob
        old_q = [list(qs) for qs in self.Q]
        if do_update:
            mode = o["preconditioner_mode"]
            for i, (g, m) in enumerate(zip(grads, self.mu)):
                G = g if o["whiten_grad"] else m
                V = torch.randn(G.shape, generator=self.gen, dtype=self.draw_dtype).to(torch.float64)
                noisy = G + (o["damping"] + self.eps * G.abs()) * V
                qs = self.Q[i]
                X = apply_q(noisy, qs) if mode in ("EQ", "TAYLOR2") else apply_p(noisy, qs)
                conj_b = solve_right(V, qs) if mode == "EQ" else None
                new_qs, new_l = [], self.L[i].clone()
                for f, q in enumerate(qs):
                    dense = self.layouts[i][f]
                    t1 = gram(X, f, dense)
                    t2 = gram(conj_b, f, dense) if conj_b is not None else torch.tensor(G.numel() / q.shape[0])
                    t2 = t2.to(torch.float64)
                    q_new, l_new = update_factor(
                        q,
                        t1,
                        t2,
                        self.L[i][f],
                        mode,
                        o["preconditioner_lr"],
                        o["beta_lipschitz"],
                        o["track_lipschitz"],
                        o["damping"],
                        o["newton_schulz_iters"],
                        self.gen,
                        self.draw_dtype,
                        self.eps,
                    )
                    new_qs.append(q_new)
                    if o["track_lipschitz"]:
                        new_l[f] = l_new
                self.Q[i] = new_qs
                self.L[i] = new_l
            if float(torch.rand((), generator=self.gen, dtype=torch.float64)) < 0.01:
                for i, qs in enumerate(self.Q):
                    if len(qs) > 1:
                        norms = [q.abs().max() for q in qs]
                        mean = torch.stack(norms).prod() ** (1 / len(qs))
                        self.Q[i] = [q * (mean / nq) for q, nq in zip(qs, norms)]
        use = self.Q if (do_update and o["update_preconditioner_first"]) else old_q
        updates = [apply_p(m if b1 > 0 else g, qs) for m, g, qs in zip(self.mu, grads, use)]
        amps = o["grad_clip_max_amps"]
        tiny32 = torch.finfo(torch.float32).tiny
        if amps is not None:
            a_rms, a_el = (amps, 10.0) if isinstance(amps, (int, float)) else amps
            if o["grad_clip_mode"] == "per_tensor_rms":
                updates = [
                    (u * min(1.0, a_rms / (float(u.square().mean().sqrt()) + tiny32))).clamp(-a_el, a_el)
                    for u in updates
                ]
            else:
                count = sum(u.numel() for u in updates)
                rms = math.sqrt(sum(float(u.square().sum()) for u in updates) / count)
                factor = min(1.0, a_rms / max(rms, tiny32))
                updates = [u * factor for u in updates]
        for p, u in zip(self.params, updates):
            new = p.to(torch.float64) - o["lr"] * (u + o["weight_decay"] * p.to(torch.float64))
            p.copy_(new.to(p.dtype))
        self.count += 1
