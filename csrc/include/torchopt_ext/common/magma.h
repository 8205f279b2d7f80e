// Magma update masking (Joo et al., rollfast.md §5), written once for every
// optimizer that offers `use_magma`: per tensor, a smoothed score
// s <- 0.9 s + 0.1 sigmoid(cos(g, m) / tau) and a Bernoulli(p) keep/drop
// draw; the tensor's update (weight decay folded in) is scaled by z * s.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchopt_ext::common {

struct MagmaOptions {
  double p = 0.5;    // keep probability, in [0, 1]
  double tau = 2.0;  // cosine temperature, > 0
  int64_t seed = 0;
};

// XOR-ed into the seed of a matrix optimizer's AdamW fallback (Muon, PRISM)
// when Magma is on, so its draws, keyed by tensor index within one op call,
// are independent of the matrix branch's. Python: MAGMA_FALLBACK_SEED_SALT.
constexpr int64_t kMagmaFallbackSeedSalt = 0x2545F4914F6CDD1D;

// Errors name `op` and the option (magma_p, magma_tau).
void check_magma_options(const char* op, const MagmaOptions& options);

// The Bernoulli(p) draw of tensor `tensor_index` at step `step`: a
// counter-based hash of (seed, tensor, step), so runs with one seed, and all
// ranks of a distributed job, draw the same masks with no generator state to
// carry or synchronize.
bool magma_keep(const MagmaOptions& options, int64_t tensor_index, double step);

// Updates `score` (a 0-d float32 tensor, 0.5 before the first step) from the
// cosine between `grad` (raw) and `moment` (after this step's update, without
// bias correction) and returns the update multiplier z * s as a 0-d float32
// tensor (no host sync). cos = clip(nan_to_num(<g, m> / max(|g| |m|, 1e-12)), -1, 1),
// computed in fp32 (fp64 for fp64 inputs).
at::Tensor magma_multiplier(const at::Tensor& grad, const at::Tensor& moment, at::Tensor& score, bool keep, double tau);

// The cosine's inputs as sums that add over shards: [<g, m>, |g|^2, |m|^2]
// (float64, shape (3,)), and the multiplier from such sums (the same cosine,
// score update and draw; a shard-summed cosine differs from the whole-tensor
// fp32 one by rounding only).
at::Tensor magma_sums(const at::Tensor& grad, const at::Tensor& moment);
at::Tensor magma_multiplier_from_sums(const at::Tensor& sums, at::Tensor& score, bool keep, double tau);

}  // namespace torchopt_ext::common
