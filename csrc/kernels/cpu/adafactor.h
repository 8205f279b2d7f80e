#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct AdafactorHyperparams {
  double lr;
  double beta2_decay;
  std::optional<double> eps1;  // nullopt: finfo(param dtype).eps, per param (torch)
  double eps2;
  double d;
  double weight_decay;
  std::optional<double> beta1;
  bool relative_step;
  bool scale_parameter;
  bool warmup_init;
  bool maximize;
};

// Per-param float64 statistics of a staged step (a sharded param's stages
// run on its local shard; the caller sums these across the shard group
// between stages, so the totals are the whole tensor's). Layout:
//   [numel, ||theta||^2, sum U^2]                                 dim < 2
//   [numel, ||theta||^2, sum U^2, rows, row_var sums (B), column sums of g^2 (B x C)]
// for a factored param with B = prod(shape[:-2]) matrices of C columns.
// Counts are stored as doubles so a sum across shards gives the whole
// tensor's numel / rows (exact below 2^53).
constexpr int64_t kAdafactorStatNumel = 0;
constexpr int64_t kAdafactorStatThetaSq = 1;
constexpr int64_t kAdafactorStatUpdateSq = 2;
constexpr int64_t kAdafactorStatRows = 3;
constexpr int64_t kAdafactorStatRowVarSums = 4;

// The length of `param`'s statistics buffer.
int64_t adafactor_stats_size(const at::Tensor& param);

// Fused CPU Adafactor (classic.md §8, torch.optim.Adafactor's math) over one
// param group of contiguous tensors. Params with dim >= 2 are factored over
// their last two dims and take the next entries of row_vars / col_vars (in
// param order); the others take the next entry of variances. exp_avgs is
// empty, or one per param when beta1 is set. Three passes per tensor:
// ||theta|| with the row/col sums of g^2 (one read of g), then RMS(U), then
// the update; every sum is reduced in a fixed order, so results do not depend
// on the thread count.
void adafactor_step(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                    at::TensorList variances, at::TensorList exp_avgs, const std::vector<double>& steps,
                    const AdafactorHyperparams& hp, const ElementwiseOptions& options);

// adafactor_step split where it needs whole-tensor sums:
// kSums: pass 1 (grad unscaling with options.grad_scale), the new row EMA;
//   fills every stats entry except sum U^2 (the front end then sums counts,
//   ||theta||^2 and, for row-sharded matrices, rows, row_var sums and
//   column sums across shards);
// kUpdateRms: the new column EMA (unfactored: the new variance) and sum U^2;
// kApply: the clip and the update.
// Run back to back on unreduced stats this is adafactor_step bit for bit.
enum class AdafactorStage { kSums = 1, kUpdateRms = 2, kApply = 3 };
void adafactor_stage(AdafactorStage stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                     at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                     const std::vector<double>& steps, at::TensorList stats, const AdafactorHyperparams& hp,
                     const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
