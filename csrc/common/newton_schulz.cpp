#include "torchopt_ext/common/newton_schulz.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <limits>
#include <utility>

namespace torchopt_ext::common {

NSNormalization parse_ns_normalization(const std::string& name, const char* argument) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "frobenius") {
    return NSNormalization::Frobenius;
  }
  if (lower == "spectral") {
    return NSNormalization::Spectral;
  }
  if (lower == "aol") {
    return NSNormalization::AOL;
  }
  if (lower == "schatten") {
    return NSNormalization::Schatten;
  }
  TORCH_CHECK_VALUE(false, "invalid ", argument, " '", name,
                    "': expected 'frobenius', 'spectral', 'aol' or 'schatten'");
}

NSCoefficients standard_ns_coefficients() { return {{3.4445, -4.7750, 2.0315}}; }

NSCoefficients dion_ns_coefficients() {
  return {{4.0848, -6.8946, 2.9270},
          {3.9505, -6.3029, 2.6377},
          {3.7418, -5.5913, 2.3037},
          {2.8769, -3.1427, 1.2046},
          {2.8366, -3.0525, 1.2012}};
}

namespace {

// Solves the 4x4 system `a x = rhs` by Gaussian elimination with partial pivoting.
std::array<double, 4> solve4(std::array<std::array<double, 4>, 4> a, std::array<double, 4> rhs) {
  for (int col = 0; col < 4; ++col) {
    int pivot = col;
    for (int row = col + 1; row < 4; ++row) {
      if (std::abs(a[row][col]) > std::abs(a[pivot][col])) {
        pivot = row;
      }
    }
    std::swap(a[col], a[pivot]);
    std::swap(rhs[col], rhs[pivot]);
    for (int row = col + 1; row < 4; ++row) {
      const double f = a[row][col] / a[col][col];
      for (int k = col; k < 4; ++k) {
        a[row][k] -= f * a[col][k];
      }
      rhs[row] -= f * rhs[col];
    }
  }
  std::array<double, 4> x{};
  for (int row = 3; row >= 0; --row) {
    double sum = rhs[row];
    for (int k = row + 1; k < 4; ++k) {
      sum -= a[row][k] * x[k];
    }
    x[row] = sum / a[row][row];
  }
  return x;
}

// The odd quintic p(x) = a x + b x^3 + c x^5 that equioscillates around 1 on
// [l, u]: p(x) - 1 = +-E at l, the two interior extrema q < r, and u (Remez).
std::array<double, 3> optimal_quintic(double l, double u) {
  TORCH_CHECK_VALUE(l > 0.0 && l <= u, "polar_express: need 0 < l <= u, got l=", l, ", u=", u);
  if (l / u >= 1.0 - 1e-5) {  // a tiny interval: the classic quintic Newton-Schulz step, scaled to u
    return {(15.0 / 8.0) / u, (-10.0 / 8.0) / (u * u * u), (3.0 / 8.0) / std::pow(u, 5)};
  }
  double q = (3.0 * l + u) / 4.0;
  double r = (l + 3.0 * u) / 4.0;
  double err = std::numeric_limits<double>::infinity();
  std::array<double, 4> x{};
  for (int it = 0; it < 1000; ++it) {
    const double old_err = err;
    const std::array<double, 4> pts{l, q, r, u};
    std::array<std::array<double, 4>, 4> lhs{};
    for (int i = 0; i < 4; ++i) {
      const double p = pts[i];
      lhs[i] = {p, p * p * p, std::pow(p, 5), (i % 2 == 0) ? 1.0 : -1.0};
    }
    x = solve4(lhs, {1.0, 1.0, 1.0, 1.0});
    err = x[3];
    // New interior extrema: roots of p'(x) = a + 3 b x^2 + 5 c x^4.
    const double disc = std::sqrt(9.0 * x[1] * x[1] - 20.0 * x[0] * x[2]);
    q = std::sqrt((-3.0 * x[1] - disc) / (10.0 * x[2]));
    r = std::sqrt((-3.0 * x[1] + disc) / (10.0 * x[2]));
    if (it > 0 && std::abs(old_err - err) <= 1e-15) {
      break;
    }
  }
  return {x[0], x[1], x[2]};
}

}  // namespace

NSCoefficients polar_express_coefficients(int64_t num_iters, double lower, double safety_eps, double cushion) {
  TORCH_CHECK_VALUE(num_iters >= 1, "polar_express: num_iters must be >= 1, got ", num_iters);
  TORCH_CHECK_VALUE(lower > 0.0 && lower <= 1.0, "polar_express: l must be in (0, 1], got ", lower);
  TORCH_CHECK_VALUE(safety_eps >= 0.0 && cushion >= 0.0 && cushion <= 1.0,
                    "polar_express: need safety_eps >= 0 and cushion in [0, 1]");
  const double safety = 1.0 + safety_eps;
  double l = lower;
  double u = 1.0;
  NSCoefficients rows;
  auto poly = [](const std::array<double, 3>& c, double x) {
    return c[0] * x + c[1] * x * x * x + c[2] * std::pow(x, 5);
  };
  for (int64_t i = 0; i < num_iters; ++i) {
    std::array<double, 3> c = optimal_quintic(std::max(l, cushion * u), u);
    if (cushion * u > l) {
      // Fitted on the cushioned interval: rescale so 1 - p(l) = p(u) - 1 on [l, u].
      const double rescale = 2.0 / (poly(c, l) + poly(c, u));
      for (auto& v : c) {
        v *= rescale;
      }
    }
    if (i + 1 < num_iters) {  // headroom for rounding; the last step keeps its exact fit
      c[0] /= safety;
      c[1] /= std::pow(safety, 3);
      c[2] /= std::pow(safety, 5);
    }
    rows.push_back(c);
    l = poly(c, l);
    u = 2.0 - l;
  }
  return rows;
}

NSCoefficients ns_coefficients_preset(const std::string& name, int64_t steps, const char* argument) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "standard") {
    return standard_ns_coefficients();
  }
  if (lower == "dion") {
    return dion_ns_coefficients();
  }
  if (lower == "polar_express") {
    TORCH_CHECK_VALUE(steps >= 1 && steps < 100, "invalid ", argument,
                      " 'polar_express': the iteration count must be in [1, 100), got ", steps);
    return polar_express_coefficients(steps);
  }
  TORCH_CHECK_VALUE(false, "invalid ", argument, " '", name, "': expected 'standard', 'dion' or 'polar_express'");
}

NSCoefficients resolve_ns_coefficients(const std::string& preset, const std::vector<double>& flat, int64_t steps,
                                       const char* argument) {
  return preset.empty() ? ns_coefficients_from_flat(flat, argument) : ns_coefficients_preset(preset, steps, argument);
}

NSCoefficients ns_coefficients_from_flat(const std::vector<double>& flat, const char* argument) {
  TORCH_CHECK_VALUE(!flat.empty() && flat.size() % 3 == 0, "invalid ", argument,
                    ": expected (a, b, c) triples (a non-empty multiple of 3 values), got ", flat.size(), " values");
  NSCoefficients rows(flat.size() / 3);
  for (size_t i = 0; i < rows.size(); ++i) {
    for (size_t j = 0; j < 3; ++j) {
      const double value = flat[3 * i + j];
      TORCH_CHECK_VALUE(std::isfinite(value), "invalid ", argument, ": coefficients must be finite, got ", value);
      rows[i][j] = value;
    }
  }
  return rows;
}

void check_newton_schulz_options(const char* op, const NewtonSchulzOptions& options) {
  TORCH_CHECK_VALUE(!options.coefficients.empty(), op, ": ns_coefficients must not be empty");
  TORCH_CHECK_VALUE(options.steps >= 1 && options.steps < 100, op, ": ns_steps must be in [1, 100), got ",
                    options.steps);
  TORCH_CHECK_VALUE(std::isfinite(options.eps) && options.eps >= 0.0, op, ": eps must be >= 0, got ", options.eps);
  if (options.dtype) {
    TORCH_CHECK_VALUE(at::isFloatingType(*options.dtype), op, ": ns_dtype must be a floating dtype, got ",
                      *options.dtype);
  }
}

namespace {

// X @ Y^T over the last two dims; 2-D inputs take the plain matmul path so a
// single matrix matches torch.optim.Muon's arithmetic exactly.
at::Tensor gram(const at::Tensor& x) { return at::matmul(x, x.mT()); }

// The same products written into caller-owned buffers (mm / bmm and addmm /
// baddbmm share their kernels with the allocating forms, so results are
// bitwise those of gram / addmm): the iteration allocates nothing.
void gram_into(at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) {
    at::mm_out(out, x, x.mT());
  } else {
    at::bmm_out(out, x, x.mT());
  }
}

// out = beta * c + alpha * (a @ b), batched or not, with alpha / beta fused
// into the GEMM (cuBLAS / BLAS epilogue), no temporary for the product.
void add_matmul_into(at::Tensor& out, const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta,
                     double alpha) {
  if (a.dim() == 2) {
    at::addmm_out(out, c, a, b, beta, alpha);
  } else {
    at::baddbmm_out(out, c, a, b, beta, alpha);
  }
}

}  // namespace

at::Tensor newton_schulz(const at::Tensor& input, const NewtonSchulzOptions& options) {
  check_newton_schulz_options("newton_schulz", options);
  TORCH_CHECK_VALUE(input.dim() >= 2, "newton_schulz: input must have at least 2 dims, got ", input.dim());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), "newton_schulz: input must be floating, got ",
                    input.scalar_type());
  if (input.dim() > 2 && input.device().is_cpu()) {
    // On the CPU, baddbmm rounds differently from addmm, and batching buys
    // little for matrices big enough to matter: iterate each matrix on the
    // 2-D path, so a result never depends on what it was batched with.
    const at::Tensor flat = input.reshape({-1, input.size(-2), input.size(-1)});
    std::vector<at::Tensor> outputs;
    outputs.reserve(static_cast<size_t>(flat.size(0)));
    for (int64_t i = 0; i < flat.size(0); ++i) {
      outputs.push_back(newton_schulz(flat.select(0, i), options));
    }
    const auto dtype = options.dtype.value_or(input.scalar_type());
    return outputs.empty() ? at::empty(input.sizes(), input.options().dtype(dtype))
                           : at::stack(outputs).reshape(input.sizes());
  }
  // One batch dim (or none) so the matmuls are addmm / baddbmm. The copy keeps
  // the caller's tensor untouched; the transpose stays a view, as in
  // torch.optim.Muon, so a single matrix follows its arithmetic exactly.
  at::Tensor x = input.dim() == 2 ? input : input.reshape({-1, input.size(-2), input.size(-1)});
  x = x.to(options.dtype.value_or(input.scalar_type()), /*non_blocking=*/false, /*copy=*/true);
  const bool transposed = x.size(-2) > x.size(-1);
  if (transposed) {
    x = x.mT();
  }
  if (x.numel() == 0) {
    return (transposed ? x.mT() : x).reshape(input.sizes());
  }

  // A prepared Gram for the first iteration, where the scaling produced one.
  std::optional<at::Tensor> first_gram;
  const std::vector<int64_t> matrix_dims{-2, -1};
  switch (options.normalization) {
    case NSNormalization::Frobenius: {
      at::Tensor norm = x.dim() == 2 ? x.norm() : at::linalg_vector_norm(x, 2, matrix_dims, /*keepdim=*/true);
      norm = options.eps_clamp ? norm.clamp_min(options.eps) : norm + options.eps;
      x.div_(norm);
      break;
    }
    case NSNormalization::Spectral: {
      // The SVD runs in fp32 at least (no bf16 LAPACK).
      const at::Tensor norm = at::linalg_matrix_norm(x.to(at::promote_types(x.scalar_type(), at::kFloat)), 2,
                                                     matrix_dims, /*keepdim=*/true);
      x.div_((norm + options.eps).to(x.scalar_type()));
      break;
    }
    case NSNormalization::AOL: {
      at::Tensor a = gram(x);
      const at::Tensor scale = a.abs().sum(-1, /*keepdim=*/true).clamp_min(options.eps).rsqrt();
      x.mul_(scale);
      first_gram = a.mul_(scale).mul_(scale.mT());
      break;
    }
    case NSNormalization::Schatten: {
      at::Tensor a = gram(x);
      const at::Tensor fro = a.dim() == 2 ? a.norm() : at::linalg_vector_norm(a, 2, matrix_dims, /*keepdim=*/true);
      const at::Tensor squared_norm = fro.clamp_min(options.eps);
      x.div_(squared_norm.sqrt());
      first_gram = a.div_(squared_norm);
      break;
    }
  }

  // Three buffers for the whole iteration (the Gram A, the polynomial B and
  // the next X, swapped with X each step): in the GEMM dtype (bf16 by
  // default), allocated once, so on CUDA an iteration is three cuBLAS calls
  // with their alpha / beta epilogues and nothing else.
  const auto& rows = options.coefficients;
  const int64_t small = x.size(-2);
  std::vector<int64_t> square_shape(x.sizes().begin(), x.sizes().end());
  square_shape.back() = small;
  at::Tensor gram_buffer = first_gram ? *first_gram : at::empty(square_shape, x.options());
  at::Tensor poly = at::empty(square_shape, x.options());
  at::Tensor next = at::empty(x.sizes(), x.options());
  for (int64_t i = 0; i < options.steps; ++i) {
    const auto& [a, b, c] = rows[std::min<size_t>(static_cast<size_t>(i), rows.size() - 1)];
    if (i > 0 || !first_gram) {
      gram_into(gram_buffer, x);
    }
    // B = b A + c A^2 ; X = a X + B X
    add_matmul_into(poly, gram_buffer, gram_buffer, gram_buffer, b, c);
    add_matmul_into(next, x, poly, x, a, 1.0);
    std::swap(x, next);
    if (!next.is_contiguous()) {
      next = at::empty(x.sizes(), x.options());  // the first X may be a transposed view: not a buffer to write
    }
  }
  if (transposed) {
    x = x.mT();
  }
  return x.reshape(input.sizes());
}

}  // namespace torchopt_ext::common
