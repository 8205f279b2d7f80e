"""SOAP written from classic.md §10 in float64 (eigh / QR in float32, as the
spec prescribes), with the reference's per-dim lists of factors."""

from __future__ import annotations

import math

import torch


def merge_shape(shape, max_dim, data_format):
    if data_format == "channels_last" and len(shape) == 4:
        shape = (shape[0], shape[3], shape[1], shape[2])
    merged, acc = [], 1
    for d in shape:
        if acc * d > max_dim:
            merged.append(acc if acc > 1 else d)
            acc = d if acc > 1 else 1
        else:
            acc *= d
    if acc > 1 or not merged:
        merged.append(acc)
    return merged


class SOAPReference(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr=3e-3,
        betas=(0.95, 0.95),
        shampoo_beta=-1,
        eps=1e-8,
        weight_decay=0.01,
        precondition_frequency=10,
        max_precond_dim=10000,
        merge_dims=False,
        precondition_1d=False,
        normalize_grads=False,
        data_format="channels_first",
        correct_bias=True,
    ):
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                shampoo_beta=shampoo_beta,
                eps=eps,
                weight_decay=weight_decay,
                precondition_frequency=precondition_frequency,
                max_precond_dim=max_precond_dim,
                merge_dims=merge_dims,
                precondition_1d=precondition_1d,
                normalize_grads=normalize_grads,
                data_format=data_format,
                correct_bias=correct_bias,
            ),
        )

    @staticmethod
    def _view_shape(p, group):
        if p.dim() == 1 or not group["merge_dims"]:
            return list(p.shape)
        return merge_shape(tuple(p.shape), group["max_precond_dim"], group["data_format"])

    @staticmethod
    def _rotate(x, qs, back):
        # Contract the leading dim with Q (or Q^T back); identity dims just cycle.
        for q in qs:
            if q is None:
                x = x.permute(*range(1, x.dim()), 0)
            else:
                x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
        return x

    @staticmethod
    def _gram(g, k):
        other = [i for i in range(g.dim()) if i != k]
        return torch.tensordot(g, g, dims=(other, other))

    @staticmethod
    def _eigvecs(m):
        m32 = m.float() + 1e-30 * torch.eye(m.shape[0], dtype=torch.float32)
        return torch.linalg.eigh(m32).eigenvectors.flip(1).to(m.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta_s = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                shape = self._view_shape(p, group)
                g = p.grad.reshape(shape)
                if not state:
                    sizes = []
                    for d in shape:
                        use = d <= group["max_precond_dim"] and (p.dim() != 1 or group["precondition_1d"])
                        sizes.append(d if use else 0)
                    state["step"] = 0
                    state["m"] = torch.zeros(shape, dtype=p.dtype)
                    state["v"] = torch.zeros(shape, dtype=p.dtype)
                    state["GG"] = [(1 - beta_s) * self._gram(g, k) if d else None for k, d in enumerate(sizes)]
                    state["Q"] = [self._eigvecs(L) if L is not None else None for L in state["GG"]]
                    continue
                qs, ggs = state["Q"], state["GG"]
                g_rot = self._rotate(g, qs, back=False)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_((1 - beta1) * g_rot)
                v.mul_(beta2).add_((1 - beta2) * g_rot * g_rot)
                n = m / (v.sqrt() + group["eps"])
                s = group["lr"]
                if group["correct_bias"]:
                    s = s * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                u = self._rotate(n, qs, back=True)
                if group["normalize_grads"]:
                    u = u / (1e-30 + u.pow(2).mean().sqrt())
                p.sub_(s * u.reshape(p.shape))
                if group["weight_decay"] > 0:
                    p.sub_(group["lr"] * group["weight_decay"] * p)
                m_orig = self._rotate(m, qs, back=True)
                for k, L in enumerate(ggs):
                    if L is not None:
                        L.mul_(beta_s).add_((1 - beta_s) * self._gram(g, k))
                if t % group["precondition_frequency"] == 0:
                    for k, L in enumerate(ggs):
                        if L is None:
                            continue
                        L32, Q32 = L.float(), qs[k].float()
                        est = torch.diagonal(Q32.T @ L32 @ Q32)
                        order = torch.argsort(est, descending=True)
                        v = v.index_select(k, order)
                        qs[k] = torch.linalg.qr(L32 @ Q32[:, order]).Q.to(p.dtype)
                    state["v"] = v
                state["m"] = self._rotate(m_orig, qs, back=False)
