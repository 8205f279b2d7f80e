// Shared PSGD (Lie-group preconditioner) primitives, written once for every
// PSGD-family optimizer (Kron now; the White-Kron and triangular Kron-PSGD
// variants build their own update rules on the same pieces). Math: rollfast.md
// §2.2 and §2.4, lixilinx psgd_torch (LX).
//
// A Kron preconditioner of a tensor X of rank k holds one factor per axis: a
// dense d_i x d_i matrix or a diagonal (d_i,) vector; a 0-d tensor has one
// diagonal factor of size 1. P = Q^T Q factor-wise, so P X applies
// Q_i^T Q_i along every axis i.
//
// Randomness: every random draw takes an explicit at::Generator, so a caller
// controls (and documents) the order of all draws; the functions below say
// how many they make. No function reads a value back to the host.
//
// Batching (stacked layers): the contractions, Grams, norm bounds and the
// factor update also take `batched = true`, where every tensor (x, factors,
// Grams, Lipschitz scalars) carries one leading batch axis of B independent
// problems (B slices of a stacked param) and the matmuls become bmm. The
// random probes are then passed in (ProbeSource) rather than drawn, so the
// caller can draw them per slice in the unbatched order. Unbatched calls run
// exactly the ops they ran before batching existed.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/ArrayRef.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace torchopt_ext::common::psgd {

// ---- factor layout (rollfast §2.2) -----------------------------------------

enum class MemorySaveMode { None, OneDiag, AllDiag };

// nullopt / "" -> None, "one_diag", "all_diag"; anything else is an error
// naming `argument`.
MemorySaveMode parse_memory_save_mode(const std::optional<std::string>& name, const char* argument);

struct LayoutOptions {
  int64_t max_size_triangular = 8192;
  double max_skew_triangular = 1.0;
  int64_t min_ndim_triangular = 2;
  MemorySaveMode memory_save_mode = MemorySaveMode::None;
};

// Per factor: true = dense d x d, false = diagonal (d,). One entry per axis
// (one entry, false, for a 0-d shape). Axis i is diagonal when d_i <= 1,
// d_i > max_size_triangular, d_i^2 > max_skew_triangular * numel,
// rank < min_ndim_triangular, or memory_save_mode forces it ("one_diag": the
// largest axis, the first of equal ones; "all_diag": every axis). At most 13
// axes, as rollfast.
std::vector<bool> factor_layout(at::IntArrayRef shape, const LayoutOptions& options);

// Number of elements of all factors stored back to back (axis order; dense
// factors row-major).
int64_t factors_numel(at::IntArrayRef shape, const std::vector<bool>& dense);

// Views of the factors inside `flat` (1-D, factors_numel elements), axis order.
std::vector<at::Tensor> unflatten_factors(const at::Tensor& flat, at::IntArrayRef shape,
                                          const std::vector<bool>& dense);

// The same for `flat` of shape (B, factors_numel): batched views (B, d, d) /
// (B, d) of every factor.
std::vector<at::Tensor> unflatten_factors_batched(const at::Tensor& flat, at::IntArrayRef shape,
                                                  const std::vector<bool>& dense);

// Fills `flat` with identity factors times scale^(1/k) (k = number of factors).
void init_factors_(const at::Tensor& flat, at::IntArrayRef shape, const std::vector<bool>& dense, double scale);

// ---- contractions of a factor list with a tensor of any rank ---------------

// q along `axis` of x: dense q: x_(axis) <- q x_(axis) (q^T with transpose);
// diagonal q: x scaled along `axis`. For a 0-d x, q is its one-element factor.
at::Tensor apply_factor(const at::Tensor& x, const at::Tensor& q, int64_t axis, bool transpose);

// Q x (every factor along its axis; LX exprA). batched: x (B, ...) and
// factors (B, d, d) / (B, d); axis i of the factors is axis i + 1 of x.
// upper_triangular (unbatched): the dense factors are upper triangular (the
// EQ geometry); the products then skip their zero blocks (what lies below
// the diagonal is treated as zero, as the triangular solves do).
at::Tensor apply_q(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched = false,
                   bool upper_triangular = false);

// P x = Q^T Q x (LX exprP); batched and upper_triangular as for apply_q.
// Unbatched, a dense factor small next to x (0.6 d^2 <= numel) is applied as
// the formed d x d P_i.
at::Tensor apply_p(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched = false,
                   bool upper_triangular = false);

// x with every fiber along each axis multiplied on the right by q^{-1}
// (upper-triangular dense q by a triangular solve, diagonal q by division):
// LX's conjB = V Q^{-1} of the EQ update.
at::Tensor solve_q_right(const at::Tensor& x, const std::vector<at::Tensor>& factors, bool batched = false);

// Mode-`axis` Gram of x: x_(axis) x_(axis)^T (d x d) for a dense factor, the
// per-index sum of squares (d,) for a diagonal one ((1,) for a 0-d x).
at::Tensor factor_gram(const at::Tensor& x, int64_t axis, bool dense, bool batched = false);

// ---- randomized spectral-norm lower bounds (LX norm_lower_bound_spd/skh) ---

// ||A||_2 lower bound of a symmetric PSD matrix: A scaled by its largest
// diagonal entry, 32 random rows (one randn(32, n) draw from `gen`) aligned
// with A's heaviest row, two half-iterations V <- V A, normalize, V <- V A.
// Returns a 0-d tensor.
at::Tensor norm_lower_bound_spd(const at::Tensor& A, at::Generator& gen);

// The same for a skew-symmetric A, scaled by max |A| (one randn(32, n) draw).
at::Tensor norm_lower_bound_skh(const at::Tensor& A, at::Generator& gen);

// The two bounds with the probes given: A (..., n, n), probes (..., 32, n)
// (what randn(32, n) would draw, per batch entry); result (...).
at::Tensor norm_lower_bound_spd(const at::Tensor& A, const at::Tensor& probes);
at::Tensor norm_lower_bound_skh(const at::Tensor& A, const at::Tensor& probes);

// out = q^T - q for a square q (n, n) or a stack (B, n, n); returns max |out|
// per problem (0-d or (B,); NaN where one holds a NaN), the skew bound's
// scale. CPU float / double contiguous tensors are read in cache blocks (no
// strided column walk) and out is row-major; anything else is ATen's sub.
at::Tensor skew_part(const at::Tensor& out, const at::Tensor& q);

// Rows of one norm-bound probe (LX k = 32).
constexpr int64_t kNormProbeRows = 32;

// The next probe of a factor update: (32, n), or (B, 32, n) when batched.
using ProbeSource = std::function<at::Tensor(int64_t n)>;

// LX procrustes_step2: one step of Q towards a symmetric matrix,
// R = Q^T - Q normalized by its norm lower bound (one draw), step
// a = min(-tr(RQ)/tr(RRQ), max_step) when tr(RRQ) < 0 else max_step,
// Q <- Q + a (RQ + a/2 R RQ). In place.
void procrustes_step_(at::Tensor& q, at::Generator& gen, double max_step = 0.125);
// The same on q (..., d, d) with the norm bound's probes from `probes`.
void procrustes_step_(at::Tensor& q, const ProbeSource& probes, double max_step = 0.125);

// ---- the per-factor update (rollfast §2.4) ---------------------------------

enum class Geometry { EQ, Q0p5EQ1p5, QUAD, NS, EXP, TAYLOR2, HYPER };

// "EQ", "Q0.5EQ1.5" (alias "Q0p5EQ1p5"), "QUAD", "NS", "EXP", "TAYLOR2",
// "HYPER" (case-sensitive); anything else is an error naming `argument`.
Geometry parse_geometry(const std::string& name, const char* argument);

// The probe of the geometry: Q G (EQ, TAYLOR2) rather than P G (the others).
bool probes_with_q(Geometry geometry);

struct FactorUpdateOptions {
  Geometry geometry = Geometry::Q0p5EQ1p5;
  double lr = 0.1;  // preconditioner_lr
  double beta_lipschitz = 0.9;
  bool track_lipschitz = true;
  double damping = 1e-9;  // added to every entry of T1 (not EQ)
  int64_t ns_iters = 5;   // NS geometry
};

// One factor's step. q: the factor (math dtype, dense d x d or diagonal (d,)),
// replaced by its update. t1: its Gram of the probe, used as scratch (the
// non-EQ modes overwrite it: pass a copy to keep it). t2: for EQ the Gram of
// conjB (same shape as t1), otherwise a 0-d tensor holding numel / d.
// lipschitz: the factor's 0-d Lipschitz EMA (updated when tracking). Draws
// from `gen` only for dense factors: one norm lower bound (two for
// Q0.5EQ1.5 and NS: the second from the Procrustes / polar step).
void update_factor_(at::Tensor& q, const at::Tensor& t1, const at::Tensor& t2, at::Tensor& lipschitz,
                    const FactorUpdateOptions& options, at::Generator& gen);

// The same step with the probes from `probes` (called in the order the
// generator version draws, probe_draws() times). batched: q (B, d, d) /
// (B, d), t1 likewise, t2 (B, d, d) for EQ else the 0-d numel / d,
// lipschitz (B,).
void update_factor_(at::Tensor& q, const at::Tensor& t1, const at::Tensor& t2, at::Tensor& lipschitz,
                    const FactorUpdateOptions& options, const ProbeSource& probes, bool batched);

// How many randn(32, d) probes one update_factor_ of a factor draws: 0 for
// a diagonal factor; 2 for a dense one under Q0.5EQ1.5 and NS, else 1.
int64_t probe_draws(Geometry geometry, bool dense);

// The draws update_factor_ makes for a factor of size d (none when diagonal),
// without the update: a rank that does not step a param advances `gen`
// exactly as the rank that does (Kron's ownership path).
void skip_update_factor_draws(int64_t d, bool dense, const FactorUpdateOptions& options, at::ScalarType dtype,
                              at::Generator& gen);

// ---- batched vs one problem at a time -------------------------------------

// Largest slice (numel of one problem) that the CPU updates as a batch by
// default: above it ATen's bmm loses to a loop of separate mm calls
// (measured with benchmarks/bench_kron.py --stacked, docs/benchmarks.md).
constexpr int64_t kCpuBatchedMaxNumel = 8192;

// The default of Kron's batch_equal_shapes for problems of `slice_numel`
// elements: always batched off the CPU (one bmm chain instead of many small
// GEMM launches), on the CPU only up to kCpuBatchedMaxNumel.
bool prefer_batched(const at::Device& device, int64_t slice_numel);

// LX balance_kron_precond: n_i = max |Q_i|, g = (prod n_i)^(1/k),
// Q_i <- Q_i g / n_i (no-op for fewer than two factors). In place.
void balance_factors_(std::vector<at::Tensor>& factors, bool batched = false);

}  // namespace torchopt_ext::common::psgd
