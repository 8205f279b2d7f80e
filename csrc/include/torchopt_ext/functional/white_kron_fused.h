// Element-wise passes of the WhiteKron tile-stack update, fused. Each
// function works on a stack of T tiles (T, r, c) with per-tile scalars given
// as (T,) tensors, and is bitwise the chain of ATen ops named in its comment:
// CPU float / double contiguous tensors take one loop over the stack
// (parallel over tiles), anything else (CUDA) runs the ATen chain itself.
// Why: at one thread each pass over a (64, 256, 256) stack costs 0.5-1 ms in
// place and 5-10 ms when it allocates its result (page faults), and the
// chains below made ~10 such passes per step and side.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchopt_ext::functional::white_kron_fused {

// out = noise.to(g's dtype) * noise_scale + g (noise may be float64 on the
// CPU: the cast is part of the pass). out: same shape as g, may be g.
void noisy_(const at::Tensor& out, const at::Tensor& noise, double noise_scale, const at::Tensor& g);

// out = (out - t2 * q) * (-z) + q per tile: Q - z (T1 Q - T2 Q) with out
// holding T1 Q (ATen: out.sub_(t2 * q).mul_(-z).add_(q)).
void descend_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& t2, const at::Tensor& z);

// x = take ? ((x * half_a + rq) * a + q) : q per tile (ATen:
// where(take, x.mul_(half_a).add_(rq).mul_(a).add_(q), q)).
void rotate_(const at::Tensor& x, const at::Tensor& rq, const at::Tensor& q, const at::Tensor& half_a,
             const at::Tensor& a, const at::Tensor& take);

// x = (x + x^T) * 0.5 per tile, in place (ATen: x.add(x.transpose(1, 2)).mul_(0.5)).
void symmetrize_(const at::Tensor& x);

}  // namespace torchopt_ext::functional::white_kron_fused
