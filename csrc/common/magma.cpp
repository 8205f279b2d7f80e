#include "torchopt_ext/common/magma.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "kernels/algos/adam_magma.h"

namespace torchopt_ext::common {

namespace {

// s <- 0.9 s + 0.1 sigmoid(cos / tau); returns z * s.
at::Tensor score_update(const at::Tensor& raw_cosine, at::Tensor& score, bool keep, double tau) {
  const at::Tensor cosine = at::nan_to_num(raw_cosine).clamp(-1.0, 1.0);
  const at::Tensor smoothed = at::sigmoid(cosine / tau).to(at::kFloat);
  score.mul_(0.9).add_(smoothed, 0.1);
  return keep ? score.clone() : at::zeros_like(score);
}

}  // namespace

void check_magma_options(const char* op, const MagmaOptions& options) {
  TORCH_CHECK_VALUE(options.p >= 0.0 && options.p <= 1.0, op, ": magma_p must be in [0, 1], got ", options.p);
  TORCH_CHECK_VALUE(std::isfinite(options.tau) && options.tau > 0.0, op, ": magma_tau must be > 0, got ", options.tau);
}

// The hash is kernels::magma_keep_draw, which the CUDA kernels run on the
// device, so both draw the same masks.
bool magma_keep(const MagmaOptions& options, int64_t tensor_index, double step) {
  return kernels::magma_keep_draw(options.seed, tensor_index, step, options.p);
}

at::Tensor magma_multiplier(const at::Tensor& grad, const at::Tensor& moment, at::Tensor& score, bool keep,
                            double tau) {
  const auto math = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad.to(math).reshape(-1);
  const at::Tensor m = moment.to(math).reshape(-1);
  const at::Tensor denom = (g.norm() * m.norm()).clamp_min(1e-12);
  return score_update(at::dot(g, m) / denom, score, keep, tau);
}

at::Tensor magma_sums(const at::Tensor& grad, const at::Tensor& moment) {
  const at::Tensor g = grad.to(at::kDouble).reshape(-1);
  const at::Tensor m = moment.to(at::kDouble).reshape(-1);
  return at::stack({at::dot(g, m), at::dot(g, g), at::dot(m, m)});
}

at::Tensor magma_multiplier_from_sums(const at::Tensor& sums, at::Tensor& score, bool keep, double tau) {
  const at::Tensor s = sums.to(at::kDouble).reshape(-1);
  const at::Tensor denom = (s[1].sqrt() * s[2].sqrt()).clamp_min(1e-12);
  return score_update(s[0] / denom, score, keep, tau);
}

}  // namespace torchopt_ext::common
