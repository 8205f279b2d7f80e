// The float64 Gaussian draws of white_kron_step_ (functional/white_kron.h
// lists their order). Kept apart from white_kron.h so that header stays as
// the umbrella header includes it.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace torchopt_ext::functional {

// Standard normal float64 draws, bitwise at::randn(shape, gen, kDouble) on a
// CPU generator (ATen's normal fill: the uniforms in order from the
// generator, then Box-Muller within blocks of 16), with the transform (log,
// sqrt, cos, sin: most of the cost) spread over the intra-op threads. Sizes
// that are not a multiple of 16 take at::randn itself.
at::Tensor white_kron_randn(at::Generator& gen, at::IntArrayRef shape);

}  // namespace torchopt_ext::functional
