#include "torchopt_ext/common/psgd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace torchopt_ext::common::psgd {

namespace {

constexpr int64_t kMaxAxes = 13;  // rollfast's einsum letter budget
constexpr int64_t kNormProbes = kNormProbeRows;
constexpr int64_t kNormHalfIters = 2;  // LX half_iters=2

double smallest_normal(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

double epsilon(at::ScalarType dtype) {
  return dtype == at::kDouble ? std::numeric_limits<double>::epsilon() : std::numeric_limits<float>::epsilon();
}

at::Tensor symmetrize(const at::Tensor& a) { return (a + a.mT()) * 0.5; }

// Cache block of the hand-written transposed reads below. A strided read of
// a d x d matrix's columns (a 4 KB stride at d = 1024) keeps hitting the same
// cache sets: `q.mT() - q` took 5.8 ms at d = 1024 against 0.2 ms for a
// contiguous subtraction, and its result inherited the column-major layout,
// slowing every later pass that mixed it with row-major operands.
constexpr int64_t kTransposeBlock = 16;

// True for CPU float / double contiguous tensors of the same shape: the
// hand-written loops below take those, ATen takes the rest (CUDA).
bool plain_cpu(const at::Tensor& a, const at::Tensor& b) {
  const auto type = a.scalar_type();
  return a.is_cpu() && b.is_cpu() && (type == at::kFloat || type == at::kDouble) && b.scalar_type() == type &&
         a.is_contiguous() && b.is_contiguous() && a.sizes() == b.sizes();
}

// Mirrors the blocks above the diagonal of a contiguous CPU (d, d) matrix
// into those below it, `bs` x `bs` blocks (symmetric_gram's block size).
template <typename scalar_t>
void mirror_upper_blocks(scalar_t* out, int64_t d, int64_t bs) {
  for (int64_t i = 0; i < d; i += bs) {
    const int64_t ie = std::min(i + bs, d);
    for (int64_t j = i + bs; j < d; j += bs) {
      const int64_t je = std::min(j + bs, d);
      // Tiles of kTransposeBlock: rows of block (i, j) are read contiguously.
      for (int64_t ib = i; ib < ie; ib += kTransposeBlock) {
        for (int64_t jb = j; jb < je; jb += kTransposeBlock) {
          const int64_t ibe = std::min(ib + kTransposeBlock, ie);
          const int64_t jbe = std::min(jb + kTransposeBlock, je);
          for (int64_t r = ib; r < ibe; ++r) {
            const scalar_t* src = out + r * d;
            for (int64_t c = jb; c < jbe; ++c) {
              out[c * d + r] = src[c];
            }
          }
        }
      }
    }
  }
}

// A per-problem scalar s (0-d, or (B,) when batched) shaped to broadcast
// against x (B, ...). Unbatched scalars are returned as they are, so the
// unbatched path runs the ops it always ran.
at::Tensor per_problem(const at::Tensor& s, const at::Tensor& x, bool batched) {
  if (!batched) {
    return s;
  }
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = s.size(0);
  return s.reshape(shape);
}

// max |A| per problem of A (n, n) or (B, n, n) as max(max A, -min A): two
// vectorized read-only passes (exact, NaN-propagating), no |A| temporary.
at::Tensor max_abs_per_problem(const at::Tensor& A) {
  return A.dim() == 3 ? at::maximum(A.amax({-2, -1}), A.amin({-2, -1}).neg()) : at::maximum(A.amax(), A.amin().neg());
}

// Shared body of the SPD / skew lower bounds, A (..., n, n) normalized by
// `scale` (...). One code path for a matrix and a batch of them. LX divides
// A by the scale first; here each (32, n) product v A is divided instead,
// the same values (up to rounding) without an n x n pass and copy.
at::Tensor norm_lower_bound_scaled(const at::Tensor& A, const at::Tensor& scale, const at::Tensor& probes) {
  const double tiny = smallest_normal(A.scalar_type());
  const bool batched = A.dim() == 3;
  const int64_t n = A.size(-1);
  const at::Tensor s = batched ? scale.view({-1, 1, 1}) : scale;
  at::Tensor heavy;  // the heaviest row of A / scale: (1, n) or (B, 1, n)
  if (batched) {
    const at::Tensor j = at::argmax(at::linalg_vector_norm(A, 2, {-1}, false, std::nullopt), -1);
    heavy = A.gather(1, j.view({-1, 1, 1}).expand({A.size(0), 1, n})) / s;
  } else {
    const at::Tensor j = at::argmax(at::linalg_vector_norm(A, 2, {1}, false, std::nullopt)).reshape({1});
    heavy = A.index_select(0, j) / s;
  }
  at::Tensor v = probes;
  v = heavy + at::sign((heavy * v).sum(-1, true)) * v;
  for (int64_t i = 0; i < kNormHalfIters; ++i) {
    v = v.matmul(A).div_(s);
    v = v / (at::linalg_vector_norm(v, 2, {-1}, true, std::nullopt) + tiny);
    v = v.matmul(A).div_(s);
  }
  const at::Tensor norms = at::linalg_vector_norm(v, 2, {-1}, false, std::nullopt);
  return scale * (batched ? norms.amax(-1) : norms.amax());
}

at::Tensor draw_probes(const at::Tensor& A, at::Generator& gen) {
  return at::randn({kNormProbes, A.size(-1)}, gen, A.options());
}

// Blocks per side of a d x d product: about 64 rows each, at most 8, so
// each block product is still an efficient GEMM. One thread, fp32, Kron EQ
// steps of 4-8 square params (bench in docs/benchmarks.md): 64-row blocks
// beat 128-row ones by 3-9% at d = 192-512 and tie at 128; at d = 1024 the
// cap (8 blocks of 128) beats 16 of 64.
int64_t symmetric_blocks(int64_t d) { return std::clamp<int64_t>(d / 64, 1, 8); }

// rows rows^T (d x d) for a (d, K) matrix in any BLAS-compatible layout (a
// transposed or column-sliced view: no copy). Symmetric, so only the blocks
// on and above the diagonal are multiplied (k(k+1)/2 of k^2 block GEMMs, a
// syrk by hand: ATen has none) and the rest are mirrored. lower_rows: rows
// is lower triangular (rows = Q^T of an upper-triangular Q), so block row i
// needs only the first i + n_i columns (about a third of the full product).
at::Tensor symmetric_gram(const at::Tensor& rows, bool lower_rows = false) {
  const int64_t d = rows.size(0);
  const int64_t k = symmetric_blocks(d);
  if (k == 1) {
    return rows.mm(rows.t());
  }
  at::Tensor out = at::empty({d, d}, rows.options());
  const int64_t bs = (d + k - 1) / k;
  // On the CPU one tiled pass mirrors the blocks (a 128 x 128 transposed
  // copy_ into the strided view ran at ~1.7 GB/s).
  const bool mirror_by_hand = plain_cpu(out, out);
  for (int64_t i = 0; i < d; i += bs) {
    const int64_t ni = std::min(bs, d - i);
    const int64_t inner = lower_rows ? i + ni : rows.size(1);
    const at::Tensor ri = rows.narrow(0, i, ni).narrow(1, 0, inner);
    for (int64_t j = i; j < d; j += bs) {
      const int64_t nj = std::min(bs, d - j);
      at::Tensor block = out.narrow(0, i, ni).narrow(1, j, nj);
      at::mm_out(block, ri, rows.narrow(0, j, nj).narrow(1, 0, inner).t());
      if (j != i && !mirror_by_hand) {
        out.narrow(0, j, nj).narrow(1, i, ni).copy_(block.t());
      }
    }
  }
  if (mirror_by_hand) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "psgd_mirror_upper_blocks",
                               [&] { mirror_upper_blocks(out.data_ptr<scalar_t>(), d, bs); });
  }
  return out;
}

// U b for an upper-triangular d x d U and a (d, K) b: block row i of U is
// zero left of its diagonal block, so it multiplies only b's rows from i on
// (about 5/8 of the GEMM at 4 blocks). b_upper: b is also upper triangular
// (d x d), so is the product, and block row i needs only b[i:, i:].
at::Tensor upper_mm(const at::Tensor& u, const at::Tensor& b, bool b_upper = false) {
  const int64_t d = u.size(0);
  const int64_t k = symmetric_blocks(d);
  if (k == 1) {
    return u.mm(b);
  }
  at::Tensor out = at::empty({d, b.size(1)}, b.options());
  const int64_t bs = (d + k - 1) / k;
  for (int64_t i = 0; i < d; i += bs) {
    const int64_t ni = std::min(bs, d - i);
    const at::Tensor ui = u.narrow(0, i, ni).narrow(1, i, d - i);
    if (b_upper) {
      at::Tensor row = out.narrow(0, i, ni);
      at::Tensor upper = row.narrow(1, i, d - i);
      at::mm_out(upper, ui, b.narrow(0, i, d - i).narrow(1, i, d - i));
      row.narrow(1, 0, i).zero_();
    } else {
      at::Tensor row = out.narrow(0, i, ni);
      at::mm_out(row, ui, b.narrow(0, i, d - i));
    }
  }
  return out;
}

// a U^T for a (R, d) a and an upper-triangular d x d U: output column block
// j only sees a's columns from j on.
at::Tensor mm_upper_t(const at::Tensor& a, const at::Tensor& u) {
  const int64_t d = u.size(0);
  const int64_t k = symmetric_blocks(d);
  if (k == 1) {
    return a.mm(u.t());
  }
  at::Tensor out = at::empty({a.size(0), d}, a.options());
  const int64_t bs = (d + k - 1) / k;
  for (int64_t j = 0; j < d; j += bs) {
    const int64_t nj = std::min(bs, d - j);
    at::Tensor cols = out.narrow(1, j, nj);
    at::mm_out(cols, a.narrow(1, j, d - j), u.narrow(0, j, nj).narrow(1, j, d - j).t());
  }
  return out;
}

// An upper-triangular u applied along `axis` of x (x_(axis) <- u x_(axis)),
// with the triangular block products above.
at::Tensor apply_upper(const at::Tensor& x, const at::Tensor& u, int64_t axis) {
  const int64_t d = u.size(0);
  if (axis == x.dim() - 1) {
    return mm_upper_t(x.reshape({-1, d}), u).view(x.sizes());
  }
  if (axis == 0) {
    return upper_mm(u, x.reshape({d, -1})).view(x.sizes());
  }
  const at::Tensor moved = x.movedim(axis, 0);
  const auto sizes = moved.sizes().vec();
  return upper_mm(u, moved.reshape({d, -1})).reshape(sizes).movedim(0, axis);
}

// m applied along `axis` of x (x_(axis) <- m x_(axis)) for a dense d x d m.
// The first and last axes multiply x's contiguous storage in place of a
// movedim copy; middle axes go through one.
at::Tensor apply_dense(const at::Tensor& x, const at::Tensor& m, int64_t axis) {
  const int64_t d = m.size(0);
  if (axis == 0) {
    return m.mm(x.reshape({d, -1})).view(x.sizes());
  }
  if (axis == x.dim() - 1) {
    return x.reshape({-1, d}).mm(m.t()).view(x.sizes());
  }
  const at::Tensor moved = x.movedim(axis, 0);
  const auto sizes = moved.sizes().vec();
  return m.mm(moved.reshape({d, -1})).reshape(sizes).movedim(0, axis);
}

}  // namespace

MemorySaveMode parse_memory_save_mode(const std::optional<std::string>& name, const char* argument) {
  if (!name || name->empty()) {
    return MemorySaveMode::None;
  }
  if (*name == "one_diag") {
    return MemorySaveMode::OneDiag;
  }
  if (*name == "all_diag") {
    return MemorySaveMode::AllDiag;
  }
  TORCH_CHECK_VALUE(false, argument, " must be None, 'one_diag' or 'all_diag', got '", *name, "'");
}

std::vector<bool> factor_layout(at::IntArrayRef shape, const LayoutOptions& options) {
  const auto rank = static_cast<int64_t>(shape.size());
  if (rank == 0) {
    return {false};
  }
  TORCH_CHECK_VALUE(rank <= kMaxAxes, "Kron preconditioners support tensors of at most ", kMaxAxes, " dims, got shape ",
                    shape);
  int64_t numel = 1;
  for (const auto d : shape) {
    numel *= d;
  }
  std::vector<bool> forced(rank, options.memory_save_mode == MemorySaveMode::AllDiag);
  if (options.memory_save_mode == MemorySaveMode::OneDiag) {
    // The largest axis; among equal ones the last (numpy's reversed argsort).
    int64_t largest = 0;
    for (int64_t i = 1; i < rank; ++i) {
      if (shape[i] >= shape[largest]) {
        largest = i;
      }
    }
    forced[largest] = true;
  }
  std::vector<bool> dense(rank);
  for (int64_t i = 0; i < rank; ++i) {
    const int64_t d = shape[i];
    const bool diagonal =
        d <= 1 || d > options.max_size_triangular ||
        static_cast<double>(d) * static_cast<double>(d) > options.max_skew_triangular * static_cast<double>(numel) ||
        rank < options.min_ndim_triangular || forced[i];
    dense[i] = !diagonal;
  }
  return dense;
}

int64_t factors_numel(at::IntArrayRef shape, const std::vector<bool>& dense) {
  if (shape.empty()) {
    return 1;
  }
  int64_t total = 0;
  for (size_t i = 0; i < shape.size(); ++i) {
    total += dense[i] ? shape[i] * shape[i] : shape[i];
  }
  return total;
}

namespace {

// Views of the factors in the last dim of `flat` (leading dims, if any, are a
// batch): (..., d, d) for a dense axis, (..., d) for a diagonal one.
std::vector<at::Tensor> split_factors(const at::Tensor& flat, at::IntArrayRef shape, const std::vector<bool>& dense) {
  if (shape.empty()) {
    return {flat};
  }
  const auto lead = flat.sizes().slice(0, flat.dim() - 1);
  std::vector<at::Tensor> factors;
  int64_t offset = 0;
  for (size_t i = 0; i < shape.size(); ++i) {
    const int64_t d = shape[i];
    if (dense[i]) {
      std::vector<int64_t> view(lead.begin(), lead.end());
      view.push_back(d);
      view.push_back(d);
      factors.push_back(flat.narrow(-1, offset, d * d).view(view));
      offset += d * d;
    } else {
      factors.push_back(flat.narrow(-1, offset, d));
      offset += d;
    }
  }
  return factors;
}

}  // namespace

std::vector<at::Tensor> unflatten_factors(const at::Tensor& flat, at::IntArrayRef shape,
                                          const std::vector<bool>& dense) {
  TORCH_CHECK_VALUE(flat.dim() == 1 && flat.numel() == factors_numel(shape, dense),
                    "Kron: a preconditioner of a param of shape ", shape, " must be 1-D with ",
                    factors_numel(shape, dense), " elements, got shape ", flat.sizes());
  return split_factors(flat, shape, dense);
}

std::vector<at::Tensor> unflatten_factors_batched(const at::Tensor& flat, at::IntArrayRef shape,
                                                  const std::vector<bool>& dense) {
  TORCH_CHECK_VALUE(flat.dim() == 2 && flat.size(1) == factors_numel(shape, dense),
                    "Kron: stacked preconditioners of slices of shape ", shape, " must be (L, ",
                    factors_numel(shape, dense), "), got shape ", flat.sizes());
  return split_factors(flat, shape, dense);
}

void init_factors_(const at::Tensor& flat, at::IntArrayRef shape, const std::vector<bool>& dense, double scale) {
  auto factors = unflatten_factors(flat, shape, dense);
  const double per_factor = std::pow(scale, 1.0 / static_cast<double>(factors.size()));
  for (auto& q : factors) {
    if (q.dim() == 2) {
      q.copy_(at::eye(q.size(0), q.options()) * per_factor);
    } else {
      q.fill_(per_factor);
    }
  }
}

at::Tensor apply_factor(const at::Tensor& x, const at::Tensor& q, int64_t axis, bool transpose) {
  if (x.dim() == 0) {
    return x * q.reshape({});
  }
  if (q.dim() == 1) {
    std::vector<int64_t> view(x.dim(), 1);
    view[axis] = q.size(0);
    return x * q.view(view);
  }
  return apply_dense(x, transpose ? q.t() : q, axis);
}

namespace {

// apply_factor over a leading batch axis: x (B, ...), q (B, d, d) / (B, d),
// `axis` counted within one slice.
at::Tensor apply_factor_batched(const at::Tensor& x, const at::Tensor& q, int64_t axis, bool transpose) {
  const int64_t dim = axis + 1;
  if (q.dim() == 2) {
    std::vector<int64_t> view(x.dim(), 1);
    view[0] = q.size(0);
    view[dim] = q.size(1);
    return x * q.view(view);
  }
  const at::Tensor moved = x.movedim(dim, 1);
  const auto sizes = moved.sizes().vec();
  const at::Tensor out = (transpose ? q.mT() : q).bmm(moved.reshape({sizes[0], sizes[1], -1}));
  return out.reshape(sizes).movedim(1, dim);
}

at::Tensor apply_one(const at::Tensor& x, const at::Tensor& q, int64_t axis, bool transpose, bool batched) {
  return batched ? apply_factor_batched(x, q, axis, transpose) : apply_factor(x, q, axis, transpose);
}

// A tensor of rank >= 3 whose factors are all dense (a conv weight): the
// per-axis path moves middle axes with movedim copies (and multiplies the
// last axis as a (numel/d, d) x (d, d) product, slow in BLAS for small d).
bool rotates(const at::Tensor& x, const std::vector<at::Tensor>& factors) {
  if (x.dim() < 3 || static_cast<int64_t>(factors.size()) != x.dim()) {
    return false;
  }
  return std::all_of(factors.begin(), factors.end(), [](const at::Tensor& q) { return q.dim() == 2; });
}

// Contracts the axes from last to first, each step taking the last axis of
// the storage to the front: front(i, b) gets the (d_i, rest) matrix b (a
// transposed view of contiguous storage, no copy) and returns the contiguous
// (d_i, rest) result M_i b. After rank steps the axes are back in order, so
// no step copies the tensor.
template <class Front>
at::Tensor rotate_apply(const at::Tensor& x, Front&& front) {
  at::Tensor y = x.contiguous();
  for (int64_t i = x.dim() - 1; i >= 0; --i) {
    y = front(i, y.view({-1, x.size(i)}).t()).contiguous();
  }
  return y.view(x.sizes());
}

// rows q^{-1} (solve y q = rows) for an upper-triangular q and a 2-D rows.
// LAPACK wants the right-hand side column-major: given a row-major one,
// linalg_solve_triangular copies it by a strided walk and then solves into a
// fresh result. On the CPU a transposed contiguous copy (a blocked
// transpose, ~4x faster than the strided walk at 4096 x 1024) solved in
// place skips both. Same LAPACK call, same result.
at::Tensor solve_upper_right(const at::Tensor& q, const at::Tensor& rows) {
  if (!rows.is_cpu() || rows.dim() != 2) {
    return at::linalg_solve_triangular(q, rows, /*upper=*/true, /*left=*/false);
  }
  // Already column-major: a copy keeping that layout (rows itself stays intact).
  at::Tensor b = rows.t().is_contiguous() ? rows.clone(at::MemoryFormat::Preserve) : rows.t().contiguous().t();
  at::linalg_solve_triangular_out(b, q, b, /*upper=*/true, /*left=*/false);
  return b;
}

}  // namespace

at::Tensor apply_q(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched, bool upper_triangular) {
  if (!batched && rotates(x, factors)) {
    return rotate_apply(x, [&](int64_t i, const at::Tensor& b) {
      return upper_triangular ? upper_mm(factors[i], b) : factors[i].mm(b);
    });
  }
  at::Tensor out = x;
  for (size_t i = 0; i < factors.size(); ++i) {
    const auto axis = static_cast<int64_t>(i);
    const at::Tensor& q = factors[i];
    if (batched) {
      out = apply_factor_batched(out, q, axis, false);
      continue;
    }
    out =
        upper_triangular && q.dim() == 2 && x.dim() > 0 ? apply_upper(out, q, axis) : apply_factor(out, q, axis, false);
  }
  return out;
}

at::Tensor apply_p(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched, bool upper_triangular) {
  const int64_t numel = x.numel();
  if (!batched && rotates(x, factors)) {
    return rotate_apply(x, [&](int64_t i, const at::Tensor& b) {
      const at::Tensor& q = factors[i];
      const int64_t d = q.size(0);
      // As below: the formed P_i when 0.6 d^2 <= numel.
      if (d * d * 5 <= numel * 8) {
        return symmetric_gram(q.t(), upper_triangular).mm(b);
      }
      return q.t().mm(upper_triangular ? upper_mm(q, b) : q.mm(b));
    });
  }
  at::Tensor out = x;
  for (size_t i = 0; i < factors.size(); ++i) {
    const auto axis = static_cast<int64_t>(i);
    if (batched) {
      out = apply_one(apply_one(out, factors[i], axis, false, batched), factors[i], axis, true, batched);
      continue;
    }
    const at::Tensor& q = factors[i];
    if (q.dim() == 1) {
      // A diagonal P_i = q^2 (a d-vector): one pass over x instead of two.
      out = apply_factor(out, q.square(), axis, false);
      continue;
    }
    if (q.dim() == 2 && x.dim() > 0) {
      const int64_t d = q.size(0);
      // Q^T (Q x) costs 2 d numel; forming P = Q^T Q first (symmetric: about
      // 0.6 d^3 with the blocked Gram, 0.3 d^3 for a triangular Q) then P x
      // costs d numel more. Cheaper whenever 0.6 d^2 < numel, which holds
      // for every factor the default skew rule makes dense.
      if (d * d * 5 <= numel * 8) {
        out = apply_dense(out, symmetric_gram(q.t(), upper_triangular), axis);
        continue;
      }
    }
    out = apply_factor(apply_factor(out, q, axis, false), q, axis, true);
  }
  return out;
}

at::Tensor solve_q_right(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched) {
  if (batched) {
    at::Tensor out = x;
    for (size_t i = 0; i < factors.size(); ++i) {
      const int64_t dim = static_cast<int64_t>(i) + 1;
      const at::Tensor& q = factors[i];
      if (q.dim() == 2) {
        std::vector<int64_t> view(x.dim(), 1);
        view[0] = q.size(0);
        view[dim] = q.size(1);
        out = out / q.view(view);
        continue;
      }
      const at::Tensor moved = out.movedim(dim, -1);
      const auto sizes = moved.sizes().vec();
      const at::Tensor rows = moved.reshape({sizes[0], -1, q.size(1)});
      const at::Tensor solved = at::linalg_solve_triangular(q, rows, /*upper=*/true, /*left=*/false);
      out = solved.reshape(sizes).movedim(-1, dim);
    }
    return out;
  }
  if (x.dim() == 0) {
    return x / factors[0].reshape({});
  }
  if (rotates(x, factors)) {
    // Fibers times q^{-1} is q^{-T} on the (d, rest) matrix: the solve of
    // rows(rest, d) q^{-1} writes its column-major result, i.e. the rotated
    // (d, rest) storage; the row-major rows are transposed once (solve_upper_right).
    return rotate_apply(x, [&](int64_t i, const at::Tensor& b) { return solve_upper_right(factors[i], b.t()).t(); });
  }
  at::Tensor out = x;
  for (size_t i = 0; i < factors.size(); ++i) {
    const auto axis = static_cast<int64_t>(i);
    const at::Tensor& q = factors[i];
    if (q.dim() == 1) {
      std::vector<int64_t> view(x.dim(), 1);
      view[axis] = q.size(0);
      out = out / q.view(view);
      continue;
    }
    const at::Tensor moved = out.movedim(axis, -1);
    const auto sizes = moved.sizes().vec();
    const at::Tensor rows = moved.reshape({-1, q.size(0)});
    // rows q^{-1}: solve y q = rows with q upper-triangular.
    const at::Tensor solved = solve_upper_right(q, rows);
    out = solved.reshape(sizes).movedim(-1, axis);
  }
  return out;
}

at::Tensor factor_gram(const at::Tensor& x, int64_t axis, bool dense, bool batched) {
  if (batched) {
    const at::Tensor moved = x.movedim(axis + 1, 1);
    const at::Tensor rows = moved.reshape({moved.size(0), moved.size(1), -1});
    if (dense) {
      return rows.bmm(rows.mT());
    }
    return rows.square().sum(2);
  }
  if (x.dim() == 0) {
    return x.square().reshape({1});
  }
  const int64_t d = x.size(axis);
  at::Tensor rows;  // (d, numel / d): fibers along `axis` as columns
  if (axis == 0) {
    rows = x.reshape({d, -1});
  } else if (axis == x.dim() - 1) {
    rows = x.reshape({-1, d}).t();  // a transposed view, no copy
  } else {
    rows = x.movedim(axis, 0).reshape({d, -1});
  }
  if (dense) {
    return symmetric_gram(rows);
  }
  return rows.square().sum(1);
}

at::Tensor norm_lower_bound_spd(const at::Tensor& A, const at::Tensor& probes) {
  const at::Tensor diag = A.diagonal(0, -2, -1);
  const at::Tensor scale = (A.dim() == 3 ? diag.amax(-1) : diag.amax()) + smallest_normal(A.scalar_type());
  return norm_lower_bound_scaled(A, scale, probes);
}

at::Tensor norm_lower_bound_skh(const at::Tensor& A, const at::Tensor& probes) {
  return norm_lower_bound_scaled(A, max_abs_per_problem(A) + smallest_normal(A.scalar_type()), probes);
}

at::Tensor norm_lower_bound_spd(const at::Tensor& A, at::Generator& gen) {
  return norm_lower_bound_spd(A, draw_probes(A, gen));
}

at::Tensor norm_lower_bound_skh(const at::Tensor& A, at::Generator& gen) {
  return norm_lower_bound_skh(A, draw_probes(A, gen));
}

at::Tensor skew_part(const at::Tensor& out, const at::Tensor& q) {
  const bool batched = q.dim() == 3;
  if (!plain_cpu(out, q) || q.size(-1) != q.size(-2)) {
    at::Tensor r = out;
    at::sub_out(r, q.mT(), q);
  } else {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "psgd_skew_part", [&] {
      const int64_t n = q.size(-1);
      const int64_t per_problem_numel = n * n;
      scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* x = q.data_ptr<scalar_t>();
      at::parallel_for(0, batched ? q.size(0) : 1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t base = t * per_problem_numel;
          // Block (jb, ib) of q is read by rows into a local transposed copy,
          // then block (ib, jb) of out is written row by row.
          scalar_t block[kTransposeBlock * kTransposeBlock];
          for (int64_t ib = 0; ib < n; ib += kTransposeBlock) {
            const int64_t ie = std::min(ib + kTransposeBlock, n);
            for (int64_t jb = 0; jb < n; jb += kTransposeBlock) {
              const int64_t je = std::min(jb + kTransposeBlock, n);
              for (int64_t j = jb; j < je; ++j) {
                const scalar_t* row = x + base + j * n;
                for (int64_t i = ib; i < ie; ++i) {
                  block[(i - ib) * kTransposeBlock + (j - jb)] = row[i];
                }
              }
              for (int64_t i = ib; i < ie; ++i) {
                const scalar_t* __restrict t_row = block + (i - ib) * kTransposeBlock - jb;
                const scalar_t* __restrict row = x + base + i * n;
                scalar_t* __restrict dst = o + base + i * n;
                for (int64_t j = jb; j < je; ++j) {
                  dst[j] = t_row[j] - row[j];
                }
              }
            }
          }
        }
      });
    });
  }
  return max_abs_per_problem(out);
}

void procrustes_step_(at::Tensor& q, const ProbeSource& probes, double max_step) {
  const bool batched = q.dim() == 3;
  // R = Q^T - Q, row-major (skew_part), with max |R| for the bound's scale.
  at::Tensor r = at::empty_like(q, at::MemoryFormat::Contiguous);
  const at::Tensor scale = skew_part(r, q) + smallest_normal(q.scalar_type());
  r.div_(per_problem(norm_lower_bound_scaled(r, scale, probes(q.size(-1))) + smallest_normal(q.scalar_type()), r,
                     batched));
  if (!batched) {
    // R is skew, so R R = -R^T R is symmetric: one blocked Gram instead of
    // the GEMM R (R Q), and the step becomes (I + a R + a^2/2 R R) Q, one
    // GEMM. The traces need no product: tr(R Q) = sum(R o Q^T), likewise
    // tr(R R Q).
    // S = R^T R = -R R. With R^T = -R and S^T = S both traces are plain
    // dot products of contiguous storage: tr(R Q) = -<R, Q>, tr(R R Q) =
    // -<S, Q> (no product, no transposed read).
    const at::Tensor s = symmetric_gram(r.t());
    const at::Tensor tr_rq = -at::dot(r.reshape({-1}), q.reshape({-1}));
    const at::Tensor tr_rrq = -at::dot(s.reshape({-1}), q.reshape({-1}));
    // Where tr(RRQ) >= 0 the division is unused (and may be inf/nan).
    const at::Tensor a =
        at::where(tr_rrq < 0, at::clamp_max(-tr_rq / tr_rrq, max_step), at::scalar_tensor(max_step, q.options()));
    // Q + (a R - a^2/2 S) Q: the outer sum rides on the GEMM (addmm), into
    // S's storage (free once the left matrix is formed; no fresh d x d result).
    at::Tensor out = s;
    q = at::addmm_out(out, q, r.mul_(a).sub_(s.mul_(0.5 * a * a)), q);
    return;
  }
  const at::Tensor rq = r.matmul(q);
  const at::Tensor rrq = r.matmul(rq);
  const at::Tensor tr_rq = rq.diagonal(0, -2, -1).sum(-1);
  const at::Tensor tr_rrq = rrq.diagonal(0, -2, -1).sum(-1);
  // Where tr(RRQ) >= 0 the division is unused (and may be inf/nan).
  const at::Tensor a = per_problem(
      at::where(tr_rrq < 0, at::clamp_max(-tr_rq / tr_rrq, max_step), at::scalar_tensor(max_step, q.options())), q,
      batched);
  q = q + a * (rq + 0.5 * a * rrq);
}

void procrustes_step_(at::Tensor& q, at::Generator& gen, double max_step) {
  procrustes_step_(q, [&](int64_t n) { return at::randn({kNormProbes, n}, gen, q.options()); }, max_step);
}

Geometry parse_geometry(const std::string& name, const char* argument) {
  if (name == "EQ") return Geometry::EQ;
  if (name == "Q0.5EQ1.5" || name == "Q0p5EQ1p5") return Geometry::Q0p5EQ1p5;
  if (name == "QUAD") return Geometry::QUAD;
  if (name == "NS") return Geometry::NS;
  if (name == "EXP") return Geometry::EXP;
  if (name == "TAYLOR2") return Geometry::TAYLOR2;
  if (name == "HYPER") return Geometry::HYPER;
  TORCH_CHECK_VALUE(false, argument,
                    " must be one of 'EQ', 'Q0.5EQ1.5' ('Q0p5EQ1p5'), 'QUAD', 'NS', 'EXP', 'TAYLOR2', 'HYPER', got '",
                    name, "'");
}

bool probes_with_q(Geometry geometry) { return geometry == Geometry::EQ || geometry == Geometry::TAYLOR2; }

int64_t probe_draws(Geometry geometry, bool dense) {
  if (!dense) {
    return 0;
  }
  return geometry == Geometry::Q0p5EQ1p5 || geometry == Geometry::NS ? 2 : 1;
}

void update_factor_(at::Tensor& q, const at::Tensor& t1, const at::Tensor& t2, at::Tensor& lipschitz,
                    const FactorUpdateOptions& options, at::Generator& gen) {
  update_factor_(
      q, t1, t2, lipschitz, options, [&](int64_t n) { return at::randn({kNormProbes, n}, gen, q.options()); }, false);
}

void update_factor_(at::Tensor& q, const at::Tensor& t1, const at::Tensor& t2, at::Tensor& lipschitz,
                    const FactorUpdateOptions& options, const ProbeSource& probes, bool batched) {
  const double tiny = smallest_normal(q.scalar_type());
  const bool dense = q.dim() == (batched ? 3 : 2);
  const bool eq = options.geometry == Geometry::EQ;
  // Largest entry of each problem (a (B,) vector when batched).
  auto amax = [&](const at::Tensor& x) { return batched ? x.amax(-1) : x.amax(); };
  // A per-problem scalar broadcast against x.
  auto each = [&](const at::Tensor& s, const at::Tensor& x) { return per_problem(s, x, batched); };
  // EQ: T1 and the conjB Gram T2; the others: T1 + damping (every entry,
  // rollfast) against the scalar T2 = numel / d.
  // t1 is the caller's scratch: the damping is added in place (a fresh d x d
  // result costs page faults at d = 1024, ~3 ms at one thread).
  const at::Tensor t1r = eq ? t1 : t1.add_(options.damping);
  at::Tensor ell;
  if (eq) {
    const at::Tensor sum = t1 + t2;
    ell = dense ? norm_lower_bound_spd(sum, probes(q.size(-1))) : amax(sum);
  } else {
    ell = (dense ? norm_lower_bound_spd(t1r, probes(q.size(-1))) : amax(t1r.abs())) + t2;
  }
  at::Tensor eta;
  if (options.track_lipschitz) {
    const at::Tensor ell_f = ell.to(lipschitz.scalar_type());
    const at::Tensor tracked =
        at::maximum(lipschitz * options.beta_lipschitz + ell_f * (1.0 - options.beta_lipschitz), ell_f);
    lipschitz.copy_(tracked);
    eta = options.lr / tracked.to(q.scalar_type());
  } else {
    eta = options.lr / (ell + tiny);
  }
  if (!dense) {
    q = (q * (1.0 - each(eta, q) * (t1r - t2))).abs();
    return;
  }
  const int64_t d = q.size(-1);
  // Only NS, EXP, TAYLOR2 and HYPER use I: EQ and Q0.5EQ1.5 skip the d x d fill.
  auto identity = [&] { return at::eye(d, q.options()); };
  const at::Tensor eta_q = each(eta, q);
  switch (options.geometry) {
    case Geometry::EQ:
      if (q.dim() == 3) {
        q = q - eta_q * at::triu(t1 - t2).matmul(q);
      } else {
        // (I - eta triu(T1 - T2)) Q: one GEMM and no pass over its result.
        // Both upper triangular: the blocked product skips the zero blocks.
        at::Tensor m = (t1 - t2).triu_().mul_(-eta_q);
        m.diagonal().add_(1.0);
        q = upper_mm(m, q, /*b_upper=*/true);
      }
      return;
    case Geometry::Q0p5EQ1p5:
      if (q.dim() == 3) {
        q = q - eta_q * (t1r.matmul(q) - t2 * q);
      } else {
        // ((1 + eta T2) I - eta T1r) Q: the four passes over Q's size after
        // the GEMM become one over T1r's before it.
        // T1r (T1 + damping, in t1's storage) is scaled in place.
        at::Tensor m = t1r;
        m.mul_(-eta_q);
        m.diagonal().add_(1.0 + eta_q * t2);
        q = m.mm(q);
      }
      procrustes_step_(q, probes);
      return;
    case Geometry::QUAD: {
      const at::Tensor s = eta_q * (t1r.matmul(q) - t2 * q);
      at::Tensor p = q - 0.5 * s;
      p = p - 0.5 * eta_q * (p.matmul(t1r) - p * t2);
      q = symmetrize(p);
      return;
    }
    case Geometry::NS: {
      const at::Tensor eye = identity();
      const at::Tensor qp = q - eta_q * (t1r.matmul(q) - t2 * q);
      const at::Tensor sigma = norm_lower_bound_spd(qp.mT().matmul(qp), probes(d)).sqrt();
      at::Tensor x = qp / each(sigma + epsilon(q.scalar_type()), qp);
      for (int64_t i = 0; i < options.ns_iters; ++i) {
        x = 0.5 * x.matmul(3.0 * eye - x.mT().matmul(x));
      }
      q = symmetrize(x.mT().matmul(qp));
      return;
    }
    case Geometry::EXP: {
      const at::Tensor eye = identity();
      const at::Tensor g_sym = symmetrize(t1r) - t2 * eye;
      const at::Tensor h = -eta_q * g_sym;
      at::Tensor e;
      if (batched) {
        // One matrix at a time: a batched matrix_exp picks its Pade degree
        // for the whole batch, so a small-norm slice would not round like
        // its own exponential (measured 5e-11 apart after 30 steps).
        std::vector<at::Tensor> each_exp;
        for (int64_t b = 0; b < h.size(0); ++b) {
          each_exp.push_back(at::linalg_matrix_exp(h.select(0, b)));
        }
        e = at::stack(each_exp);
      } else {
        e = at::linalg_matrix_exp(h);
      }
      q = symmetrize(q.matmul(e));
      return;
    }
    case Geometry::TAYLOR2: {
      const at::Tensor eye = identity();
      const at::Tensor g_sym = symmetrize(t1r) - t2 * eye;
      const at::Tensor step = each(at::minimum(eta, 0.5 / (ell - t2 + tiny)), q);
      const at::Tensor h = step * g_sym;
      q = symmetrize(q.matmul(eye - h.matmul(eye - 0.5 * h)));
      return;
    }
    case Geometry::HYPER: {
      const at::Tensor eye = identity();
      const at::Tensor g_sym = symmetrize(t1r) - t2 * eye;
      const at::Tensor step = each(at::minimum(eta, 0.9 / (ell - t2 + tiny)), q);
      q = symmetrize(q.matmul(eye - step * g_sym));
      return;
    }
  }
}

void skip_update_factor_draws(int64_t d, bool dense, const FactorUpdateOptions& options, at::ScalarType dtype,
                              at::Generator& gen) {
  for (int64_t k = 0; k < probe_draws(options.geometry, dense); ++k) {
    (void)at::randn({kNormProbeRows, d}, gen, at::TensorOptions().dtype(dtype));
  }
}

void balance_factors_(std::vector<at::Tensor>& factors, bool batched) {
  if (factors.size() < 2) {
    return;
  }
  std::vector<at::Tensor> norms;
  at::Tensor product;
  for (const auto& q : factors) {
    // Per slice when batched: over the factor's own axes only.
    norms.push_back(batched ? q.abs().flatten(1).amax(1) : q.abs().amax());
    product = product.defined() ? product * norms.back() : norms.back();
  }
  const at::Tensor mean = product.pow(1.0 / static_cast<double>(factors.size()));
  for (size_t i = 0; i < factors.size(); ++i) {
    factors[i] = factors[i] * per_problem(mean / norms[i], factors[i], batched);
  }
}

}  // namespace torchopt_ext::common::psgd

namespace torchopt_ext::common::psgd {

bool prefer_batched(const at::Device& device, int64_t slice_numel) {
  return !device.is_cpu() || slice_numel <= kCpuBatchedMaxNumel;
}

}  // namespace torchopt_ext::common::psgd
