#include "torchopt_ext/hessian.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

namespace torchopt_ext::hessian {
namespace {

at::ScalarType estimate_dtype(const at::Tensor& param) {
  const auto t = param.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

void check_params(const char* fn, const std::vector<at::Tensor>& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].defined() && params[i].requires_grad(), fn, ": params[", i,
                      "] must be a defined tensor that requires grad");
    TORCH_CHECK_VALUE(params[i].is_floating_point(), fn, ": params[", i, "] must be floating, got ",
                      params[i].scalar_type());
  }
}

}  // namespace

std::vector<at::Tensor> sample_probes(const std::vector<at::Tensor>& params,
                                      const std::optional<at::Generator>& generator, const std::string& distribution) {
  TORCH_CHECK_VALUE(distribution == "rademacher" || distribution == "gaussian",
                    "sample_probes: distribution must be \"rademacher\" or \"gaussian\", got \"", distribution, "\"");
  std::vector<at::Tensor> probes;
  probes.reserve(params.size());
  for (const auto& p : params) {
    // Drawn on the CPU so a seeded generator gives the same probes everywhere.
    const auto options = at::TensorOptions().dtype(p.scalar_type()).device(at::kCPU);
    at::Tensor z = distribution == "rademacher"
                       ? at::randint(0, 2, p.sizes(), generator, options.dtype(at::kLong)).mul_(2).sub_(1)
                       : at::randn(p.sizes(), generator, options);
    probes.push_back(z.to(p.device(), p.scalar_type()));
  }
  return probes;
}

std::vector<at::Tensor> hutchinson(const at::Tensor& loss, const std::vector<at::Tensor>& params,
                                   const std::optional<at::Generator>& generator, int64_t n_samples,
                                   const std::string& distribution) {
  constexpr const char* fn = "hutchinson";
  TORCH_CHECK_VALUE(n_samples >= 1, fn, ": n_samples must be >= 1, got ", n_samples);
  TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1 && loss.requires_grad(), fn,
                    ": loss must be a one-element tensor that requires grad (built with autograd on)");
  check_params(fn, params);
  at::AutoGradMode enable_grad(true);
  const auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                           /*allow_unused=*/true);
  // Only gradients that still depend on the params carry a Hessian term.
  std::vector<size_t> live;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined() && grads[i].requires_grad()) {
      live.push_back(i);
    }
  }
  std::vector<at::Tensor> estimates;
  for (const auto& p : params) {
    estimates.push_back(at::zeros(p.sizes(), p.options().dtype(estimate_dtype(p))));
  }
  for (int64_t s = 0; s < n_samples; ++s) {
    const auto probes = sample_probes(params, generator, distribution);
    if (live.empty()) {
      continue;
    }
    std::vector<at::Tensor> outputs, grad_outputs;
    for (auto i : live) {
      outputs.push_back(grads[i]);
      grad_outputs.push_back(probes[i]);
    }
    const auto hz = torch::autograd::grad(outputs, params, grad_outputs, /*retain_graph=*/s + 1 < n_samples,
                                          /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < params.size(); ++i) {
      if (hz[i].defined()) {
        const auto dtype = estimates[i].scalar_type();
        estimates[i].add_(probes[i].to(dtype) * hz[i].detach().to(dtype));
      }
    }
  }
  if (n_samples > 1) {
    for (auto& e : estimates) {
      e.div_(static_cast<double>(n_samples));
    }
  }
  return estimates;
}

std::vector<at::Tensor> gauss_newton_bartlett(const at::Tensor& logits, const std::vector<at::Tensor>& params,
                                              const std::optional<at::Generator>& generator) {
  constexpr const char* fn = "gauss_newton_bartlett";
  TORCH_CHECK_VALUE(logits.defined() && logits.dim() >= 1 && logits.size(-1) >= 1 && logits.numel() > 0, fn,
                    ": logits must be a non-empty tensor of shape (..., C)");
  TORCH_CHECK_VALUE(logits.is_floating_point() && logits.requires_grad(), fn,
                    ": logits must be floating and require grad (built with autograd on)");
  check_params(fn, params);
  at::AutoGradMode enable_grad(true);
  const int64_t classes = logits.size(-1);
  const int64_t tokens = logits.numel() / classes;
  const auto flat = logits.reshape({tokens, classes});
  at::Tensor labels;
  {
    at::NoGradGuard no_grad;
    // Sampled on the CPU in float32 (softmax of reduced-precision logits
    // would round the probabilities) so a seeded generator is reproducible.
    const auto probs = at::softmax(flat.detach().to(at::kCPU, at::kFloat), -1);
    labels = at::multinomial(probs, 1, /*replacement=*/true, generator).squeeze(-1).to(logits.device());
  }
  const auto loss = at::cross_entropy_loss(flat, labels);
  const auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/false, /*create_graph=*/false,
                                           /*allow_unused=*/true);
  std::vector<at::Tensor> estimates;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto dtype = estimate_dtype(params[i]);
    if (!grads[i].defined()) {
      estimates.push_back(at::zeros(params[i].sizes(), params[i].options().dtype(dtype)));
      continue;
    }
    const auto g = grads[i].detach().to(dtype);
    estimates.push_back(g * g * static_cast<double>(tokens));
  }
  return estimates;
}

}  // namespace torchopt_ext::hessian
