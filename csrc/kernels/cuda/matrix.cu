// CUDA apply of the matrix optimizers (kernels/cuda/matrix.h) and the CUDA
// registrations of their ops. The matrix functions (Newton-Schulz, PRISM's
// shaping, SOAP's projections and eigenbases) and the momenta are ATen ops in
// the functionals, device-generic; this kernel is the element-wise apply whose
// scalars (lr, step, Magma's keep * score) may live on the device.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "kernels/algos/adam_magma.h"
#include "kernels/algos/matrix_apply.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/matrix.h"
#include "torchopt_ext/functional/matrix_owner.h"
#include "torchopt_ext/functional/muon.h"
#include "torchopt_ext/functional/prism.h"
#include "torchopt_ext/functional/soap.h"

namespace torchopt_ext::kernels::cuda {
namespace {

constexpr int kApplyThreads = 512;

// Kernel arguments: device pointers (nullptr: the host value is used).
struct ApplyArgs {
  const void* lr;
  bool lr_is_double;
  double host_lr;
  const float* step;
  double host_step;
  const float* score;
  double magma_p;
  int64_t magma_seed;
  double weight_decay;
  double lr_scale;
  bool fixed;
  double decay;
  double alpha;
  bool stochastic_rounding;
  int64_t rounding_seed;
  int64_t index;
};

template <typename P>
__global__ void __launch_bounds__(kApplyThreads)
    matrix_apply_kernel(P* __restrict__ param, const at::opmath_type<P>* __restrict__ update, int64_t numel,
                        const ApplyArgs args) {
  using S = at::opmath_type<P>;
  // The factors once per block, in double as on the host.
  __shared__ S decay_shared;
  __shared__ S alpha_shared;
  __shared__ uint64_t stream_shared;
  if (threadIdx.x == 0) {
    const double step = args.step != nullptr ? static_cast<double>(*args.step) : args.host_step;
    double decay = args.decay;
    double alpha = args.alpha;
    if (!args.fixed) {
      double lr = args.host_lr;
      if (args.lr != nullptr) {
        lr = args.lr_is_double ? *static_cast<const double*>(args.lr)
                               : static_cast<double>(*static_cast<const float*>(args.lr));
      }
      double multiplier = 1.0;
      if (args.score != nullptr) {
        // The CPU's draw (common::magma_keep hashes the same way) times the fp32 score.
        multiplier =
            magma_keep_draw(args.magma_seed, args.index, step, args.magma_p) ? static_cast<double>(*args.score) : 0.0;
      }
      const MatrixApplyFactors f = matrix_apply_factors(lr, multiplier, args.weight_decay, args.lr_scale);
      decay = f.decay;
      alpha = f.alpha;
    }
    decay_shared = static_cast<S>(decay);
    alpha_shared = static_cast<S>(alpha);
    stream_shared = args.stochastic_rounding ? cpu::rounding_stream(args.rounding_seed, args.index, step) : 0;
  }
  __syncthreads();
  const S decay = decay_shared;
  const S alpha = alpha_shared;
  const uint64_t stream = stream_shared;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const S value = matrix_apply_value(static_cast<S>(param[i]), update[i], decay, alpha);
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (args.stochastic_rounding) {
        param[i] =
            cpu::round_bf16_stochastic(value, static_cast<uint32_t>(cpu::mix64(stream ^ static_cast<uint64_t>(i))));
        continue;
      }
    }
    param[i] = static_cast<P>(value);
  }
}

}  // namespace

void matrix_apply_update(const at::Tensor& param, const at::Tensor& update, const MatrixApplyScalars& s) {
  TORCH_CHECK(on_kernel_device(param) && param.is_contiguous() && param.numel() == update.numel(),
              "matrix_apply_update: param must be a contiguous CUDA tensor with the update's numel");
  const auto device = param.device();
  for (const auto* t : {&s.lr_device, &s.step_device, &s.magma_score}) {
    TORCH_CHECK(!t->defined() || (t->device() == device && t->numel() == 1),
                "matrix_apply_update: device scalars must be one-element tensors on ", device);
  }
  TORCH_CHECK(!s.step_device.defined() || s.step_device.scalar_type() == at::kFloat,
              "matrix_apply_update: step counters on the device must be float32");
  TORCH_CHECK(!s.magma_score.defined() || s.magma_score.scalar_type() == at::kFloat,
              "matrix_apply_update: magma scores must be float32");
  TORCH_CHECK(
      !s.lr_device.defined() || s.lr_device.scalar_type() == at::kFloat || s.lr_device.scalar_type() == at::kDouble,
      "matrix_apply_update: a device lr must be float32 or float64");
  const int64_t numel = param.numel();
  if (numel == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto math = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(update.scalar_type() == math && update.is_contiguous() && update.device() == device,
              "matrix_apply_update: the update must be a contiguous ", math, " tensor on ", device);
  const at::Tensor& u = update;
  const at::Tensor lr = s.lr_device.defined() ? s.lr_device.contiguous() : at::Tensor();
  ApplyArgs args{};
  args.lr = lr.defined() ? lr.data_ptr() : nullptr;
  args.lr_is_double = lr.defined() && lr.scalar_type() == at::kDouble;
  args.host_lr = s.lr;
  args.step = s.step_device.defined() ? s.step_device.data_ptr<float>() : nullptr;
  args.host_step = s.step;
  args.score = s.magma_score.defined() ? s.magma_score.data_ptr<float>() : nullptr;
  args.magma_p = s.magma_p;
  args.magma_seed = s.magma_seed;
  args.weight_decay = s.weight_decay;
  args.lr_scale = s.lr_scale;
  args.fixed = s.fixed;
  args.decay = s.decay;
  args.alpha = s.alpha;
  args.stochastic_rounding = s.stochastic_rounding;
  args.rounding_seed = s.rounding_seed;
  args.index = s.index;
  // A grid-stride loop over at most 4096 blocks (enough to fill an H100 several times over).
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((numel + kApplyThreads - 1) / kApplyThreads, 4096));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "matrix_apply_update", [&] {
    using S = at::opmath_type<scalar_t>;
    launch_kernel(matrix_apply_kernel<scalar_t>, blocks, kApplyThreads, stream, param.data_ptr<scalar_t>(),
                  u.const_data_ptr<S>(), numel, args);
  });
}

}  // namespace torchopt_ext::kernels::cuda

// The functionals validate, run the ATen parts on the params' device and call
// matrix_apply_update for CUDA params (see their CUDA branches).
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) {
  m.impl("muon_step_", &torchopt_ext::functional::muon_step_);
  m.impl("prism_step_", &torchopt_ext::functional::prism_step_);
  m.impl("prism_nadamw_step_", &torchopt_ext::functional::prism_nadamw_step_);
  m.impl("prism_shape", &torchopt_ext::functional::prism_shape);
  m.impl("muon_momentum_", &torchopt_ext::functional::muon_momentum_);
  m.impl("prism_momentum_", &torchopt_ext::functional::prism_momentum_);
  m.impl("matrix_apply_", &torchopt_ext::functional::matrix_apply_);
  m.impl("soap_step_", &torchopt_ext::functional::soap_step_);
}
