"""Float64 Polar Express coefficients (Amsel et al. 2025) written from the
construction rollfast.md §3.3 cites: per iteration the odd quintic with the
smallest worst-case relative error on the cushioned interval (Remez exchange
on 4 points), recentred, then shrunk by the safety factor (not the last)."""

from __future__ import annotations

import math


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def best_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """a x + b x^3 + c x^5 closest to 1 on [lo, hi] in the max norm."""
    if lo / hi >= 1 - 1e-5:
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    pts = [lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]
    prev = math.inf
    for _ in range(1000):
        rows = [[x, x**3, x**5, (-1.0) ** i] for i, x in enumerate(pts)]
        a, b, c, err = _solve(rows, [1.0] * 4)
        root = math.sqrt(9 * b * b - 20 * a * c)
        pts = [lo, math.sqrt((-3 * b - root) / (10 * c)), math.sqrt((-3 * b + root) / (10 * c)), hi]
        if abs(prev - err) <= 1e-15:
            break
        prev = err
    return a, b, c


def polar_express(iters: int, lo: float = 1e-3, safety: float = 2e-2, cushion: float = 0.02407327424182761):
    hi = 1.0
    out = []
    for i in range(iters):
        a, b, c = best_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:
            scale = 2 / ((a * lo + b * lo**3 + c * lo**5) + (a * hi + b * hi**3 + c * hi**5))
            a, b, c = a * scale, b * scale, c * scale
        if i < iters - 1:
            s = 1 + safety
            a, b, c = a / s, b / s**3, c / s**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return out


# The 5-row table published with modded-nanogpt / nanochat ("num_iters=5,
# safety_factor=2e-2, cushion=2", i.e. a cushion of 0.02).
PUBLISHED_5 = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
