// Fused CPU Adafactor in torch.optim.Adafactor's operation order (classic.md §8).
//
// Work items are row blocks of one matrix of a factored param (about
// kChunkNumel elements, at most kMaxBlocks per matrix so the per-block column
// sums stay small next to the matrix) or kChunkNumel-element chunks of an
// unfactored one; their shapes depend only on the param shapes,
// and every cross-item sum is added in item order, so the results do not
// depend on the thread count.
#include "kernels/cpu/adafactor.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/algos/adafactor.h"
#include "kernels/cpu/elementwise_apply.h"
#include "kernels/cpu/multi_tensor_apply.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cpu/vec_math.h"

namespace torchopt_ext::kernels::cpu {
namespace {

constexpr int64_t kRun = 1024;      // elements per math-type partial sum
constexpr int64_t kMaxBlocks = 32;  // row blocks per matrix: column partials <= 32 * cols doubles
constexpr int64_t kFlushRows = 64;  // rows summed in the math type before adding into double

// Item passes run over every item in parallel; tensor passes once per tensor.
enum class Pass {
  kAllocate,
  kNormsAndSums,   // items: ||theta||^2, row sums and block column sums of g^2
  kCollect,        // tensor: fills the stats (counts, sums, new row EMA)
  kColStats,       // tensor: new column EMA from the (reduced) column sums
  kFactors,        // tensor: alpha and the per-row / per-column factors
  kUpdateRms,      // items: sum of U^2 (unfactored: the new EMA)
  kCollectUpdate,  // tensor: sum of U^2 into the stats
  kClip,           // tensor: alpha / max(1, RMS(U) / d)
  kUpdate,         // items: the param update
};

struct Item {
  int64_t tensor;
  int64_t batch;  // factored: which matrix
  int64_t begin;  // factored: rows of that matrix; unfactored: elements
  int64_t end;
  int64_t slot;  // factored: index of this item's column partial sums
  double theta_sq = 0.0;
  double update_sq = 0.0;
};

struct TensorWork {
  void* param;
  void* grad;
  void* row_var = nullptr;
  void* col_var = nullptr;
  void* variance = nullptr;
  void* exp_avg = nullptr;
  bool factored;
  int64_t numel;
  int64_t batches = 1;
  int64_t rows = 0;
  int64_t cols = 0;
  double step;
  uint64_t rounding_stream;
  std::vector<Item*> items;  // this tensor's items, in order
  // Per-step scratch, filled by the passes.
  // The stats layout of adafactor.h: the caller's buffer (staged step) or
  // own_stats (fused step).
  double* stats = nullptr;
  std::vector<double> own_stats;
  std::vector<double> row_sums;      // factored: sum over each row of g^2
  std::vector<double> scratch;       // math-type buffers: row_var, col_var (as used), row means
  std::vector<double> col_partials;  // per item: its rows' column sums of g^2
  std::vector<char> fast;            // per matrix: the factored update splits per row and column
  double eps1 = 0.0;
  double alpha = 0.0;
  double update_scale = 0.0;  // alpha / max(1, RMS(U) / d)
};

struct Context {
  const AdafactorHyperparams& hp;
  const ElementwiseOptions& options;
};

template <typename S>
double horizontal_sum(const at::vec::Vectorized<S>& v) {
  alignas(64) S lanes[at::vec::Vectorized<S>::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < at::vec::Vectorized<S>::size(); ++l) {
    total += static_cast<double>(lanes[l]);
  }
  return total;
}

template <typename V>
V vrsqrt(const V& x) {
  return AdafactorMath::rsqrt(x);
}

template <typename P, typename St>
struct Kernel {
  using S = at::opmath_type<P>;
  using Vec = at::vec::Vectorized<S>;
  using ParamIO = LaneIO<P>;
  using StateIO = LaneIO<St>;
  static constexpr int64_t kWidth = ParamIO::kWidth;
  static_assert(ParamIO::kWidth == StateIO::kWidth, "param and state storage must share the math type");

  // Scratch layout (math type): row_var copy (B*R), col_var copy (B*C),
  // clamped row means (B).
  static S* row_copy(TensorWork& t) { return reinterpret_cast<S*>(t.scratch.data()); }
  static S* col_copy(TensorWork& t) { return row_copy(t) + t.batches * t.rows; }
  static S* row_means(TensorWork& t) { return col_copy(t) + t.batches * t.cols; }

  static void run(Pass pass, const Context& ctx, TensorWork& t, Item* item) {
    switch (pass) {
      case Pass::kAllocate:
        allocate(t);
        break;
      case Pass::kNormsAndSums:
        t.factored ? sums_factored(ctx, t, *item) : sums_flat(ctx, t, *item);
        break;
      case Pass::kCollect:
        collect(ctx, t);
        break;
      case Pass::kColStats:
        col_stats(ctx, t);
        break;
      case Pass::kFactors:
        factors(ctx, t);
        break;
      case Pass::kUpdateRms:
      case Pass::kUpdate:
        update(ctx, t, *item, pass == Pass::kUpdate);
        break;
      case Pass::kCollectUpdate: {
        double update_sq = 0.0;
        for (const Item* it : t.items) {
          update_sq += it->update_sq;
        }
        t.stats[kAdafactorStatUpdateSq] = update_sq;
        break;
      }
      case Pass::kClip:
        clip(ctx, t);
        break;
    }
  }

  static void allocate(TensorWork& t) {
    if (t.factored) {
      const int64_t count = t.batches * t.rows + t.batches * t.cols + t.batches;
      t.scratch.assign((count * static_cast<int64_t>(sizeof(S)) + 7) / 8, 0.0);
      t.col_partials.assign(static_cast<int64_t>(t.items.size()) * t.cols, 0.0);
      t.row_sums.assign(t.batches * t.rows, 0.0);
      t.fast.assign(t.batches, 0);
    }
  }

  // Reads a param/grad run, unscales (and writes back) the grads.
  static void load_pg(const Context& ctx, P* param, P* grad, int64_t i, Vec (&p)[2], Vec (&g)[2]) {
    ParamIO::load(param + i, p[0], p[1]);
    ParamIO::load(grad + i, g[0], g[1]);
    if (ctx.options.grad_scale) {
      const Vec scale(static_cast<S>(*ctx.options.grad_scale));
      g[0] = g[0] / scale;
      g[1] = g[1] / scale;
      ParamIO::store(grad + i, g[0], g[1]);
    }
  }

  static S load_g(const Context& ctx, P* grad, int64_t i) {
    S g = static_cast<S>(grad[i]);
    if (ctx.options.grad_scale) {
      g = g / static_cast<S>(*ctx.options.grad_scale);
      grad[i] = static_cast<P>(g);
    }
    return g;
  }

  // Pass 1, factored: ||theta||^2, the row sums and this block's column sums of g^2.
  static void sums_factored(const Context& ctx, TensorWork& t, Item& item) {
    P* param = static_cast<P*>(t.param);
    P* grad = static_cast<P*>(t.grad);
    const int64_t C = t.cols;
    // Column sums run in the math type for kFlushRows rows, then go into
    // this item's double partials: vector speed, bounded rounding.
    std::vector<S> colp(C, S(0));
    double* partial = t.col_partials.data() + item.slot * C;
    double theta_sq = 0.0;
    for (int64_t r = item.begin; r < item.end; ++r) {
      const int64_t row = item.batch * t.rows + r;
      const int64_t off = row * C;
      double row_sq = 0.0;
      int64_t c = 0;
      while (c + kWidth <= C) {
        Vec acc_p(S(0)), acc_g(S(0));
        const int64_t run_end = std::min(C, c + kRun);
        for (; c + kWidth <= run_end; c += kWidth) {
          Vec p[2], g[2];
          load_pg(ctx, param, grad, off + c, p, g);
          for (int h = 0; h < 2; ++h) {
            const Vec gg = g[h] * g[h];
            acc_p = acc_p + p[h] * p[h];
            acc_g = acc_g + gg;
            S* cp = colp.data() + c + h * Vec::size();
            (Vec::loadu(cp) + gg).store(cp);
          }
        }
        theta_sq += horizontal_sum(acc_p);
        row_sq += horizontal_sum(acc_g);
      }
      for (; c < C; ++c) {
        const S p = static_cast<S>(param[off + c]);
        const S g = load_g(ctx, grad, off + c);
        const S gg = g * g;
        theta_sq += static_cast<double>(p) * static_cast<double>(p);
        row_sq += static_cast<double>(gg);
        colp[c] += gg;
      }
      t.row_sums[row] = row_sq;
      if ((r - item.begin + 1) % kFlushRows == 0 || r + 1 == item.end) {
        for (int64_t k = 0; k < C; ++k) {
          partial[k] += static_cast<double>(colp[k]);
          colp[k] = S(0);
        }
      }
    }
    item.theta_sq = theta_sq;
  }

  // Pass 1, unfactored: ||theta||^2 (and the grad unscaling).
  static void sums_flat(const Context& ctx, TensorWork& t, Item& item) {
    P* param = static_cast<P*>(t.param);
    P* grad = static_cast<P*>(t.grad);
    double theta_sq = 0.0;
    int64_t i = item.begin;
    while (i + kWidth <= item.end) {
      Vec acc(S(0));
      const int64_t run_end = std::min(item.end, i + kRun);
      for (; i + kWidth <= run_end; i += kWidth) {
        Vec p[2], g[2];
        load_pg(ctx, param, grad, i, p, g);
        acc = acc + p[0] * p[0] + p[1] * p[1];
      }
      theta_sq += horizontal_sum(acc);
    }
    for (; i < item.end; ++i) {
      const S p = static_cast<S>(param[i]);
      load_g(ctx, grad, i);
      theta_sq += static_cast<double>(p) * static_cast<double>(p);
    }
    item.theta_sq = theta_sq;
  }

  static S beta2_weight(const Context& ctx, const TensorWork& t) {
    return static_cast<S>(std::pow(t.step, ctx.hp.beta2_decay));  // 1 - beta2_t
  }

  // After pass 1 (per tensor, O(rows + cols)): this tensor's counts and sums
  // into the stats, and the new row EMA (rows are whole on every shard).
  // Sums over items are added in item order.
  static void collect(const Context& ctx, TensorWork& t) {
    double* stats = t.stats;
    double theta_sq = 0.0;
    for (const Item* item : t.items) {
      theta_sq += item->theta_sq;
    }
    stats[kAdafactorStatNumel] = static_cast<double>(t.numel);
    stats[kAdafactorStatThetaSq] = theta_sq;
    stats[kAdafactorStatUpdateSq] = 0.0;
    if (!t.factored) {
      return;
    }
    const S weight = beta2_weight(ctx, t);
    const int64_t R = t.rows;
    const int64_t C = t.cols;
    St* row_var = static_cast<St*>(t.row_var);
    stats[kAdafactorStatRows] = static_cast<double>(R);
    double* row_var_sums = stats + kAdafactorStatRowVarSums;
    double* col_sums = row_var_sums + t.batches;
    for (int64_t b = 0; b < t.batches; ++b) {
      double row_var_sum = 0.0;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t k = b * R + r;
        const S mean = static_cast<S>(t.row_sums[k] / double(C));
        row_var[k] = static_cast<St>(vlerp(static_cast<S>(row_var[k]), mean, weight));
        row_var_sum += static_cast<double>(static_cast<S>(row_var[k]));
      }
      row_var_sums[b] = row_var_sum;
    }
    std::fill(col_sums, col_sums + t.batches * C, 0.0);
    for (const Item* item : t.items) {
      const double* partial = t.col_partials.data() + item->slot * C;
      double* sums = col_sums + item->batch * C;
      for (int64_t c = 0; c < C; ++c) {
        sums[c] += partial[c];
      }
    }
  }

  // The new column EMA from the column sums over all rows (stats, reduced
  // across shards by a staged caller).
  static void col_stats(const Context& ctx, TensorWork& t) {
    if (!t.factored) {
      return;
    }
    const S weight = beta2_weight(ctx, t);
    const double rows = t.stats[kAdafactorStatRows];
    const double* col_sums = t.stats + kAdafactorStatRowVarSums + t.batches;
    St* col_var = static_cast<St*>(t.col_var);
    for (int64_t k = 0; k < t.batches * t.cols; ++k) {
      const S mean = static_cast<S>(col_sums[k] / rows);
      col_var[k] = static_cast<St>(vlerp(static_cast<S>(col_var[k]), mean, weight));
    }
  }

  // Before passes 2 and 3: the step size from the whole-tensor ||theta||^2
  // and, factored, the update's row and column factors read back from the
  // stored EMAs with the clamped row mean.
  static void factors(const Context& ctx, TensorWork& t) {
    const auto& hp = ctx.hp;
    const double* stats = t.stats;
    t.eps1 = hp.eps1.value_or(static_cast<double>(std::numeric_limits<P>::epsilon()));
    // torch: param.norm(2).item() / numel ** 0.5, the norm in the math type.
    const double theta_norm = static_cast<double>(static_cast<S>(std::sqrt(stats[kAdafactorStatThetaSq])));
    t.alpha = AdafactorMath::alpha({hp.lr, hp.eps2, hp.relative_step, hp.warmup_init, hp.scale_parameter}, t.step,
                                   theta_norm, stats[kAdafactorStatNumel]);
    if (!t.factored) {
      return;
    }
    const int64_t R = t.rows;
    const int64_t C = t.cols;
    const St* row_var = static_cast<const St*>(t.row_var);
    const St* col_var = static_cast<const St*>(t.col_var);
    S* rows = row_copy(t);
    S* cols = col_copy(t);
    S* means = row_means(t);
    for (int64_t k = 0; k < t.batches * R; ++k) {
      rows[k] = static_cast<S>(row_var[k]);
    }
    for (int64_t k = 0; k < t.batches * C; ++k) {
      cols[k] = static_cast<S>(col_var[k]);
    }
    const double all_rows = stats[kAdafactorStatRows];
    for (int64_t b = 0; b < t.batches; ++b) {
      // torch: row_var.mean(dim=-2).clamp_(min=eps1), NaN kept.
      const S m = vmaximum(static_cast<S>(stats[kAdafactorStatRowVarSums + b] / all_rows), static_cast<S>(t.eps1));
      means[b] = m;
      // A finite positive mean (always, unless the grads held NaN/Inf or
      // eps1 = 0) lets the update split rsqrt(r c / m) per row and column;
      // otherwise the exact per-element form keeps torch's NaN/Inf results.
      t.fast[b] = std::isfinite(m) && m > S(0);
      if (t.fast[b]) {
        for (int64_t r = 0; r < R; ++r) {
          rows[b * R + r] = vrsqrt(rows[b * R + r] / m);
        }
        for (int64_t c = 0; c < C; ++c) {
          cols[b * C + c] = vrsqrt(cols[b * C + c]);
        }
      }
    }
  }

  // The update clip: alpha / max(1, RMS(U) / d), with torch's
  // update.norm(2).item() rounded to the math type.
  static void clip(const Context& ctx, TensorWork& t) {
    const double norm = static_cast<double>(static_cast<S>(std::sqrt(t.stats[kAdafactorStatUpdateSq])));
    t.update_scale = AdafactorMath::update_scale(t.alpha, norm, t.stats[kAdafactorStatNumel], ctx.hp.d);
  }

  // U = k * g with k = rsqrt(max(v, eps1^2)): v from the factors or the
  // unfactored EMA. Pass 2 sums U^2, pass 3 applies alpha/clip * U.
  template <typename V>
  static V inverse_root(const V& v, S eps1_sq) {
    return AdafactorMath::inverse_root(v, eps1_sq);
  }

  static AdafactorApplyCoeffs<S> apply_coeffs(const Context& ctx, const TensorWork& t) {
    const auto& hp = ctx.hp;
    const double beta1 = hp.beta1.value_or(0.0);
    return {static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(beta1),
            static_cast<S>(1.0 - beta1),
            static_cast<S>(t.update_scale),
            hp.weight_decay != 0.0,
            hp.maximize};
  }

  // Passes 2 and 3 over one item: `write` false sums U^2 (and, unfactored,
  // updates the EMA); true applies the update.
  static void update(const Context& ctx, TensorWork& t, Item& item, bool write) {
    P* param = static_cast<P*>(t.param);
    const P* grad = static_cast<const P*>(t.grad);
    St* exp_avg = static_cast<St*>(t.exp_avg);
    const S eps1_sq = static_cast<S>(t.eps1 * t.eps1);
    const AdafactorApplyCoeffs<S> coeffs = apply_coeffs(ctx, t);
    const bool stochastic = ctx.options.stochastic_rounding && ParamIO::kReduced;
    double update_sq = 0.0;

    // One contiguous span [begin, end); scale_vec / scale_scalar give k.
    auto span = [&](int64_t begin, int64_t end, auto&& scale_vec, auto&& scale_scalar) {
      int64_t i = begin;
      while (i + kWidth <= end) {
        Vec acc(S(0));
        const int64_t run_end = std::min(end, i + kRun);
        for (; i + kWidth <= run_end; i += kWidth) {
          Vec g[2], k[2];
          ParamIO::load(grad + i, g[0], g[1]);
          scale_vec(i, g, k);
          Vec u[2] = {k[0] * g[0], k[1] * g[1]};
          if (!write) {
            acc = acc + u[0] * u[0] + u[1] * u[1];
            continue;
          }
          Vec p[2], m[2];
          ParamIO::load(param + i, p[0], p[1]);
          if (exp_avg) {
            StateIO::load(exp_avg + i, m[0], m[1]);
          }
          for (int h = 0; h < 2; ++h) {
            AdafactorMath::apply(coeffs, p[h], u[h], exp_avg ? &m[h] : nullptr);
          }
          if (exp_avg) {
            StateIO::store(exp_avg + i, m[0], m[1]);
          }
          if (stochastic) {
            alignas(64) S values[kWidth];
            p[0].store(values);
            p[1].store(values + Vec::size());
            store_stochastic(param + i, values, kWidth, t.rounding_stream, i);
          } else {
            ParamIO::store(param + i, p[0], p[1]);
          }
        }
        update_sq += horizontal_sum(acc);
      }
      for (; i < end; ++i) {
        const S g = static_cast<S>(grad[i]);
        const S u = scale_scalar(i, g) * g;
        if (!write) {
          update_sq += static_cast<double>(u) * static_cast<double>(u);
          continue;
        }
        S p = static_cast<S>(param[i]);
        S m = exp_avg ? static_cast<S>(exp_avg[i]) : S(0);
        AdafactorMath::apply(coeffs, p, u, exp_avg ? &m : nullptr);
        if (exp_avg) {
          exp_avg[i] = static_cast<St>(m);
        }
        if (stochastic) {
          store_stochastic(param + i, &p, 1, t.rounding_stream, i);
        } else {
          param[i] = static_cast<P>(p);
        }
      }
    };

    if (t.factored && t.fast[item.batch]) {
      // rsqrt(max(r c / m, eps1^2)) = min(rsqrt(r / m) rsqrt(c), 1 / eps1): the
      // stats pass left rsqrt(r / m) and rsqrt(c) in the copies, so no
      // per-element division or square root (a few ulps from torch's order).
      const int64_t C = t.cols;
      const S* cols = col_copy(t) + item.batch * C;
      const S cap = vrsqrt(eps1_sq);
      for (int64_t r = item.begin; r < item.end; ++r) {
        const int64_t row = item.batch * t.rows + r;
        const int64_t off = row * C;
        const Vec a(row_copy(t)[row]);
        span(
            off, off + C,
            [&](int64_t i, const Vec(&)[2], Vec(&k)[2]) {
              const S* c = cols + (i - off);
              k[0] = AdafactorMath::factored_scale(a, Vec::loadu(c), cap);
              k[1] = AdafactorMath::factored_scale(a, Vec::loadu(c + Vec::size()), cap);
            },
            [&](int64_t i, S) { return AdafactorMath::factored_scale(row_copy(t)[row], cols[i - off], cap); });
      }
    } else if (t.factored) {
      const int64_t C = t.cols;
      const S* cols = col_copy(t) + item.batch * C;
      const Vec mean(row_means(t)[item.batch]);
      for (int64_t r = item.begin; r < item.end; ++r) {
        const int64_t row = item.batch * t.rows + r;
        const int64_t off = row * C;
        const S row_value = row_copy(t)[row];
        // torch: (row_var @ col_var) / clamped mean, then the eps1^2 clamp.
        span(
            off, off + C,
            [&](int64_t i, const Vec(&)[2], Vec(&k)[2]) {
              const S* c = cols + (i - off);
              k[0] = AdafactorMath::factored_scale_exact(Vec(row_value), Vec::loadu(c), mean, eps1_sq);
              k[1] = AdafactorMath::factored_scale_exact(Vec(row_value), Vec::loadu(c + Vec::size()), mean, eps1_sq);
            },
            [&](int64_t i, S) {
              return AdafactorMath::factored_scale_exact(row_value, cols[i - off], row_means(t)[item.batch], eps1_sq);
            });
      }
    } else {
      St* variance = static_cast<St*>(t.variance);
      const S weight = static_cast<S>(std::pow(t.step, ctx.hp.beta2_decay));
      // Pass 2 writes the new EMA; both passes use the stored (rounded) value.
      span(
          item.begin, item.end,
          [&](int64_t i, const Vec(&g)[2], Vec(&k)[2]) {
            Vec v[2];
            StateIO::load(variance + i, v[0], v[1]);
            if (!write) {
              v[0] = vlerp(v[0], g[0] * g[0], weight);
              v[1] = vlerp(v[1], g[1] * g[1], weight);
              StateIO::store(variance + i, v[0], v[1]);
              StateIO::load(variance + i, v[0], v[1]);
            }
            k[0] = inverse_root(v[0], eps1_sq);
            k[1] = inverse_root(v[1], eps1_sq);
          },
          [&](int64_t i, S g) {
            if (!write) {
              variance[i] = static_cast<St>(vlerp(static_cast<S>(variance[i]), g * g, weight));
            }
            return inverse_root(static_cast<S>(variance[i]), eps1_sq);
          });
    }
    item.update_sq = update_sq;
  }
};

using RunFn = void (*)(Pass, const Context&, TensorWork&, Item*);

// Which tensors a tensor pass visits: those with local elements (fused step:
// an empty tensor is skipped), every tensor (a staged step's counts, zeros
// for an empty shard), or those whose whole tensor has elements (the reduced
// count: an empty shard still updates its replicated column EMA).
enum class Scope { kItems, kLocal, kAll, kWhole };

struct Phase {
  Scope scope;
  std::vector<Pass> passes;
};

void run_phases(const std::vector<Phase>& phases, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                const std::vector<double>& steps, at::TensorList stats, const AdafactorHyperparams& hp,
                const ElementwiseOptions& options) {
  constexpr const char* op = "adafactor_step_";
  const auto n = params.size();
  const bool staged = !stats.empty();
  std::vector<TensorWork> work(n);
  std::vector<RunFn> fns(n);
  std::vector<Item> items;
  std::vector<int64_t> first_item(n + 1, 0);
  size_t factored_index = 0;
  size_t flat_index = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    auto& t = work[i];
    t.param = p.data_ptr();
    t.grad = grads[i].data_ptr();
    t.factored = p.dim() >= 2;
    t.numel = p.numel();
    t.step = steps[i];
    t.rounding_stream = rounding_stream(options.seed, static_cast<int64_t>(i), steps[i]);
    at::ScalarType state_type;
    if (t.factored) {
      t.rows = p.size(-2);
      t.cols = p.size(-1);
      t.batches = 1;
      for (int64_t d = 0; d + 2 < p.dim(); ++d) {
        t.batches *= p.size(d);
      }
      t.row_var = row_vars[factored_index].data_ptr();
      t.col_var = col_vars[factored_index].data_ptr();
      state_type = row_vars[factored_index].scalar_type();
      ++factored_index;
    } else {
      t.variance = variances[flat_index].data_ptr();
      state_type = variances[flat_index].scalar_type();
      ++flat_index;
    }
    if (!exp_avgs.empty()) {
      t.exp_avg = exp_avgs[i].data_ptr();
    }
    if (staged) {
      t.stats = stats[i].data_ptr<double>();
    } else {
      t.own_stats.assign(adafactor_stats_size(p), 0.0);
      t.stats = t.own_stats.data();
    }
    fns[i] = select_kernel(op, p.scalar_type(), state_type,
                           [](auto p, auto s) { return &Kernel<decltype(p), decltype(s)>::run; });
    first_item[i] = static_cast<int64_t>(items.size());
    if (t.numel == 0) {
      continue;  // nothing to update; the step still counts
    }
    if (t.factored) {
      const int64_t by_size = (kChunkNumel + t.cols - 1) / t.cols;
      const int64_t by_count = (t.rows + kMaxBlocks - 1) / kMaxBlocks;
      const int64_t block = std::clamp<int64_t>(std::max(by_size, by_count), 1, t.rows);
      int64_t slot = 0;
      for (int64_t b = 0; b < t.batches; ++b) {
        for (int64_t r = 0; r < t.rows; r += block) {
          items.push_back({static_cast<int64_t>(i), b, r, std::min(t.rows, r + block), slot++});
        }
      }
    } else {
      for (int64_t e = 0; e < t.numel; e += kChunkNumel) {
        items.push_back({static_cast<int64_t>(i), 0, e, std::min(t.numel, e + kChunkNumel), 0});
      }
    }
  }
  first_item[n] = static_cast<int64_t>(items.size());
  for (size_t i = 0; i < n; ++i) {
    for (int64_t k = first_item[i]; k < first_item[i + 1]; ++k) {
      work[i].items.push_back(&items[k]);
    }
  }
  const Context ctx{hp, options};
  for (const Phase& phase : phases) {
    if (phase.scope == Scope::kItems) {
      const Pass pass = phase.passes.front();
      at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          auto& item = items[k];
          fns[item.tensor](pass, ctx, work[item.tensor], &item);
        }
      });
      continue;
    }
    at::parallel_for(0, static_cast<int64_t>(n), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        auto& t = work[i];
        const bool visit = phase.scope == Scope::kAll || (phase.scope == Scope::kLocal && !t.items.empty()) ||
                           (phase.scope == Scope::kWhole && t.stats[kAdafactorStatNumel] > 0.0);
        if (!visit) {
          continue;
        }
        for (const Pass pass : phase.passes) {
          fns[i](pass, ctx, t, nullptr);
        }
      }
    });
  }
}

}  // namespace

int64_t adafactor_stats_size(const at::Tensor& param) {
  if (param.dim() < 2) {
    return kAdafactorStatRows;
  }
  int64_t batches = 1;
  for (int64_t d = 0; d + 2 < param.dim(); ++d) {
    batches *= param.size(d);
  }
  return kAdafactorStatRowVarSums + batches + batches * param.size(-1);
}

void adafactor_step(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                    at::TensorList variances, at::TensorList exp_avgs, const std::vector<double>& steps,
                    const AdafactorHyperparams& hp, const ElementwiseOptions& options) {
  // The three stages back to back, with this process's sums as the totals.
  static const std::vector<Phase> phases = {
      {Scope::kLocal, {Pass::kAllocate}},
      {Scope::kItems, {Pass::kNormsAndSums}},
      {Scope::kLocal, {Pass::kCollect, Pass::kColStats, Pass::kFactors}},
      {Scope::kItems, {Pass::kUpdateRms}},
      {Scope::kLocal, {Pass::kCollectUpdate, Pass::kClip}},
      {Scope::kItems, {Pass::kUpdate}},
  };
  run_phases(phases, params, grads, row_vars, col_vars, variances, exp_avgs, steps, {}, hp, options);
}

void adafactor_stage(AdafactorStage stage, at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                     at::TensorList col_vars, at::TensorList variances, at::TensorList exp_avgs,
                     const std::vector<double>& steps, at::TensorList stats, const AdafactorHyperparams& hp,
                     const ElementwiseOptions& options) {
  static const std::vector<Phase> sums = {
      {Scope::kAll, {Pass::kAllocate}},
      {Scope::kItems, {Pass::kNormsAndSums}},
      {Scope::kAll, {Pass::kCollect}},
  };
  static const std::vector<Phase> update_rms = {
      {Scope::kAll, {Pass::kAllocate}},
      {Scope::kWhole, {Pass::kColStats, Pass::kFactors}},
      {Scope::kItems, {Pass::kUpdateRms}},
      {Scope::kAll, {Pass::kCollectUpdate}},
  };
  static const std::vector<Phase> apply = {
      {Scope::kAll, {Pass::kAllocate}},
      {Scope::kWhole, {Pass::kFactors, Pass::kClip}},
      {Scope::kItems, {Pass::kUpdate}},
  };
  const auto& phases =
      stage == AdafactorStage::kSums ? sums : (stage == AdafactorStage::kUpdateRms ? update_rms : apply);
  run_phases(phases, params, grads, row_vars, col_vars, variances, exp_avgs, steps, stats, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
