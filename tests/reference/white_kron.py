"""White-Kron skew / quad (white_kron.md, eformer's blocked Kronecker PSGD) in
float64, one tile at a time with plain 2-D math (torchopt_ext batches the
tiles). Random draws follow torchopt_ext's documented order
(csrc/include/torchopt_ext/functional/white_kron.h): float64 Gaussians from a
CPU generator seeded with mix64(mix64(seed) ^ mix64(8 step + path) ^ 2 index)."""

from __future__ import annotations

import math

import torch

MASK = (1 << 64) - 1
BETA_L = 0.95


def mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def generator(seed: int, step: int, path: int, index: int) -> torch.Generator:
    value = mix64(mix64(seed & MASK) ^ mix64((step * 8 + path) & MASK) ^ ((index << 1) & MASK))
    return torch.Generator().manual_seed(value)


def merge_dims(shape):
    if len(shape) < 2 or math.prod(shape) == max(shape):
        return (math.prod(shape),)
    if len(shape) == 2:
        return tuple(shape)
    best, split = float("inf"), 1
    for s in range(1, len(shape)):
        lp, rp = math.prod(shape[:s]), math.prod(shape[s:])
        ratio = max(lp, rp) / min(lp, rp)
        if ratio < best:
            best, split = ratio, s
    return (math.prod(shape[:split]), math.prod(shape[split:]))


def norm_lower_bound(a, probe, skew=False):
    scale = a.abs().max() if skew else a.diagonal().max()
    a = a / scale
    energies = (a * a).mean(1)
    j = int(torch.argmax(energies))
    x = (a[j] / math.sqrt(float(energies[j])) + probe) @ a
    for _ in range(5):
        x = x / x.abs().max()
        x = x @ a
    x = (x / x.norm(dim=1, keepdim=True)) @ a
    return float(x.norm(dim=1).max() * scale)


def procrustes(q, probe, max_step=0.125):
    r = q.T - q
    max_abs = float(r.abs().max())
    if not max_abs > torch.finfo(q.dtype).tiny:
        return q
    r = r / max_abs
    rq = r @ q
    tr_rq = float(rq.trace())
    if not tr_rq > 0:
        return q
    a = max_step / norm_lower_bound(r, probe, skew=True)
    rrq = r @ rq
    tr_rrq = float(rrq.trace())
    if tr_rrq < 0:
        a = min(a, -tr_rq / tr_rrq)
    return q + a * (rq + 0.5 * a * rrq)


def dense_update(term1, term2, lip, q, plr, skew, ell_probe, rot_probe):
    ell = norm_lower_bound(term1, ell_probe) + term2
    lip = max(BETA_L * lip + (1 - BETA_L) * ell, ell)
    if skew:
        z = plr / lip
        return procrustes(q - z * (term1 @ q - term2 * q), rot_probe), lip
    z = plr / (2 * lip)
    p = q - z * (term1 @ q - term2 * q)
    p = p - z * (p @ term1 - p * term2)
    return (p + p.T) / 2, lip


def diag_update(term1, term2, lip, q, plr, skew):
    ell = float(term1.max()) + term2
    lip = max(BETA_L * lip + (1 - BETA_L) * ell, ell)
    z = plr / lip if skew else plr / (2 * lip)
    gain = 1 - z * (term1 - term2)
    return (q * gain if skew else q * gain * gain), lip


def identity_padded(bs, valid):
    eye = torch.zeros(bs, bs, dtype=torch.float64)
    eye[:valid, :valid] = torch.eye(valid, dtype=torch.float64)
    return eye


class WhiteKronReference:
    def __init__(
        self,
        params,
        lr=1e-3,
        b1=0.95,
        weight_decay=0.1,
        update_style="skew",
        lr_style="adam",
        normalize_grads=False,
        max_size_dense=16384,
        preconditioner_lr=0.7,
        preconditioner_init_scale=1.0,
        block_size=256,
        noise_scale=1e-9,
        balance_every=100,
        seed=0,
    ):
        self.params = list(params)
        self.lr, self.b1, self.wd = lr, b1, weight_decay
        self.skew = update_style == "skew"
        self.adam = lr_style == "adam"
        self.normalize = normalize_grads
        self.max_dense, self.plr0, self.bs = max_size_dense, preconditioner_lr, block_size
        self.noise, self.balance_every, self.seed = noise_scale, balance_every, seed
        self.t = 0
        self.mu = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        s, bs = preconditioner_init_scale, block_size
        self.state = []
        for p in self.params:
            merged = merge_dims(tuple(p.shape))
            st = {"merged": merged}
            if len(merged) == 1:
                st.update(kind="one_d", q=torch.full(merged, s, dtype=torch.float64), lip=0.0)
            else:
                m, n = merged
                if m <= self.max_dense and n <= self.max_dense:
                    tiles = []
                    for r in range(math.ceil(m / bs)):
                        for c in range(math.ceil(n / bs)):
                            vr, vc = min(bs, m - r * bs), min(bs, n - c * bs)
                            tiles.append(
                                dict(
                                    r=r,
                                    c=c,
                                    vr=vr,
                                    vc=vc,
                                    ql=identity_padded(bs, vr) * s,
                                    qr=identity_padded(bs, vc) * s,
                                    ll=0.0,
                                    lr=0.0,
                                )
                            )
                    st.update(kind="dense", tiles=tiles)
                elif m > self.max_dense and n > self.max_dense:
                    st.update(
                        kind="diag",
                        ql=torch.full((m,), s, dtype=torch.float64),
                        qr=torch.full((n,), s, dtype=torch.float64),
                        ll=0.0,
                        lr=0.0,
                    )
                else:
                    rows = n > self.max_dense  # m is the small side: row strips
                    small, big = (m, n) if rows else (n, m)
                    strips = []
                    for k in range(math.ceil(small / bs)):
                        v = min(bs, small - k * bs)
                        strips.append(
                            dict(
                                k=k,
                                v=v,
                                dense=identity_padded(bs, v) * s,
                                diag=torch.full((big,), s, dtype=torch.float64),
                                ll=0.0,
                                lr=0.0,
                            )
                        )
                    st.update(kind="rows" if rows else "cols", strips=strips)
            self.state.append(st)

    def _plr(self):
        return max(self.plr0 / math.sqrt(1 + self.t / 10000), 0.4)

    def _precondition_block(self, g, gn, ql, qr, ll, lr_, vr, vc, diag_left, diag_right, probes):
        """One block: probes is an iterator over this block's (ell, rot) probe rows."""
        plr = self._plr()

        def left(q, x):
            return (q * q)[:, None] * x if diag_left else q.T @ q @ x

        def right(q, x):
            return x * (q * q)[None, :] if diag_right else x @ q.T @ q

        pg = right(qr, left(ql, gn))
        if diag_left:
            ql, ll = diag_update((pg * pg).sum(1), vc, ll, ql, plr, self.skew)
        else:
            e, r = next(probes)
            ql, ll = dense_update(pg @ pg.T, vc, ll, ql, plr, self.skew, e, r)
        if diag_right:
            qr, lr_ = diag_update((pg * pg).sum(0), vr, lr_, qr, plr, self.skew)
        else:
            e, r = next(probes)
            qr, lr_ = dense_update(pg.T @ pg, vr, lr_, qr, plr, self.skew, e, r)
        return right(qr, left(ql, g)), ql, qr, ll, lr_

    def _probe_draws(self, gen, count):
        """Left (ell, rot), then right (ell, rot) probes, each (count, 4, bs)."""
        sides = []
        for _ in range(2):
            ell = torch.randn(count, 4, self.bs, generator=gen, dtype=torch.float64)
            rot = torch.randn(count, 4, self.bs, generator=gen, dtype=torch.float64) if self.skew else None
            sides.append((ell, rot))
        return sides

    @torch.no_grad()
    def step(self):
        self.t += 1
        t, bs = self.t, self.bs
        u = []
        for i, p in enumerate(self.params):
            g = p.grad.to(torch.float64)
            if self.b1 > 0:
                self.mu[i] = self.b1 * self.mu[i] + (1 - self.b1) * g
                x = self.mu[i] / (1 - self.b1**t)
            else:
                x = g
            if self.normalize:
                x = x / (x.norm() + 1e-6)
            u.append(x)
        out = [None] * len(self.params)
        # Dense tiles: one stack, one generator, draws for the whole stack.
        dense = [i for i, st in enumerate(self.state) if st["kind"] == "dense"]
        if dense:
            tiles = [(i, tile) for i in dense for tile in self.state[i]["tiles"]]
            if t % self.balance_every == 0:
                for _, tile in tiles:
                    nl, nr = float(tile["ql"].abs().max()), float(tile["qr"].abs().max())
                    s = math.sqrt(nl * nr)
                    tile["ql"], tile["qr"] = tile["ql"] * (s / nl), tile["qr"] * (s / nr)
            gen = generator(self.seed, t, 0, 0)
            noise = torch.randn(len(tiles), bs, bs, generator=gen, dtype=torch.float64)
            (le, lr_rot), (re, rr_rot) = self._probe_draws(gen, len(tiles))
            results = {i: torch.zeros(self.state[i]["merged"], dtype=torch.float64) for i in dense}
            for k, (i, tile) in enumerate(tiles):
                m, n = self.state[i]["merged"]
                full = u[i].reshape(m, n)
                g = torch.zeros(bs, bs, dtype=torch.float64)
                r0, c0, vr, vc = tile["r"] * bs, tile["c"] * bs, tile["vr"], tile["vc"]
                g[:vr, :vc] = full[r0 : r0 + vr, c0 : c0 + vc]
                gn = g.clone()
                gn[:vr, :vc] += self.noise * noise[k, :vr, :vc]
                probes = iter([(le[k], lr_rot[k] if self.skew else None), (re[k], rr_rot[k] if self.skew else None)])
                pg, tile["ql"], tile["qr"], tile["ll"], tile["lr"] = self._precondition_block(
                    g, gn, tile["ql"], tile["qr"], tile["ll"], tile["lr"], vr, vc, False, False, probes
                )
                results[i][r0 : r0 + vr, c0 : c0 + vc] = pg[:vr, :vc]
            for i in dense:
                out[i] = results[i].reshape(self.params[i].shape)
        for i, st in enumerate(self.state):
            kind = st["kind"]
            if kind == "dense":
                continue
            path = {"diag": 1, "rows": 2, "cols": 3, "one_d": 4}[kind]
            gen = generator(self.seed, t, path, i)
            if kind == "one_d":
                g = u[i].reshape(-1)
                gn = g + self.noise * torch.randn(g.shape, generator=gen, dtype=torch.float64)
                pg = st["q"] ** 2 * gn
                st["q"], st["lip"] = diag_update(pg * pg, 1.0, st["lip"], st["q"], self._plr(), self.skew)
                out[i] = (st["q"] ** 2 * g).reshape(self.params[i].shape)
                continue
            m, n = st["merged"]
            g2 = u[i].reshape(m, n)
            if kind == "diag":
                gn = g2 + self.noise * torch.randn(1, m, n, generator=gen, dtype=torch.float64)[0]
                pg, st["ql"], st["qr"], st["ll"], st["lr"] = self._precondition_block(
                    g2, gn, st["ql"], st["qr"], st["ll"], st["lr"], m, n, True, True, iter(())
                )
                out[i] = pg.reshape(self.params[i].shape)
                continue
            rows = kind == "rows"
            strips = st["strips"]
            big = n if rows else m
            shape = (len(strips), bs, big) if rows else (len(strips), big, bs)
            noise = torch.randn(shape, generator=gen, dtype=torch.float64)
            (le, l_rot), (re, r_rot) = self._probe_draws(gen, len(strips))
            result = torch.zeros(m, n, dtype=torch.float64)
            for k, sp in enumerate(strips):
                v, o = sp["v"], sp["k"] * bs
                if rows:
                    g = torch.zeros(bs, n, dtype=torch.float64)
                    g[:v] = g2[o : o + v]
                    gn = g.clone()
                    gn[:v] += self.noise * noise[k, :v]
                    probes = iter([(le[k], l_rot[k] if self.skew else None)])
                    pg, sp["dense"], sp["diag"], sp["ll"], sp["lr"] = self._precondition_block(
                        g, gn, sp["dense"], sp["diag"], sp["ll"], sp["lr"], v, n, False, True, probes
                    )
                    result[o : o + v] = pg[:v]
                else:
                    g = torch.zeros(m, bs, dtype=torch.float64)
                    g[:, :v] = g2[:, o : o + v]
                    gn = g.clone()
                    gn[:, :v] += self.noise * noise[k, :, :v]
                    # Only the right side is dense: its probes come first in the draw order.
                    probes = iter([(le[k], l_rot[k] if self.skew else None)])
                    pg, sp["diag"], sp["dense"], sp["ll"], sp["lr"] = self._precondition_block(
                        g, gn, sp["diag"], sp["dense"], sp["ll"], sp["lr"], m, v, True, False, probes
                    )
                    result[:, o : o + v] = pg[:, :v]
            out[i] = result.reshape(self.params[i].shape)
        for i, p in enumerate(self.params):
            x = out[i]
            x = x * (1.1 / max(float(x.square().mean().sqrt()), 1.1))
            if self.adam:
                x = x / 5
            w = p.to(torch.float64)
            p.copy_((w * (1 - self.lr * self.wd) - self.lr * x).to(p.dtype))
