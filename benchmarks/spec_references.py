"""Multi-tensor (torch._foreach_*) steps written from ../shared/specs/classic.md
for the algorithms torch does not ship fused: the "what a user writes today"
baselines of bench_cuda.py, which times them eagerly and under torch.compile
(the device machine has torch alone, none of the public packages).

Each ``make_<algo>(params, **hyper)`` returns a ``step()`` closure over the
params' ``.grad`` and its own state; the step counter is a tensor on the
params' device, so the compiled step neither recompiles per step nor syncs.
tests/python/test_bench_references.py checks each against torchopt_ext's
optimizer on the CPU (float64), so the baselines compute the same update.
"""

from __future__ import annotations

from typing import Callable

import torch

Step = Callable[[], None]


def _zeros(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) for p in params]


def _counter(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=params[0].device)


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = step.to(torch.float64)
    return 1 - beta1**t, 1 - beta2**t


def _per_tensor(values: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Row i of a stacked per-tensor value, cast to tensor i's dtype (0-d)."""
    return [v.to(t.dtype) for v, t in zip(values.unbind(0), tensors)]


def make_qhadamw(params, lr=1e-3, betas=(0.9, 0.999), nus=(0.7, 1.0), eps=1e-8, weight_decay=0.0) -> Step:
    """QHAdamW (spec §6): bias-corrected moments mixed with the raw gradient."""
    (beta1, beta2), (nu1, nu2) = betas, nus
    grads = [p.grad for p in params]
    m, v, step = _zeros(params), _zeros(params), _counter(params)

    def run() -> None:
        step.add_(1)
        bc1, bc2 = _bias_corrections(step, beta1, beta2)
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        numer = torch._foreach_mul(m, nu1 / bc1)
        torch._foreach_add_(numer, grads, alpha=1 - nu1)
        denom = torch._foreach_mul(v, nu2 / bc2)
        if nu2 != 1.0:
            torch._foreach_addcmul_(denom, grads, grads, value=1 - nu2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, numer, denom, value=-lr)

    return run


def make_lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0) -> Step:
    """Lion (spec §9): the sign of an interpolated momentum."""
    beta1, beta2 = betas
    grads = [p.grad for p in params]
    m = _zeros(params)

    def run() -> None:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        update = torch._foreach_lerp(m, grads, 1 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_lerp_(m, grads, 1 - beta2)

    return run


def make_sophiag(params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, eps=1e-15) -> Step:
    """SophiaG's step (spec §12, the official code's additive eps); the
    Hessian EMA is refreshed elsewhere (it stays zero here: u = sign(m))."""
    beta1 = betas[0]
    grads = [p.grad for p in params]
    m, h = _zeros(params), _zeros(params)

    def run() -> None:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, grads, 1 - beta1)
        denom = torch._foreach_mul(h, rho)
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(m, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(params, ratio, alpha=-lr)

    return run


def make_lamb(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0) -> Step:
    """LAMB (spec §7, timm's defaults: grad averaging, bias correction,
    coupled decay in the ratio, global clip over all grads)."""
    beta1, beta2 = betas
    grads = [p.grad for p in params]
    m, v, step = _zeros(params), _zeros(params), _counter(params)

    def run() -> None:
        step.add_(1)
        bc1, bc2 = _bias_corrections(step, beta1, beta2)
        norms = torch._foreach_norm(grads)
        clip = torch.clamp(torch.linalg.vector_norm(torch.stack(norms)) / max_grad_norm, min=1.0)
        g = torch._foreach_div(grads, clip)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2.sqrt())
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(m, bc1)
        torch._foreach_div_(ratio, denom)
        if weight_decay != 0.0:
            torch._foreach_add_(ratio, params, alpha=weight_decay)
        w = torch.stack(torch._foreach_norm(params))
        q = torch.stack(torch._foreach_norm(ratio))
        trust = torch.where((w > 0) & (q > 0), w / q, torch.ones_like(w))
        torch._foreach_mul_(ratio, _per_tensor(-lr * trust, params))
        torch._foreach_add_(params, ratio)

    return run


def make_mars(params, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, gamma=0.025) -> Step:
    """MARS-AdamW, approximate mode (spec §13 branch A, every param a
    "matrix" as with optimize_1d=True): variance-reduced c, clipped to unit
    norm per tensor, then an AdamW-style step."""
    beta1, beta2 = betas
    grads = [p.grad for p in params]
    m, v, last, step = _zeros(params), _zeros(params), _zeros(params), _counter(params)
    coeff = gamma * beta1 / (1 - beta1)

    def run() -> None:
        step.add_(1)
        bc1, bc2 = _bias_corrections(step, beta1, beta2)
        c = torch._foreach_sub(grads, last)
        torch._foreach_mul_(c, coeff)
        torch._foreach_add_(c, grads)
        norms = torch.stack(torch._foreach_norm(c))
        torch._foreach_div_(c, _per_tensor(torch.clamp(norms, min=1.0), params))
        torch._foreach_lerp_(m, c, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, c, c, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bc2.sqrt())
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(denom, bc1)
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(params, m, denom, value=-lr)
        torch._foreach_copy_(last, grads)

    return run


REFERENCES = {
    "QHAdamW": make_qhadamw,
    "Lion": make_lion,
    "SophiaG": make_sophiag,
    "LAMB": make_lamb,
    "MARS": make_mars,
}
