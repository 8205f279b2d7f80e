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

// param <- param * decay + alpha * update in the param's dtype (fp32 math and
// the store kernel of the param's device for bf16 / fp16); the decay pass is
// skipped when decay is 1 (x * 1 is x).
inline void apply_update(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                         bool stochastic_rounding, uint64_t rounding_stream) {
  if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
    apply_update_reduced(param, update, decay, alpha, stochastic_rounding, rounding_stream);
    return;
  }
  if (decay != 1.0) {
    param.mul_(decay);
  }
  param.add_(update.to(param.scalar_type()), alpha);
}

// Kron's Magma: the multiplier m (0-d, from common::magma_multiplier) is a
// tensor on the param's device, so the step's coefficients are computed
// there as two float64 values, decay = 1 - lr m wd and alpha = -lr m, in the
// host formula's order of operations (bitwise the doubles it gives for
// m.item()).
inline at::Tensor scaled_update_coefficients(const at::Tensor& multiplier, double lr, double weight_decay) {
  const at::Tensor lr_m = multiplier.to(at::kDouble).reshape({}).mul(lr);
  return at::stack({at::rsub(lr_m.mul(weight_decay), 1.0), lr_m.neg()});
}

// apply_update with (decay, alpha) = `coefficients` on the param's device.
// CPU: read and applied as host values (no sync; bitwise apply_update). CUDA:
// kept on the device (no sync): bf16 / fp16 params through the store kernel
// reading them there, fp32 / fp64 as 0-d tensor operands (the products may
// round differently from add_'s alpha, by an ulp).
inline void apply_update_device_coefficients(const at::Tensor& param, const at::Tensor& update,
                                             const at::Tensor& coefficients, bool stochastic_rounding,
                                             uint64_t rounding_stream) {
  if (!param.is_cuda()) {
    const at::Tensor host = coefficients.contiguous();
    const auto* c = host.const_data_ptr<double>();
    apply_update(param, update, c[0], c[1], stochastic_rounding, rounding_stream);
    return;
  }
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
    kernels::cuda::psgd_apply_update_reduced_device_coefficients(param, update, coefficients, stochastic_rounding,
                                                                 rounding_stream);
    return;
  }
#endif
  const at::Tensor typed = coefficients.to(param.scalar_type());
  param.mul_(typed[0]);
  param.addcmul_(update.to(param.scalar_type()), typed[1]);
}

// Host-drawn random numbers (the CPU generators the optimizers keep) moved
// to the device of `like`: the draws, and so the trajectories, are the same
// on both devices; on the CPU this is the tensor itself.
inline at::Tensor to_device_of(const at::Tensor& host, const at::Tensor& like) {
  return like.is_cpu() ? host : host.to(like.device(), /*non_blocking=*/false);
}

}  // namespace torchopt_ext::functional::psgd_device
