"""Diagonal Hessian estimators for Sophia (classic.md §12).

Both return one estimate per param, aligned with ``params``: float32 for
bfloat16/float16 params, else in the param's dtype; zeros for params the
output does not depend on. The C++ twins live in ``torchopt_ext::hessian``
(``csrc/include/torchopt_ext/hessian.h``); they call the same ATen samplers
in the same order.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sample_probes", "hutchinson", "gauss_newton_bartlett"]

_DISTRIBUTIONS = ("rademacher", "gaussian")


def _estimate_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _check_params(fn: str, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    params = list(params)
    for i, p in enumerate(params):
        if not (isinstance(p, torch.Tensor) and p.requires_grad and p.is_floating_point()):
            raise ValueError(f"{fn}: params[{i}] must be a floating tensor that requires grad")
    return params


def sample_probes(
    params: Sequence[torch.Tensor],
    *,
    generator: Optional[torch.Generator] = None,
    distribution: str = "rademacher",
) -> list[torch.Tensor]:
    """One probe per param, in param order: Rademacher (+-1, drawn as
    ``randint(0, 2) * 2 - 1``) or standard Gaussian, drawn on the CPU from
    ``generator`` (torch's default generator when None) and moved to the
    param's device and dtype."""
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f'sample_probes: distribution must be "rademacher" or "gaussian", got {distribution!r}')
    probes = []
    for p in params:
        if distribution == "rademacher":
            z = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int64).mul_(2).sub_(1)
        else:
            z = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        probes.append(z.to(device=p.device, dtype=p.dtype))
    return probes


def hutchinson(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    generator: Optional[torch.Generator] = None,
    n_samples: int = 1,
    distribution: str = "rademacher",
) -> list[torch.Tensor]:
    """Hutchinson's estimate of diag(H), H the Hessian of the scalar ``loss``
    w.r.t. ``params``: the mean over ``n_samples`` probes z of ``z * (H z)``,
    with H z from a double backward. ``loss`` must be built with autograd on.
    Unbiased: E[z * Hz] = diag(H) for Rademacher or Gaussian z."""
    if not n_samples >= 1:
        raise ValueError(f"hutchinson: n_samples must be >= 1, got {n_samples}")
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise ValueError("hutchinson: loss must be a one-element tensor that requires grad (built with autograd on)")
    params = _check_params("hutchinson", params)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # Gradients that no longer depend on the params carry no Hessian term.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        estimates = [torch.zeros(p.shape, dtype=_estimate_dtype(p), device=p.device) for p in params]
        for s in range(n_samples):
            probes = sample_probes(params, generator=generator, distribution=distribution)
            if not live:
                continue
            hz = torch.autograd.grad(
                [grads[i] for i in live],
                params,
                grad_outputs=[probes[i] for i in live],
                retain_graph=s + 1 < n_samples,
                allow_unused=True,
            )
            for e, z, h in zip(estimates, probes, hz):
                if h is not None:
                    e.add_(z.to(e.dtype) * h.detach().to(e.dtype))
    if n_samples > 1:
        for e in estimates:
            e.div_(n_samples)
    return estimates


def gauss_newton_bartlett(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    generator: Optional[torch.Generator] = None,
) -> list[torch.Tensor]:
    """Gauss-Newton-Bartlett estimate of diag(H) for a softmax cross-entropy
    model: labels y ~ Categorical(softmax(logits)) per row of ``logits``
    (shape (..., C)), g = grad of mean cross_entropy(logits, y), estimate
    ``B * g * g`` with B = logits.numel() / C, the paper's token count.
    Labels are sampled on the CPU from float32 probabilities."""
    if not (isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.numel() > 0):
        raise ValueError("gauss_newton_bartlett: logits must be a non-empty tensor of shape (..., C)")
    if not (logits.is_floating_point() and logits.requires_grad):
        raise ValueError("gauss_newton_bartlett: logits must be floating and require grad (built with autograd on)")
    params = _check_params("gauss_newton_bartlett", params)
    classes = logits.shape[-1]
    tokens = logits.numel() // classes
    flat = logits.reshape(tokens, classes)
    with torch.no_grad():
        probs = torch.softmax(flat.detach().to(device="cpu", dtype=torch.float32), dim=-1)
        labels = torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(-1).to(logits.device)
    with torch.enable_grad():
        loss = F.cross_entropy(flat, labels)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    estimates = []
    for p, g in zip(params, grads):
        dtype = _estimate_dtype(p)
        if g is None:
            estimates.append(torch.zeros(p.shape, dtype=dtype, device=p.device))
        else:
            g = g.detach().to(dtype)
            estimates.append(g * g * float(tokens))
    return estimates
