// Diagonal Hessian estimators for Sophia (classic.md §12), built on
// torch::autograd::grad. Python twins: torchopt_ext.hessian.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace torchopt_ext::hessian {

// One probe per param: "rademacher" (+-1 with equal odds, drawn as
// randint(0, 2) * 2 - 1) or "gaussian" (standard normal), in the param's
// dtype, drawn in param order from `generator` (torch's default CPU generator
// when absent).
std::vector<at::Tensor> sample_probes(const std::vector<at::Tensor>& params,
                                      const std::optional<at::Generator>& generator = std::nullopt,
                                      const std::string& distribution = "rademacher");

// Hutchinson: mean over n_samples probes z of z * (H z), H the Hessian of the
// scalar `loss` (built with autograd on) w.r.t. `params`; H z by double
// backward. Params the loss does not depend on get zeros. Estimates are
// float32 for bfloat16/float16 params, else in the param dtype. Probes for
// sample s are drawn after those of sample s - 1 (sample_probes order).
std::vector<at::Tensor> hutchinson(const at::Tensor& loss, const std::vector<at::Tensor>& params,
                                   const std::optional<at::Generator>& generator = std::nullopt, int64_t n_samples = 1,
                                   const std::string& distribution = "rademacher");

// Gauss-Newton-Bartlett: labels y ~ Categorical(softmax(logits)) per row of
// `logits` (..., C), g = grad of mean cross_entropy(logits, y) w.r.t. params,
// estimate B * g * g with B = logits.numel() / C (the token count of the
// paper). Same dtype rule as hutchinson.
std::vector<at::Tensor> gauss_newton_bartlett(const at::Tensor& logits, const std::vector<at::Tensor>& params,
                                              const std::optional<at::Generator>& generator = std::nullopt);

}  // namespace torchopt_ext::hessian
