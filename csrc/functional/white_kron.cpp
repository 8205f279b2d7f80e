#include "torchopt_ext/functional/white_kron.h"
#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/functional/white_kron_fused.h"
#include "torchopt_ext/functional/white_kron_randn.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/util/Exception.h>
#include <c10/util/MathConstants.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "common/tensor_lists.h"
#include "functional/psgd_device.h"
#include "kernels/cpu/stochastic_rounding.h"

namespace torchopt_ext::functional {

namespace {

constexpr double kBetaLipschitz = 0.95;
constexpr int64_t kProbes = 4;          // norm_lower_bound: k
constexpr int64_t kPowerIters = 5;      // norm_lower_bound: iters
constexpr double kMaxRotation = 0.125;  // procrustes max_step_size

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor bcast(const at::Tensor& per_tile) { return per_tile.view({-1, 1, 1}); }

// max |x| over dims, exactly, without an |x| temporary (two reductions are
// cheaper than abs + amax here; ATen's inf-norm is slower still).
at::Tensor max_abs(const at::Tensor& x, at::IntArrayRef dims) { return at::maximum(x.amax(dims), x.amin(dims).neg()); }

namespace fused = white_kron_fused;

// Stack-sized temporaries of one update, recycled: a fresh (64, 256, 256)
// result page-faults its 16 MB (measured 5-9 ms at one thread, against
// 0.5-1 ms for a pass in place), and a step made ~30 of them. get() hands
// out a free buffer (any shape up to the largest asked for), put() takes
// it back; buffers still held when the Scratch dies live on as ordinary
// tensors (the returned factors and update).
class Scratch {
 public:
  Scratch(at::TensorOptions options, int64_t numel) : options_(options), numel_(numel) {}
  at::Tensor get(at::IntArrayRef shape) {
    const int64_t n = c10::multiply_integers(shape);
    for (auto& [flat, used] : slots_) {
      if (!used && flat.numel() >= n) {
        used = true;
        return flat.narrow(0, 0, n).view(shape);
      }
    }
    slots_.emplace_back(at::empty({std::max(n, numel_)}, options_), true);
    return slots_.back().first.narrow(0, 0, n).view(shape);
  }
  void put(const at::Tensor& x) {
    for (auto& [flat, used] : slots_) {
      if (used && flat.data_ptr() == x.data_ptr()) {
        used = false;
        return;
      }
    }
  }

 private:
  at::TensorOptions options_;
  int64_t numel_;
  std::vector<std::pair<at::Tensor, bool>> slots_;
};

// a @ b into a scratch buffer (the same bmm as at::matmul of two stacks).
at::Tensor bmm(Scratch& s, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = s.get({a.size(0), a.size(1), b.size(2)});
  return at::bmm_out(out, a, b);
}

// Randomised lower bound of the spectral norm of each A[t] (symmetric PSD, or
// skew-symmetric with skew=true), eformer's power iteration on k probes.
// padded_n: the tile size eformer's row energies are averaged over (the
// valid block a may be smaller; its padding would add zeros). unit_scale: a
// is already divided by its max |.| (the Procrustes R), so the scale is 1.
at::Tensor norm_lower_bound(Scratch& s, at::Tensor a, const at::Tensor& probe, bool skew, int64_t padded_n,
                            bool unit_scale = false) {
  at::Tensor scale;
  if (!unit_scale) {
    scale = skew ? max_abs(a, {1, 2}) : a.diagonal(0, 1, 2).amax(1);
    at::Tensor scaled = s.get(a.sizes());
    a = at::div_out(scaled, a, bcast(scale));
  }
  at::Tensor sq = s.get(a.sizes());
  at::mul_out(sq, a, a);
  const at::Tensor energies = padded_n == a.size(2) ? sq.mean(2) : sq.sum(2) / padded_n;  // (T, n)
  s.put(sq);
  const at::Tensor j = energies.argmax(1);  // (T,)
  const at::Tensor power = energies.gather(1, j.unsqueeze(1)).squeeze(1);
  const at::Tensor rows = at::arange(a.size(0), j.options());
  const at::Tensor max_vec = a.index({rows, j});  // (T, n)
  at::Tensor x = at::matmul((max_vec * power.rsqrt().unsqueeze(1)).unsqueeze(1) + probe, a);
  for (int64_t i = 0; i < kPowerIters; ++i) {
    x = at::matmul(x / bcast(max_abs(x, {1, 2})), a);
  }
  x = at::matmul(x / at::linalg_vector_norm(x, 2, {2}, true), a);
  const at::Tensor bound = at::linalg_vector_norm(x, 2, {2}).amax(1);
  if (unit_scale) {
    return bound;
  }
  s.put(a);
  return bound * scale;
}

at::Tensor batched_trace(const at::Tensor& a) { return a.diagonal(0, 1, 2).sum(1); }

// One Procrustes rotation of each Q[t] towards orthogonality (eformer's
// _procrustes_step): skipped per tile when Q^T - Q vanishes or tr(R Q) <= 0.
// q: a scratch buffer, taken back; the result is another.
at::Tensor procrustes(Scratch& s, const at::Tensor& q, const at::Tensor& probe, int64_t padded_n) {
  at::Tensor r = s.get(q.sizes());
  const at::Tensor largest = common::psgd::skew_part(r, q);  // r = q^T - q
  const double tiny =
      q.scalar_type() == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const at::Tensor rotate = largest > tiny;
  r.div_(bcast(at::where(rotate, largest, at::ones_like(largest))));
  const at::Tensor rq = bmm(s, r, q);
  const at::Tensor tr_rq = batched_trace(rq);
  // A rotated tile's R now has max |R| = 1 exactly (the bound's scale); the
  // others are discarded below.
  at::Tensor a = kMaxRotation / norm_lower_bound(s, r, probe, /*skew=*/true, padded_n, /*unit_scale=*/true);
  at::Tensor rrq = bmm(s, r, rq);
  s.put(r);
  const at::Tensor tr_rrq = batched_trace(rrq);
  a = at::where(tr_rrq < 0, at::minimum(a, -tr_rq / tr_rrq), a);
  // q + a (rq + a/2 rrq) where the tile rotates, else q: in place in rrq.
  fused::rotate_(rrq, rq, q, 0.5 * a, a, rotate & (tr_rq > 0));
  s.put(rq);
  s.put(q);
  return rrq;
}

// Draws come from a CPU generator (the stream seeds are host values) and are
// copied to `device`: the same numbers on the CPU and on CUDA, no sync.
at::Tensor draw(at::Generator& gen, at::IntArrayRef shape, at::ScalarType math, at::Device device) {
  return white_kron_randn(gen, shape).to(device, math);
}

// Draws for a tile stack. With `index` (the ownership path: this call holds
// some tiles of the group's stack of `total`), the whole stack's draws are
// made and this call's rows taken, so a tile's draws do not depend on which
// rank steps it.
at::Tensor draw_tiles(at::Generator& gen, at::IntArrayRef shape, at::ScalarType math, at::Device device,
                      const at::Tensor& index, int64_t total) {
  if (!index.defined()) {
    return draw(gen, shape, math, device);
  }
  std::vector<int64_t> whole(shape.begin(), shape.end());
  whole[0] = total;
  // Rows picked on the host (index is a host tensor), then copied.
  return draw(gen, whole, math, at::kCPU).index_select(0, index).to(device);
}

// One dense side's norm-bound probes, (T, k, n) each, in stream order: the
// factor update's, then (skew) the rotation's.
std::pair<at::Tensor, at::Tensor> draw_probes(at::Generator& gen, int64_t t, int64_t n, at::ScalarType math,
                                              at::Device device, bool skew, const at::Tensor& index, int64_t total) {
  at::Tensor ell = draw_tiles(gen, {t, kProbes, n}, math, device, index, total);
  at::Tensor rot = skew ? draw_tiles(gen, {t, kProbes, n}, math, device, index, total) : at::Tensor();
  return {ell, rot};
}

// Dense factor update (QUAD or skew) of each tile; returns the new Q (a
// scratch buffer) and L. term1: a scratch buffer, taken back. term2: (T,).
// ell_probe / rot_probe: the (T, k, n) norm-bound probes (rot: skew only);
// padded_n: see norm_lower_bound.
std::pair<at::Tensor, at::Tensor> dense_update(Scratch& s, const at::Tensor& term1, const at::Tensor& term2,
                                               const at::Tensor& lip, const at::Tensor& q, const at::Tensor& plr,
                                               bool skew, const at::Tensor& ell_probe, const at::Tensor& rot_probe,
                                               int64_t padded_n) {
  const at::Tensor ell = norm_lower_bound(s, term1, ell_probe, false, padded_n) + term2;
  const at::Tensor new_lip = at::maximum(kBetaLipschitz * lip + (1 - kBetaLipschitz) * ell, ell);
  // Q - z (T1 Q - T2 Q), in place in T1 Q.
  const at::Tensor z = skew ? plr / new_lip : plr / (2.0 * new_lip);
  const at::Tensor p = bmm(s, term1, q);
  fused::descend_(p, q, term2, z);
  if (skew) {
    s.put(term1);
    return {procrustes(s, p, rot_probe, padded_n), new_lip};
  }
  const at::Tensor pp = bmm(s, p, term1);
  s.put(term1);
  fused::descend_(pp, p, term2, z);  // P - z (P T1 - P T2)
  s.put(p);
  fused::symmetrize_(pp);
  return {pp, new_lip};
}

// Diagonal factor update of each row of q (T, n).
std::pair<at::Tensor, at::Tensor> diag_update(const at::Tensor& term1, const at::Tensor& term2, const at::Tensor& lip,
                                              const at::Tensor& q, const at::Tensor& plr, bool skew) {
  const at::Tensor ell = term1.amax(1) + term2;
  const at::Tensor new_lip = at::maximum(kBetaLipschitz * lip + (1 - kBetaLipschitz) * ell, ell);
  const at::Tensor z = (skew ? plr / new_lip : plr / (2.0 * new_lip)).unsqueeze(1);
  const at::Tensor gain = 1.0 - z * (term1 - term2.unsqueeze(1));
  return {skew ? q * gain : q * gain * gain, new_lip};
}

// Factors of a batch of (T, R, C) blocks; a side is dense (T, s, s) or
// diagonal (T, s). Updates ql/qr/lip_l/lip_r and returns the preconditioned
// blocks (of the un-noised g).
struct Batch {
  at::Tensor ql, qr, lip_l, lip_r;
  bool diag_left = false, diag_right = false;
  at::Tensor tile_index;  // draw_tiles: defined on the ownership path's dense stack
  int64_t total_tiles = 0;
};

at::Tensor precondition(Batch& b, const at::Tensor& g, const at::Tensor& host_valid_rows,
                        const at::Tensor& host_valid_cols, const at::Tensor& plr, double noise_scale, bool skew,
                        at::Generator& gen) {
  const auto math = g.scalar_type();
  const at::Tensor noise = draw_tiles(gen, g.sizes(), math, g.device(), b.tile_index, b.total_tiles);
  // The valid extents are built on the host from the shapes.
  const at::Tensor valid_rows = host_valid_rows.to(g.device());
  const at::Tensor valid_cols = host_valid_cols.to(g.device());
  const at::Tensor rmask = at::arange(g.size(1), valid_rows.options()).unsqueeze(0) < valid_rows.unsqueeze(1);
  const at::Tensor cmask = at::arange(g.size(2), valid_cols.options()).unsqueeze(0) < valid_cols.unsqueeze(1);
  const at::Tensor mask = (rmask.unsqueeze(2) & cmask.unsqueeze(1)).to(math);
  const at::Tensor gn = g + noise * noise_scale * mask;
  const at::Tensor m = valid_rows.to(math);
  const at::Tensor n = valid_cols.to(math);
  // term2: N / m = n for the left side, N / m... = m for the right side.
  auto left_apply = [&](const at::Tensor& ql, const at::Tensor& x) {
    return b.diag_left ? (ql * ql).unsqueeze(2) * x : at::matmul(ql.transpose(1, 2), at::matmul(ql, x));
  };
  auto right_apply = [&](const at::Tensor& qr, const at::Tensor& x) {
    return b.diag_right ? x * (qr * qr).unsqueeze(1) : at::matmul(at::matmul(x, qr.transpose(1, 2)), qr);
  };
  const at::Tensor pg = right_apply(b.qr, left_apply(b.ql, gn));
  const at::Tensor pg2 = b.diag_left || b.diag_right ? pg * pg : at::Tensor();
  // Buffers for the dense side's (T, s, s) temporaries.
  const int64_t side = b.diag_left ? (b.diag_right ? 0 : b.qr.size(1)) : b.ql.size(1);
  Scratch scratch(g.options(), g.size(0) * side * side);
  if (b.diag_left) {
    std::tie(b.ql, b.lip_l) = diag_update(pg2.sum(2), n, b.lip_l, b.ql, plr, skew);
  } else {
    const at::Tensor term1 = bmm(scratch, pg, pg.transpose(1, 2));
    auto [ell_probe, rot_probe] =
        draw_probes(gen, b.ql.size(0), b.ql.size(1), math, g.device(), skew, b.tile_index, b.total_tiles);
    std::tie(b.ql, b.lip_l) =
        dense_update(scratch, term1, n, b.lip_l, b.ql, plr, skew, ell_probe, rot_probe, b.ql.size(1));
  }
  if (b.diag_right) {
    std::tie(b.qr, b.lip_r) = diag_update(pg2.sum(1), m, b.lip_r, b.qr, plr, skew);
  } else {
    const at::Tensor term1 = bmm(scratch, pg.transpose(1, 2), pg);
    auto [ell_probe, rot_probe] =
        draw_probes(gen, b.qr.size(0), b.qr.size(1), math, g.device(), skew, b.tile_index, b.total_tiles);
    std::tie(b.qr, b.lip_r) =
        dense_update(scratch, term1, m, b.lip_r, b.qr, plr, skew, ell_probe, rot_probe, b.qr.size(1));
  }
  return right_apply(b.qr, left_apply(b.ql, g));
}

// The dense tile stack: b.ql / b.qr (T, bs, bs), g (T, bs, bs) zero-padded,
// valid rows / cols per tile. Padding is inert: a tile's factors are zero
// outside their valid block and its padded gradient and noise are zero, so
// every product, Gram, trace and max of the step stays inside the valid
// (vr x vc) block; only the draws' shapes and the norm bound's energy mean
// (over bs) see the padding. So tiles are grouped by valid size and each
// group runs at that size (eformer's padded math, to rounding): a conv
// weight's (128, 576) in 256-tiles costs about a third of three full tiles.
// Updates b and returns the preconditioned tiles (zero-padded).
at::Tensor precondition_stack(Batch& b, const at::Tensor& g, const std::vector<int64_t>& valid_rows,
                              const std::vector<int64_t>& valid_cols, const at::Tensor& plr, double noise_scale,
                              bool skew, at::Generator& gen) {
  const auto math = g.scalar_type();
  const int64_t t = g.size(0), bs = g.size(1);
  // Stream order as one batch: noise, left probes, right probes. A CPU
  // noise stays float64 here: its cast joins the noisy-gradient pass.
  const auto noise_type = g.is_cpu() ? at::kDouble : math;
  at::Tensor noise = draw_tiles(gen, g.sizes(), noise_type, g.device(), b.tile_index, b.total_tiles);
  const auto [ell_l, rot_l] = draw_probes(gen, t, bs, math, g.device(), skew, b.tile_index, b.total_tiles);
  const auto [ell_r, rot_r] = draw_probes(gen, t, bs, math, g.device(), skew, b.tile_index, b.total_tiles);
  std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < t; ++i) {
    groups[{valid_rows[i], valid_cols[i]}].push_back(i);
  }
  const bool whole = groups.size() == 1 && groups.begin()->first == std::make_pair(bs, bs);
  at::Tensor out, ql, qr, lip_l, lip_r;
  if (!whole) {
    out = at::zeros_like(g);
    ql = at::zeros_like(b.ql);
    qr = at::zeros_like(b.qr);
    lip_l = at::empty_like(b.lip_l);
    lip_r = at::empty_like(b.lip_r);
  }
  for (const auto& [size, tiles] : groups) {
    const auto [vr, vc] = size;
    const bool all = static_cast<int64_t>(tiles.size()) == t;
    const at::Tensor index = at::tensor(tiles, at::TensorOptions().dtype(at::kLong)).to(g.device());
    auto take = [&](const at::Tensor& x) { return all ? x : x.index_select(0, index); };
    // Contiguous blocks: a tile's products then see one layout whichever
    // tiles share its call (the ownership and sharded paths step subsets).
    auto block = [&](const at::Tensor& x, int64_t r, int64_t c) {
      return take(x).narrow(1, 0, r).narrow(2, 0, c).contiguous();
    };
    const at::Tensor gv = block(g, vr, vc);
    const at::Tensor qlv = block(b.ql, vr, vr);
    const at::Tensor qrv = block(b.qr, vc, vc);
    const at::Tensor plr_v = take(plr);
    const int64_t tg = qlv.size(0);
    Scratch scratch(gv.options(), tg * std::max(vr, vc) * std::max(vr, vc));
    const at::Tensor gn = scratch.get(gv.sizes());
    fused::noisy_(gn, block(noise, vr, vc), noise_scale, gv);
    if (whole) {
      noise.reset();
    }
    // L^T L x R^T R, the intermediates in scratch; x is taken back.
    auto apply = [&](const at::Tensor& l, const at::Tensor& r, const at::Tensor& x) {
      const at::Tensor lx = bmm(scratch, l, x);
      scratch.put(x);
      const at::Tensor llx = bmm(scratch, l.transpose(1, 2), lx);
      scratch.put(lx);
      const at::Tensor llxr = bmm(scratch, llx, r.transpose(1, 2));
      scratch.put(llx);
      const at::Tensor out = bmm(scratch, llxr, r);
      scratch.put(llxr);
      return out;
    };
    const at::Tensor pg = apply(qlv, qrv, gn);
    const at::Tensor term_l = bmm(scratch, pg, pg.transpose(1, 2));
    const at::Tensor term_r = bmm(scratch, pg.transpose(1, 2), pg);
    scratch.put(pg);
    auto [ql_new, lip_l_new] =
        dense_update(scratch, term_l, at::full({tg}, static_cast<double>(vc), plr.options()), take(b.lip_l), qlv, plr_v,
                     skew, block(ell_l, kProbes, vr), skew ? block(rot_l, kProbes, vr) : rot_l, bs);
    auto [qr_new, lip_r_new] =
        dense_update(scratch, term_r, at::full({tg}, static_cast<double>(vr), plr.options()), take(b.lip_r), qrv, plr_v,
                     skew, block(ell_r, kProbes, vc), skew ? block(rot_r, kProbes, vc) : rot_r, bs);
    at::Tensor result = apply(ql_new, qr_new, gv);
    if (whole) {
      b.ql = ql_new;
      b.qr = qr_new;
      b.lip_l = lip_l_new;
      b.lip_r = lip_r_new;
      return result;
    }
    auto put = [&](at::Tensor& dst, const at::Tensor& src) {
      at::Tensor view = src.dim() == 3 ? dst.narrow(1, 0, src.size(1)).narrow(2, 0, src.size(2)) : dst;
      if (all) {
        view.copy_(src);
      } else {
        view.index_copy_(0, index, src);
      }
    };
    put(out, result);
    put(ql, ql_new);
    put(qr, qr_new);
    put(lip_l, lip_l_new);
    put(lip_r, lip_r_new);
  }
  b.ql = ql;
  b.qr = qr;
  b.lip_l = lip_l;
  b.lip_r = lip_r;
  return out;
}

// (m, n) -> (tiles_r * tiles_c, bs, bs), zero-padded, row-major tile order.
at::Tensor to_tiles(const at::Tensor& x, int64_t bs) {
  const int64_t m = x.size(0), n = x.size(1);
  const int64_t tr = ceil_div(m, bs), tc = ceil_div(n, bs);
  // (constant_pad_nd copies even with nothing to pad; the reshape below copies anyway.)
  const at::Tensor padded = tr * bs == m && tc * bs == n ? x : at::constant_pad_nd(x, {0, tc * bs - n, 0, tr * bs - m});
  return padded.view({tr, bs, tc, bs}).permute({0, 2, 1, 3}).reshape({tr * tc, bs, bs});
}

at::Tensor from_tiles(const at::Tensor& tiles, int64_t m, int64_t n, int64_t bs) {
  const int64_t tr = ceil_div(m, bs), tc = ceil_div(n, bs);
  return tiles.view({tr, tc, bs, bs}).permute({0, 2, 1, 3}).reshape({tr * bs, tc * bs}).narrow(0, 0, m).narrow(1, 0, n);
}

// Valid extent of each of `count` blocks of size bs covering `size` (host values).
std::vector<int64_t> valid_extent_values(int64_t size, int64_t bs, int64_t count_along, int64_t repeat_inner,
                                         int64_t repeat_outer) {
  std::vector<int64_t> out;
  for (int64_t o = 0; o < repeat_outer; ++o) {
    for (int64_t i = 0; i < count_along; ++i) {
      for (int64_t r = 0; r < repeat_inner; ++r) {
        out.push_back(std::min(bs, size - i * bs));
      }
    }
  }
  return out;
}

// The same as a CPU int64 tensor.
at::Tensor valid_extents(int64_t size, int64_t bs, int64_t count_along, int64_t repeat_inner, int64_t repeat_outer) {
  return at::tensor(valid_extent_values(size, bs, count_along, repeat_inner, repeat_outer), at::kLong);
}

at::Tensor padded_identity(int64_t bs, int64_t valid, const at::TensorOptions& options) {
  at::Tensor eye = at::zeros({bs, bs}, options);
  eye.narrow(0, 0, valid).narrow(1, 0, valid).copy_(at::eye(valid, options));
  return eye;
}

// Shapes of {ql, qr, lip_l, lip_r} for a layout.
std::vector<std::vector<int64_t>> state_shapes(const WhiteKronLayout& lay, int64_t bs) {
  const int64_t t = lay.tiles;
  switch (lay.kind) {
    case WhiteKronLayout::kOneD:
      return {{lay.rows}, {0}, {1}, {1}};
    case WhiteKronLayout::kDense:
      return {{t, bs, bs}, {t, bs, bs}, {t}, {t}};
    case WhiteKronLayout::kLargeDiag:
      return {{lay.rows}, {lay.cols}, {1}, {1}};
    case WhiteKronLayout::kRowStrips:
      return {{t, bs, bs}, {t, lay.cols}, {t}, {t}};
    case WhiteKronLayout::kColStrips:
      return {{t, lay.rows}, {t, bs, bs}, {t}, {t}};
  }
  return {};
}

at::ScalarType math_of(const at::Tensor& p) { return p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

WhiteKronLayout white_kron_layout(at::IntArrayRef shape, int64_t max_size_dense, int64_t block_size) {
  WhiteKronLayout out{WhiteKronLayout::kOneD};
  const int64_t numel = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<>());
  const int64_t largest = shape.empty() ? 1 : *std::max_element(shape.begin(), shape.end());
  if (shape.size() < 2 || numel == largest) {
    out.rows = numel;
    out.cols = 1;
    return out;
  }
  int64_t m = shape[0], n = shape[1];
  if (shape.size() > 2) {
    // The split that makes the two products most alike (first best wins).
    double best = std::numeric_limits<double>::infinity();
    for (size_t s = 1; s < shape.size(); ++s) {
      const int64_t lp = std::accumulate(shape.begin(), shape.begin() + s, int64_t{1}, std::multiplies<>());
      const int64_t rp = std::accumulate(shape.begin() + s, shape.end(), int64_t{1}, std::multiplies<>());
      const double ratio = static_cast<double>(std::max(lp, rp)) / static_cast<double>(std::min(lp, rp));
      if (ratio < best) {
        best = ratio;
        m = lp;
        n = rp;
      }
    }
  }
  out.rows = m;
  out.cols = n;
  const bool large_m = m > max_size_dense;
  const bool large_n = n > max_size_dense;
  if (!large_m && !large_n) {
    out.kind = WhiteKronLayout::kDense;
    out.tiles = ceil_div(m, block_size) * ceil_div(n, block_size);
  } else if (large_m && large_n) {
    out.kind = WhiteKronLayout::kLargeDiag;
    out.tiles = 1;
  } else if (large_n) {
    out.kind = WhiteKronLayout::kRowStrips;  // m is the small side: row strips
    out.tiles = ceil_div(m, block_size);
  } else {
    out.kind = WhiteKronLayout::kColStrips;
    out.tiles = ceil_div(n, block_size);
  }
  return out;
}

std::vector<at::Tensor> white_kron_init_state(const at::Tensor& param, int64_t max_size_dense, int64_t block_size,
                                              double preconditioner_init_scale, at::ScalarType dtype) {
  const auto layout = white_kron_layout(param.sizes(), max_size_dense, block_size);
  const auto math = math_of(param);
  const auto storage = param.scalar_type() == at::kDouble ? at::kDouble : dtype;
  const auto opts = param.options().dtype(storage);
  const auto lip_opts = param.options().dtype(math);
  const double s = preconditioner_init_scale;
  const int64_t bs = block_size;
  auto identity_tiles = [&](const std::vector<int64_t>& valid) {
    std::vector<at::Tensor> tiles;
    for (const int64_t extent : valid) {
      tiles.push_back(padded_identity(bs, extent, param.options().dtype(math)) * s);
    }
    return at::stack(tiles).to(storage);
  };
  const int64_t m = layout.rows, n = layout.cols;
  switch (layout.kind) {
    case WhiteKronLayout::kOneD:
      return {at::full({m}, s, opts), at::empty({0}, opts), at::zeros({1}, lip_opts), at::zeros({1}, lip_opts)};
    case WhiteKronLayout::kDense: {
      const int64_t tr = ceil_div(m, bs), tc = ceil_div(n, bs);
      return {identity_tiles(valid_extent_values(m, bs, tr, tc, 1)),
              identity_tiles(valid_extent_values(n, bs, tc, 1, tr)), at::zeros({layout.tiles}, lip_opts),
              at::zeros({layout.tiles}, lip_opts)};
    }
    case WhiteKronLayout::kLargeDiag:
      return {at::full({m}, s, opts), at::full({n}, s, opts), at::zeros({1}, lip_opts), at::zeros({1}, lip_opts)};
    case WhiteKronLayout::kRowStrips:
      return {identity_tiles(valid_extent_values(m, bs, layout.tiles, 1, 1)), at::full({layout.tiles, n}, s, opts),
              at::zeros({layout.tiles}, lip_opts), at::zeros({layout.tiles}, lip_opts)};
    case WhiteKronLayout::kColStrips:
      return {at::full({layout.tiles, m}, s, opts), identity_tiles(valid_extent_values(n, bs, layout.tiles, 1, 1)),
              at::zeros({layout.tiles}, lip_opts), at::zeros({layout.tiles}, lip_opts)};
  }
  TORCH_CHECK(false, "white_kron_init_state: unknown layout");
}

namespace {

// MT19937 (at::mt19937's parameters), run in bulk on a copy of a CPU
// generator's engine state: the same 32-bit outputs as calling the engine
// once per output, without a call per output (about 7 ns per float64
// uniform through CPUGeneratorImpl::random64, a third of a step's draw).
constexpr int64_t kMtN = 624, kMtM = 397;

// The state transition: every word from the recurrence.
void mt_next_state(uint32_t* s) {
  auto twist = [](uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) != 0 ? 0x9908b0dfu : 0u);
  };
  for (int64_t j = 0; j < kMtN - kMtM; ++j) {
    s[j] = s[j + kMtM] ^ twist(s[j], s[j + 1]);
  }
  for (int64_t j = kMtN - kMtM; j < kMtN - 1; ++j) {
    s[j] = s[j + kMtM - kMtN] ^ twist(s[j], s[j + 1]);
  }
  s[kMtN - 1] = s[kMtM - 1] ^ twist(s[kMtN - 1], s[0]);
}

// The next `count` outputs of `engine` into out, advancing it. The engine
// holds `left_ - 1` untaken words from `next_` on; a new state is made
// when none is left (also on a freshly seeded engine: left_ = 1).
void mt_fill(at::mt19937& engine, uint32_t* out, int64_t count) {
  auto d = engine.data();
  uint32_t* s = d.state_.data();
  for (int64_t k = 0; k < count;) {
    int64_t avail = d.left_ - 1;
    if (avail == 0) {
      mt_next_state(s);
      d.next_ = 0;
      avail = kMtN;
      d.left_ = static_cast<int>(kMtN + 1);
    }
    const int64_t n = std::min(avail, count - k);
    const uint32_t* src = s + d.next_;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t y = src[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      out[k + i] = y;
    }
    d.next_ += static_cast<uint32_t>(n);
    d.left_ -= static_cast<int>(n);
    k += n;
  }
  engine.set_data(d);
}

}  // namespace

at::Tensor white_kron_randn(at::Generator& gen, at::IntArrayRef shape) {
  const auto options = at::TensorOptions().dtype(at::kDouble);
  const int64_t size = c10::multiply_integers(shape);
  if (size < 16 || size % 16 != 0) {
    return at::randn(shape, gen, options);  // ATen redraws a partial last block
  }
  at::Tensor out = at::empty(shape, options);
  double* data = out.data_ptr<double>();
  // Two 32-bit outputs per value, written into the value's own 8 bytes:
  // the engine's sequential part. The uniforms are made from them below,
  // next to the transform and over the threads.
  auto* words = reinterpret_cast<uint32_t*>(data);
  {
    auto* cpu = at::check_generator<at::CPUGeneratorImpl>(gen);
    std::lock_guard<std::mutex> lock(cpu->mutex_);
    at::mt19937 engine = cpu->engine();
    mt_fill(engine, words, 2 * size);
    cpu->set_engine(engine);
  }
  // Box-Muller on each block of 16: value j pairs uniforms j and j + 8.
  at::parallel_for(0, size / 16, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* d = data + 16 * b;
      const uint32_t* w = words + 32 * b;
      // at::uniform_real_distribution<double>(0, 1) of random64() = (first
      // word << 32 | second word): its low 53 bits times 2^-53.
      double u[16];
      for (int64_t j = 0; j < 16; ++j) {
        const uint64_t bits = (static_cast<uint64_t>(w[2 * j]) << 32) | w[2 * j + 1];
        u[j] = static_cast<double>(bits & ((uint64_t{1} << 53) - 1)) * (1.0 / static_cast<double>(uint64_t{1} << 53));
      }
      for (int64_t j = 0; j < 8; ++j) {
        const double radius = std::sqrt(-2 * std::log(1 - u[j]));
        const double theta = 2.0 * c10::pi<double> * u[j + 8];
        d[j] = std::fma(radius * std::cos(theta), 1.0, 0.0);
        d[j + 8] = std::fma(radius * std::sin(theta), 1.0, 0.0);
      }
    }
  });
  return out;
}

uint64_t white_kron_stream_seed(int64_t seed, int64_t step, int64_t path, int64_t index) {
  using kernels::cpu::mix64;
  return mix64(mix64(static_cast<uint64_t>(seed)) ^
               mix64(static_cast<uint64_t>(step) * 8 + static_cast<uint64_t>(path)) ^
               (static_cast<uint64_t>(index) << 1));
}

void white_kron_step_(at::TensorList params, at::TensorList grads, at::TensorList mus, at::TensorList ql,
                      at::TensorList qr, at::TensorList lip_l, at::TensorList lip_r, at::TensorList state_steps,
                      const at::Tensor& lr, c10::string_view update_style, double b1, double weight_decay,
                      c10::string_view lr_style, bool normalize_grads, int64_t max_size_dense, double preconditioner_lr,
                      int64_t block_size, double noise_scale, int64_t balance_every, bool maximize,
                      bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, at::IntArrayRef param_indices,
                      at::IntArrayRef dense_tiles) {
  constexpr const char* op = "white_kron_step_";
  using common::check_hyperparameter;
  TORCH_CHECK_VALUE(update_style == "skew" || update_style == "quad", op,
                    ": update_style must be 'skew' or 'quad', got '", update_style, "'");
  const bool skew = update_style == "skew";
  TORCH_CHECK_VALUE(lr_style == "adam" || lr_style == "none", op, ": lr_style must be 'adam' or 'none', got '",
                    lr_style, "'");
  check_hyperparameter(op, "b1", b1, b1 >= 0.0 && b1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  check_hyperparameter(op, "preconditioner_lr", preconditioner_lr,
                       std::isfinite(preconditioner_lr) && preconditioner_lr > 0.0, "> 0");
  check_hyperparameter(op, "noise_scale", noise_scale, std::isfinite(noise_scale) && noise_scale >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(max_size_dense >= 1, op, ": max_size_dense must be >= 1, got ", max_size_dense);
  TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
  TORCH_CHECK_VALUE(balance_every >= 1, op, ": balance_every must be >= 1, got ", balance_every);
  const size_t count = params.size();
  TORCH_CHECK_VALUE(param_indices.empty() || param_indices.size() == count, op,
                    ": param_indices must be empty or have one entry per param (", count, "), got ",
                    param_indices.size());
  // The key of param i's streams: its index in the whole group (ownership path) or in this call.
  auto key_of = [&](size_t i) { return param_indices.empty() ? static_cast<int64_t>(i) : param_indices[i]; };
  for (const auto& [name, list] :
       {std::pair<const char*, at::TensorList>{"ql", ql}, {"qr", qr}, {"lip_l", lip_l}, {"lip_r", lip_r}}) {
    TORCH_CHECK_VALUE(list.size() == count, op, ": ", name, " must have one tensor per param (", count, "), got ",
                      list.size());
  }
  std::vector<WhiteKronLayout> layouts;
  for (size_t i = 0; i < count; ++i) {
    layouts.push_back(white_kron_layout(params[i].sizes(), max_size_dense, block_size));
    // The state must be the one white_kron_init_state makes for these options.
    const auto expected = state_shapes(layouts.back(), block_size);
    const at::Tensor* got[] = {&ql[i], &qr[i], &lip_l[i], &lip_r[i]};
    const char* names[] = {"ql", "qr", "lip_l", "lip_r"};
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(got[k]->defined() && got[k]->sizes() == at::IntArrayRef(expected[k]), op, ": ", names[k], "[",
                        i, "] does not match params[", i, "] (shape ", params[i].sizes(), ", block_size ", block_size,
                        ", max_size_dense ", max_size_dense, "), which needs ", at::IntArrayRef(expected[k]));
    }
    const auto math = math_of(params[i]);
    TORCH_CHECK_VALUE(lip_l[i].scalar_type() == math && lip_r[i].scalar_type() == math, op, ": lip_l[", i,
                      "] and lip_r[", i, "] must be ", math);
    TORCH_CHECK_VALUE(
        ql[i].scalar_type() == qr[i].scalar_type() &&
            (math == at::kDouble ? ql[i].scalar_type() == at::kDouble
                                 : (ql[i].scalar_type() == at::kFloat || ql[i].scalar_type() == at::kBFloat16)),
        op, ": ql[", i, "] / qr[", i, "] must be float32 or bfloat16 (float64 for float64 params), got ",
        ql[i].scalar_type());
  }
  psgd_device::check_host_scalars(op, params, lr, state_steps);
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"mus", mus, b1 > 0.0}}}, state_steps, lr,
                                                    grad_scale, found_inf);
  if (!group) {
    return;
  }
  psgd_device::unscale_grads_(*group);
  const int64_t bs = block_size;
  // 1. The (bias-corrected, optionally normalised) momentum of every param.
  std::vector<at::Tensor> u(count);
  for (size_t i = 0; i < count; ++i) {
    const auto math = math_of(group->params[i]);
    at::Tensor g = group->grads[i].to(math);
    if (maximize) {
      g = g.neg();
    }
    if (b1 > 0.0) {
      at::Tensor& mu = group->state[0][i];
      // A fresh tensor, updated in place from here (a converted copy is scaled in place).
      at::Tensor m = mu.scalar_type() == math ? mu * b1 : mu.to(math).mul_(b1);
      m.add_(g * (1.0 - b1));
      mu.copy_(m);
      u[i] = m.div_(1.0 - std::pow(b1, group->steps[i]));
    } else {
      u[i] = g;
    }
    if (normalize_grads) {
      u[i] = u[i] / (at::linalg_vector_norm(u[i]) + 1e-6);
    }
  }
  auto plr_of = [&](double t) { return std::max(preconditioner_lr / std::sqrt(1.0 + t / 10000.0), 0.4); };
  std::vector<at::Tensor> out(count);
  // 2. All dense tiles of this call as one stack.
  std::vector<size_t> dense;
  for (size_t i = 0; i < count; ++i) {
    if (layouts[i].kind == WhiteKronLayout::kDense) {
      dense.push_back(i);
    }
  }
  if (!dense.empty()) {
    const auto math = math_of(group->params[dense[0]]);
    std::vector<at::Tensor> g_tiles, ql_tiles, qr_tiles, ll, lr_, tile_steps;
    std::vector<int64_t> vr, vc;  // valid rows / cols per tile, on the host (tiles are grouped by them)
    for (size_t i : dense) {
      const auto& lay = layouts[i];
      const int64_t tr = ceil_div(lay.rows, bs), tc = ceil_div(lay.cols, bs);
      g_tiles.push_back(to_tiles(u[i].reshape({lay.rows, lay.cols}).to(math), bs));
      ql_tiles.push_back(ql[i].to(math));
      qr_tiles.push_back(qr[i].to(math));
      ll.push_back(lip_l[i].to(math));
      lr_.push_back(lip_r[i].to(math));
      for (int64_t r = 0; r < tr; ++r) {
        for (int64_t c = 0; c < tc; ++c) {
          vr.push_back(std::min(bs, lay.rows - r * bs));
          vc.push_back(std::min(bs, lay.cols - c * bs));
        }
      }
      tile_steps.push_back(at::full({lay.tiles}, group->steps[i], at::TensorOptions().dtype(at::kDouble)));
    }
    // One param: its tensors are the stack (no copy; they are only read).
    auto stack = [](const std::vector<at::Tensor>& parts) { return parts.size() == 1 ? parts[0] : at::cat(parts); };
    Batch b;
    b.ql = stack(ql_tiles);
    b.qr = stack(qr_tiles);
    b.lip_l = stack(ll);
    b.lip_r = stack(lr_);
    int64_t stream_step = static_cast<int64_t>(group->steps[dense[0]]);
    if (!dense_tiles.empty()) {
      // [group's stack size, its stream step, then each dense param's first tile in the stack].
      TORCH_CHECK_VALUE(dense_tiles.size() == dense.size() + 2, op, ": dense_tiles must hold 2 + one entry per dense ",
                        "param (", dense.size() + 2, "), got ", dense_tiles.size());
      std::vector<at::Tensor> index;
      for (size_t k = 0; k < dense.size(); ++k) {
        const int64_t first = dense_tiles[k + 2];
        const int64_t tiles = layouts[dense[k]].tiles;
        TORCH_CHECK_VALUE(first >= 0 && first + tiles <= dense_tiles[0], op, ": dense_tiles: tiles [", first, ", ",
                          first + tiles, ") outside a stack of ", dense_tiles[0]);
        index.push_back(at::arange(first, first + tiles, at::kLong));
      }
      b.tile_index = at::cat(index);
      b.total_tiles = dense_tiles[0];
      stream_step = dense_tiles[1];
    }
    // Host step counters: the per-tile schedules are built on the host and copied.
    const auto device = group->params[dense[0]].device();
    const at::Tensor steps = at::cat(tile_steps);
    const at::Tensor plr = ((preconditioner_lr / (1.0 + steps / 10000.0).sqrt()).clamp_min(0.4)).to(device, math);
    // Balance the two factors of a tile every balance_every steps (before the
    // update). Whether any tile balances is a host decision (no read back).
    const at::Tensor balance = (at::fmod(steps, static_cast<double>(balance_every)) == 0).to(device);
    bool any_balance = false;
    for (size_t i : dense) {
      any_balance = any_balance || std::fmod(group->steps[i], static_cast<double>(balance_every)) == 0.0;
    }
    if (any_balance) {
      const at::Tensor nl = b.ql.abs().amax({1, 2});
      const at::Tensor nr = b.qr.abs().amax({1, 2});
      const at::Tensor s = (nl * nr).sqrt();
      b.ql = at::where(bcast(balance), b.ql * bcast(s / nl), b.ql);
      b.qr = at::where(bcast(balance), b.qr * bcast(s / nr), b.qr);
    }
    auto gen = at::make_generator<at::CPUGeneratorImpl>(white_kron_stream_seed(seed, stream_step, 0, 0));
    const at::Tensor pg = precondition_stack(b, stack(g_tiles), vr, vc, plr, noise_scale, skew, gen);
    int64_t offset = 0;
    for (size_t i : dense) {
      const auto& lay = layouts[i];
      out[i] = from_tiles(pg.narrow(0, offset, lay.tiles), lay.rows, lay.cols, bs).reshape(group->params[i].sizes());
      ql[i].copy_(b.ql.narrow(0, offset, lay.tiles));
      qr[i].copy_(b.qr.narrow(0, offset, lay.tiles));
      lip_l[i].copy_(b.lip_l.narrow(0, offset, lay.tiles));
      lip_r[i].copy_(b.lip_r.narrow(0, offset, lay.tiles));
      offset += lay.tiles;
    }
  }
  // 3. The per-param paths.
  for (size_t i = 0; i < count; ++i) {
    const auto& lay = layouts[i];
    if (lay.kind == WhiteKronLayout::kDense) {
      continue;
    }
    const auto math = math_of(group->params[i]);
    const double t = group->steps[i];
    const at::Tensor plr = at::full({lay.kind == WhiteKronLayout::kOneD ? 1 : lay.tiles}, plr_of(t),
                                    group->params[i].options().dtype(math));
    const int64_t path = lay.kind == WhiteKronLayout::kLargeDiag   ? 1
                         : lay.kind == WhiteKronLayout::kRowStrips ? 2
                         : lay.kind == WhiteKronLayout::kColStrips ? 3
                                                                   : 4;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(
        white_kron_stream_seed(seed, static_cast<int64_t>(t), path, key_of(i)));
    if (lay.kind == WhiteKronLayout::kOneD) {
      const at::Tensor g = u[i].reshape({1, -1});
      const at::Tensor q = ql[i].to(math).unsqueeze(0);
      const at::Tensor gn = g + draw(gen, g.sizes(), math, g.device()) * noise_scale;
      const at::Tensor pg = q * q * gn;
      auto [q_new, l_new] = diag_update(pg * pg, at::ones({1}, g.options()), lip_l[i], q, plr, skew);
      out[i] = (q_new * q_new * g).reshape(group->params[i].sizes());
      ql[i].copy_(q_new.squeeze(0));
      lip_l[i].copy_(l_new);
      continue;
    }
    const at::Tensor g2 = u[i].reshape({lay.rows, lay.cols}).to(math);
    Batch b;
    b.lip_l = lip_l[i];
    b.lip_r = lip_r[i];
    at::Tensor blocks, vr, vc;
    if (lay.kind == WhiteKronLayout::kLargeDiag) {
      b.diag_left = b.diag_right = true;
      b.ql = ql[i].to(math).unsqueeze(0);
      b.qr = qr[i].to(math).unsqueeze(0);
      blocks = g2.unsqueeze(0);
      vr = at::full({1}, lay.rows, at::kLong);
      vc = at::full({1}, lay.cols, at::kLong);
    } else if (lay.kind == WhiteKronLayout::kRowStrips) {
      b.diag_right = true;
      b.ql = ql[i].to(math);
      b.qr = qr[i].to(math);
      blocks = at::constant_pad_nd(g2, {0, 0, 0, lay.tiles * bs - lay.rows}).view({lay.tiles, bs, lay.cols});
      vr = valid_extents(lay.rows, bs, lay.tiles, 1, 1);
      vc = at::full({lay.tiles}, lay.cols, at::kLong);
    } else {
      b.diag_left = true;
      b.ql = ql[i].to(math);
      b.qr = qr[i].to(math);
      blocks = at::constant_pad_nd(g2, {0, lay.tiles * bs - lay.cols})
                   .view({lay.rows, lay.tiles, bs})
                   .permute({1, 0, 2})
                   .contiguous();
      vr = at::full({lay.tiles}, lay.rows, at::kLong);
      vc = valid_extents(lay.cols, bs, lay.tiles, 1, 1);
    }
    const at::Tensor pg = precondition(b, blocks, vr, vc, plr, noise_scale, skew, gen);
    at::Tensor full;
    if (lay.kind == WhiteKronLayout::kLargeDiag) {
      full = pg.squeeze(0);
      ql[i].copy_(b.ql.squeeze(0));
      qr[i].copy_(b.qr.squeeze(0));
    } else {
      full = lay.kind == WhiteKronLayout::kRowStrips
                 ? pg.reshape({lay.tiles * bs, lay.cols}).narrow(0, 0, lay.rows)
                 : pg.permute({1, 0, 2}).reshape({lay.rows, lay.tiles * bs}).narrow(1, 0, lay.cols);
      ql[i].copy_(b.ql);
      qr[i].copy_(b.qr);
    }
    lip_l[i].copy_(b.lip_l);
    lip_r[i].copy_(b.lip_r);
    out[i] = full.reshape(group->params[i].sizes());
  }
  // 4. RMS clip at 1.1, lr_style "adam", decoupled decay, -lr.
  for (size_t i = 0; i < count; ++i) {
    at::Tensor upd = out[i];  // made by this step (no alias of a param or grad): scaled in place
    const at::Tensor rms = upd.square().mean().sqrt();
    upd.mul_(1.1 / at::clamp_min(rms, 1.1));
    if (lr_style == "adam") {
      upd.div_(5.0);
    }
    at::Tensor& param = group->params[i];
    const uint64_t stream = kernels::cpu::rounding_stream(seed, key_of(i), group->steps[i]);
    psgd_device::apply_update(param, upd, 1.0 - group->lr * weight_decay, -group->lr, stochastic_rounding, stream);
  }
  group->finish();
}

}  // namespace torchopt_ext::functional
