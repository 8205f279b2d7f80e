#include "torchopt_ext/common/newton_schulz.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>

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

// beta * c + alpha * (a @ b), batched or not.
at::Tensor add_matmul(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (a.dim() == 2) {
    return at::addmm(c, a, b, beta, alpha);
  }
  return at::baddbmm(c, a, b, beta, alpha);
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

  const auto& rows = options.coefficients;
  for (int64_t i = 0; i < options.steps; ++i) {
    const auto& [a, b, c] = rows[std::min<size_t>(static_cast<size_t>(i), rows.size() - 1)];
    at::Tensor g = (i == 0 && first_gram) ? *first_gram : gram(x);
    // B = b A + c A^2 ; X = a X + B X
    const at::Tensor poly = add_matmul(g, g, g, b, c);
    x = add_matmul(x, poly, x, a, 1.0);
  }
  if (transposed) {
    x = x.mT();
  }
  return x.reshape(input.sizes());
}

}  // namespace torchopt_ext::common
