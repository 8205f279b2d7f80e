// Host-side entry points of the CUDA element-wise kernels (defined in the .cu
// files next to this header, built only with TORCHOPT_EXT_WITH_CUDA), and the
// switch the functional layer uses to pick the CPU or the CUDA kernel. Each
// takes the CPU kernel's arguments plus the scalars read on the device.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "common/tensor_lists.h"
#include "kernels/cpu/adam.h"
#include "kernels/cpu/elementwise_options.h"
#include "kernels/cpu/lamb.h"
#include "kernels/cpu/lion.h"
#include "kernels/cpu/mars.h"
#include "kernels/cpu/nadam.h"
#include "kernels/cpu/qhadam.h"
#include "kernels/cpu/radam.h"
#include "kernels/cpu/schedulefree.h"
#include "kernels/cpu/sgd.h"
#include "kernels/cpu/sophia.h"

#if defined(TORCHOPT_EXT_WITH_CUDA)
namespace torchopt_ext::kernels::cuda {

using common::DeviceArgs;
using cpu::ElementwiseOptions;

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const cpu::AdamHyperparams& hp,
               const ElementwiseOptions& options, const DeviceArgs& device);
void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const cpu::NAdamHyperparams& hp,
                const ElementwiseOptions& options, const DeviceArgs& device);
void radam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<double>& steps, const cpu::RAdamHyperparams& hp, const ElementwiseOptions& options,
                const DeviceArgs& device);
void qhadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 const std::vector<double>& steps, const cpu::QHAdamHyperparams& hp, const ElementwiseOptions& options,
                 const DeviceArgs& device);
void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const cpu::SGDHyperparams& hp, const ElementwiseOptions& options,
              const DeviceArgs& device);
void lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const std::vector<double>& steps,
               const cpu::LionHyperparams& hp, const ElementwiseOptions& options, const DeviceArgs& device);
void sophia_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList hessians,
                 const std::vector<double>& steps, const cpu::SophiaHyperparams& hp, const ElementwiseOptions& options,
                 const DeviceArgs& device);
// h <- beta2 h + (1 - beta2) estimate over contiguous CUDA lists of one dtype.
void sophia_update_hessian(at::TensorList hessians, at::TensorList estimates, double beta2);
// LAMB / MARS (lamb_mars.cu): a per-tensor norm reduction into a device
// buffer, then the update reading it; norm_sqs (defined) replaces the reduction.
void lamb_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               const std::vector<double>& steps, const cpu::LAMBHyperparams& hp, const ElementwiseOptions& options,
               const at::Tensor& norm_sqs, const DeviceArgs& device);
void lamb_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const std::vector<double>& steps, const cpu::LAMBHyperparams& hp, const ElementwiseOptions& options,
                   const at::Tensor& out, const DeviceArgs& device);
void mars_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
               const cpu::MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& norm_sqs,
               const DeviceArgs& device);
void mars_norm_sqs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList last_grads, const std::vector<double>& steps,
                   const cpu::MARSHyperparams& hp, const ElementwiseOptions& options, const at::Tensor& out,
                   const DeviceArgs& device);

// Schedule-Free (schedulefree.cu). With CUDA step counters (device.steps),
// weight_sums / lr_maxes are float64 scalars on the params' device that a
// pre-kernel advances (kernels::schedulefree_advance) before the update, and
// `scalars` is unused; with host counters `scalars` holds the host-computed
// values. `lr` is the host lr (device.lr, when defined, is read instead).
void schedulefree_adamw_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList exp_avg_sqs,
                             at::TensorList weight_sums, at::TensorList lr_maxes,
                             const std::vector<cpu::ScheduleFreeScalars>& scalars, const std::vector<double>& steps,
                             const cpu::ScheduleFreeAdamWHyperparams& hp, const cpu::ScheduleFreeWeighting& weighting,
                             double lr, const ElementwiseOptions& options, const DeviceArgs& device);
void schedulefree_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList zs, at::TensorList weight_sums,
                           at::TensorList lr_maxes, const std::vector<cpu::ScheduleFreeScalars>& scalars,
                           const std::vector<double>& steps, const cpu::ScheduleFreeSGDHyperparams& hp,
                           const cpu::ScheduleFreeWeighting& weighting, double lr, const ElementwiseOptions& options,
                           const DeviceArgs& device);
// The (param, z) passes of kernels/cpu/schedulefree.h on contiguous CUDA lists.
void schedulefree_lerp_to_z(at::TensorList params, at::TensorList zs, double weight);
void schedulefree_wrapper_pre(at::TensorList params, at::TensorList zs, double beta, double decay);
void schedulefree_wrapper_post(at::TensorList params, at::TensorList zs, double c, double beta);

// Adam/AdamW with Magma (adam_magma.cu): the per-tensor cosine pre-pass, the
// score update and the keep/drop draw (the CPU's counter hash of seed, tensor
// index and step) run on the device; magma_scores are float32 scalars on the
// params' device.
void adam_magma_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList scores, const std::vector<double>& steps,
                     const cpu::AdamMagmaHyperparams& hp, double magma_p, const ElementwiseOptions& options,
                     const DeviceArgs& device);

}  // namespace torchopt_ext::kernels::cuda

// kernels::cpu::name(args...) for a CPU group, kernels::cuda::name(args..., group.device) for a CUDA one.
#define TORCHOPT_EXT_RUN_ELEMENTWISE(group, name, ...)                                \
  ((group).on_cuda ? ::torchopt_ext::kernels::cuda::name(__VA_ARGS__, (group).device) \
                   : ::torchopt_ext::kernels::cpu::name(__VA_ARGS__))
#else
#define TORCHOPT_EXT_RUN_ELEMENTWISE(group, name, ...) ::torchopt_ext::kernels::cpu::name(__VA_ARGS__)
#endif
