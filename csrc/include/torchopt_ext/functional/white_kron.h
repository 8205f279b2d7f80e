// White-Kron "skew" / "quad" (white_kron.md, eformer's blocked Kronecker PSGD,
// seed 001): momentum, per-path preconditioning (1-D diagonal, dense tiles,
// large diagonal / strips), the 1.1 RMS clip, lr_style "adam", decoupled
// weight decay. The single implementation behind
// torchopt_ext::optim::WhiteKron and torch.ops.torchopt_ext.white_kron_step_.
//
// Per-param state (created by white_kron_init_state, in this order):
//   ONE_D  (merged shape 1-D): ql (numel,) diagonal, qr (0,), lip_l (1,), lip_r (1,)
//   DENSE  (m, n <= max_size_dense): ql, qr (T_p, bs, bs) tiles in row-major
//          tile order, lip_l, lip_r (T_p,)
//   LARGE  both dims large: ql (m,), qr (n,) diagonal, lip_l, lip_r (1,)
//   LARGE  one dim large: the small side cut into bs strips: dense tiles
//          (T_p, bs, bs) on the small side, one diagonal per strip (T_p, big)
//          on the large side, lip_l, lip_r (T_p,)
// Factors are stored in `dtype` (fp64 for fp64 params), Lipschitz scalars in
// the math dtype (fp32, fp64 for fp64 params).
//
// All DENSE tiles of a call are concatenated into one (T, bs, bs) stack with
// per-tile metadata tensors (valid rows / cols, step) and updated by batched
// matmuls, then written back to each param's slice: a sharded version can
// split that stack along dim 0.
//
// Randomness (Gaussian draws in float64, cast to the math dtype), from CPU
// generators seeded by white_kron_stream_seed(seed, step, path, index):
//   DENSE stack (path 0, index 0, step of the call's first dense param):
//     noise (T, bs, bs); left: ell probe (T, 4, bs) [skew: then Procrustes
//     probe (T, 4, bs)]; right: the same two.
//   LARGE diag/diag (path 1), row strips (path 2), column strips (path 3),
//   ONE_D (path 4), one generator per param (index = its position in params):
//     noise of the param's (strips, rows, cols) / (numel,) shape, then for a
//     dense side the same probes as above, left side first.
// Ownership path (distributed, Python's OwnedStateMixin): a call holds the
// params one rank owns. `param_indices` (one per param: its index among the
// group's params with grads) keys the per-param streams and the rounding
// stream; `dense_tiles` = [tiles of the group's whole dense stack, that
// stack's stream step, then per dense param of this call its first tile in the
// stack]: the whole stack's draws are made and this call's tiles taken, so
// the result equals the single-process step. Both empty: this call is the group.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

namespace torchopt_ext::functional {

struct WhiteKronLayout {
  enum Kind { kOneD, kDense, kLargeDiag, kRowStrips, kColStrips } kind;
  int64_t rows = 0;  // merged (m, n); ONE_D: (numel, 1)
  int64_t cols = 0;
  int64_t tiles = 0;  // dense tiles or strips (T_p)
};

// eformer's merge_dims + path choice for one param shape.
WhiteKronLayout white_kron_layout(at::IntArrayRef shape, int64_t max_size_dense, int64_t block_size);

// Fresh state {ql, qr, lip_l, lip_r} for `param`.
std::vector<at::Tensor> white_kron_init_state(const at::Tensor& param, int64_t max_size_dense, int64_t block_size,
                                              double preconditioner_init_scale, at::ScalarType dtype);

uint64_t white_kron_stream_seed(int64_t seed, int64_t step, int64_t path, int64_t index);

void white_kron_step_(at::TensorList params, at::TensorList grads, at::TensorList mus, at::TensorList ql,
                      at::TensorList qr, at::TensorList lip_l, at::TensorList lip_r, at::TensorList state_steps,
                      const at::Tensor& lr, c10::string_view update_style, double b1, double weight_decay,
                      c10::string_view lr_style, bool normalize_grads, int64_t max_size_dense, double preconditioner_lr,
                      int64_t block_size, double noise_scale, int64_t balance_every, bool maximize,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, at::IntArrayRef param_indices = {},
                      at::IntArrayRef dense_tiles = {});

}  // namespace torchopt_ext::functional
