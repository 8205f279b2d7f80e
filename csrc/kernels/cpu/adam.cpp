// Fused CPU Adam/AdamW (classic.md §3), written in torch.optim's
// single-tensor operation order so results match it to rounding.
#include "kernels/cpu/adam.h"

#include <cmath>

#include "kernels/algos/adam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const AdamHyperparams& hp,
               const ElementwiseOptions& options) {
  std::vector<AdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<AdamAlgo>("adam_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, scalars, steps, hp,
                             options);
}

}  // namespace torchopt_ext::kernels::cpu

// Magma on Adam/AdamW. Kept apart from AdamAlgo (it only wraps it) so that
// use_magma=False runs the unchanged single-pass kernel.
namespace torchopt_ext::kernels::cpu {
namespace {

struct AdamMagmaAlgo {
  static constexpr int kNumState = AdamAlgo::kNumState;
  // |g|, |m|, |g - m| per tensor: <g, m> = (|g|^2 + |m|^2 - |g - m|^2) / 2,
  // so the dot product rides the existing sum-of-squares pre-pass.
  static constexpr int kNumNorms = 3;
  using Hyper = AdamMagmaHyperparams;
  struct TensorScalars {
    double step;
    std::array<double, kNumNorms> norms;
    float* score;       // the tensor's magma_score (read, then written by after_norms)
    bool keep;          // this step's Bernoulli(p) draw
    double multiplier;  // keep * new score, set by after_norms
  };
  template <typename S>
  using Coeffs = AdamAlgo::Coeffs<S>;

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    auto c = AdamAlgo::coeffs<S>(hp.adam, {t.step});
    // The decoupled decay is part of the masked update (rollfast folds the
    // decay into the update before masking), so it is scaled too.
    const double bias_correction1 = 1.0 - std::pow(hp.adam.beta1, t.step);
    c.decay_factor = static_cast<S>(1.0 - hp.adam.lr * hp.adam.weight_decay * t.multiplier);
    c.neg_step_size = static_cast<S>(-(hp.adam.lr / bias_correction1) * t.multiplier);
    return c;
  }

  // Read-only pass: the moment this step will store, from a copy of the state.
  template <typename V, typename S>
  static std::array<V, kNumNorms> norm_terms(const Coeffs<S>& c, V param, V grad,
                                             const std::array<V, kNumState>& state) {
    std::array<V, kNumState> next = state;
    const V g = c.maximize ? vneg(grad) : grad;
    AdamAlgo::update(c, param, grad, next);
    return {g, next[0], g - next[0]};
  }

  static void after_norms(const Hyper& hp, TensorScalars& t) {
    const auto [g_norm, m_norm, diff_norm] = t.norms;
    const double dot = 0.5 * (g_norm * g_norm + m_norm * m_norm - diff_norm * diff_norm);
    double cosine = dot / std::max(g_norm * m_norm, 1e-12);
    if (std::isnan(cosine)) {
      cosine = 0.0;  // nan_to_num; +-inf clip to +-1 below
    }
    cosine = std::clamp(cosine, -1.0, 1.0);
    const double smoothed = 1.0 / (1.0 + std::exp(-cosine / hp.tau));
    // fp32 state (rollfast's), the EMA evaluated in double and rounded once,
    // so the result does not depend on FMA contraction.
    const auto score = static_cast<float>(0.9 * static_cast<double>(*t.score) + 0.1 * smoothed);
    *t.score = score;
    t.multiplier = t.keep ? static_cast<double>(score) : 0.0;
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    AdamAlgo::update(c, param, grad, state);
  }
};

}  // namespace

void adam_magma_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList scores, const std::vector<bool>& keep,
                     const std::vector<double>& steps, const AdamMagmaHyperparams& hp,
                     const ElementwiseOptions& options) {
  std::vector<AdamMagmaAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i] = {steps[i], {0.0, 0.0, 0.0}, scores[i].data_ptr<float>(), static_cast<bool>(keep[i]), 1.0};
  }
  elementwise_step<AdamMagmaAlgo>("adam_magma_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, scalars,
                                  steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
