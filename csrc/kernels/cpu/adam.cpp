// Fused CPU Adam/AdamW (classic.md §3), written in torch.optim's
// single-tensor operation order so results match it to rounding.
#include "kernels/cpu/adam.h"

#include <cmath>

#include "kernels/algos/adam.h"
#include "kernels/algos/adam_magma.h"
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

// The math is AdamMaskedAlgo's (kernels/algos/adam_magma.h, shared with the
// CUDA kernel); this adds the CPU loop's hooks: the scores live on the host,
// and after_norms turns the norms into the score and multiplier once per tensor.
struct AdamMagmaAlgo {
  static constexpr int kNumState = AdamMaskedAlgo::kNumState;
  static constexpr int kNumNorms = AdamMaskedAlgo::kNumNorms;
  using Hyper = AdamMagmaHyperparams;
  struct TensorScalars {
    double step;
    std::array<double, kNumNorms> norms;
    float* score;       // the tensor's magma_score (read, then written by after_norms)
    bool keep;          // this step's Bernoulli(p) draw
    double multiplier;  // keep * new score, set by after_norms
  };
  template <typename S>
  using Coeffs = AdamMaskedAlgo::Coeffs<S>;

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    return AdamMaskedAlgo::coeffs<S>(hp.adam, {t.step, t.multiplier});
  }

  template <typename V, typename S>
  static std::array<V, kNumNorms> norm_terms(const Coeffs<S>& c, V param, V grad,
                                             const std::array<V, kNumState>& state) {
    return AdamMaskedAlgo::norm_terms(c, param, grad, state);
  }

  static void after_norms(const Hyper& hp, TensorScalars& t) {
    const auto [g_norm, m_norm, diff_norm] = t.norms;
    const float score = magma_score_from_norms(g_norm, m_norm, diff_norm, *t.score, hp.tau);
    *t.score = score;
    t.multiplier = t.keep ? static_cast<double>(score) : 0.0;
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    AdamMaskedAlgo::update(c, param, grad, state);
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
