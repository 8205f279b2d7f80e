// Device handling shared by the PSGD-family steps (Kron, KronPSGD,
// WhiteKron). Their math is ATen ops (cuBLAS on CUDA); what is not ATen is
// the reduced-precision store, which has a CPU kernel and a CUDA kernel.
// Their per-param coefficients (update gate, warm-up beta, rounding streams,
// decay) are host values, so a CUDA group takes a host lr and host step
// counters (what the Python classes create): reading those is no device sync.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/tensor_lists.h"
#include "kernels/cpu/muon.h"
#include "kernels/cuda/psgd_store.h"

namespace torchopt_ext::functional::psgd_device {

// Before anything is touched: a CUDA group's lr and step counters must be
// host tensors (a CUDA lr or counter would need a sync per step to read).
inline void check_host_scalars(const char* op, at::TensorList params, const at::Tensor& lr,
                               at::TensorList state_steps) {
  if (params.empty() || !params[0].is_cuda()) {
    return;
  }
  TORCH_CHECK_VALUE(!lr.defined() || lr.is_cpu(), op,
                    ": lr must be a float or a CPU tensor for CUDA params (the step's coefficients are computed on "
                    "the host), got a tensor on ",
                    lr.device());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK_VALUE(!state_steps[i].defined() || state_steps[i].is_cpu(), op, ": state_steps[", i,
                      "] must be a CPU tensor (host step counters), got one on ", state_steps[i].device());
  }
}

// Divides the grads by GradScaler's scale: a host value, or a CUDA tensor
// divided on the device (no sync).
template <size_t N>
void unscale_grads_(common::DenseGroup<N>& group) {
  if (group.amp.grad_scale) {
    for (auto& grad : group.grads) {
      grad.div_(*group.amp.grad_scale);
    }
  } else if (group.device.grad_scale.defined()) {
    for (auto& grad : group.grads) {
      grad.div_(group.device.grad_scale);
    }
  }
}

// param <- param * decay + alpha * update in fp32 for bf16/fp16 storage
// (stochastic rounding for bf16 when asked), on the param's device.
inline void apply_update_reduced(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                                 bool stochastic_rounding, uint64_t rounding_stream) {
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (param.is_cuda()) {
    kernels::cuda::psgd_apply_update_reduced(param, update, decay, alpha, stochastic_rounding, rounding_stream);
    return;
  }
#endif
  kernels::cpu::muon_apply_update_reduced(param, update.to(at::kFloat).contiguous(), decay, alpha, stochastic_rounding,
                                          rounding_stream);
}

// Host-drawn random numbers (the CPU generators the optimizers keep) moved
// to the device of `like`: the draws, and so the trajectories, are the same
// on both devices; on the CPU this is the tensor itself.
inline at::Tensor to_device_of(const at::Tensor& host, const at::Tensor& like) {
  return like.is_cpu() ? host : host.to(like.device(), /*non_blocking=*/false);
}

}  // namespace torchopt_ext::functional::psgd_device
