// Batched Newton-Schulz orthogonalization (classic.md §11, rollfast.md §3.3):
// the shared core of Muon and, later, PRISM, MARS-Shampoo and PSGD. Written
// once on ATen matmuls, so the same code runs wherever ATen has a backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torchopt_ext::common {

// How the input is scaled so its spectral norm is at most ~1 before the
// iteration:
//   Frobenius: X / max(||X||_F, eps)    (or X / (||X||_F + eps), see eps_clamp)
//   Spectral:  X / (||X||_2 + eps)       (exact, through an SVD: costly)
//   AOL:       rows rescaled by rsqrt(max(sum_j |X X^T|_ij, eps)) (Prach et al.)
//   Schatten:  X / sqrt(max(||X X^T||_F, eps)) = X / ||X||_S4
enum class NSNormalization { Frobenius, Spectral, AOL, Schatten };

// "frobenius", "spectral", "aol" or "schatten" in any case; anything else is
// an error naming `argument`.
NSNormalization parse_ns_normalization(const std::string& name, const char* argument);

// Coefficients (a, b, c) of the quintic step X <- a X + (b A + c A^2) X with
// A = X X^T, one row per iteration; iterations past the last row reuse it.
using NSCoefficients = std::vector<std::array<double, 3>>;

// Keller Jordan's (3.4445, -4.7750, 2.0315), used by torch.optim.Muon.
NSCoefficients standard_ns_coefficients();

// Dion's five-row table (microsoft/dion, as rollfast's DION_NS_COEFFS).
NSCoefficients dion_ns_coefficients();

// Polar Express (Amsel et al. 2025, arXiv 2505.16932): per iteration the
// odd quintic minimising the worst relative error on [max(l, cushion u), u]
// (Remez exchange, float64), recentred on [l, u] when the cushion binds, and
// divided by (1 + safety_eps)^(1, 3, 5) on every iteration but the last; the
// interval then becomes [p(l), 2 - p(l)]. Defaults are rollfast's
// polar_express_coeffs; cushion = 0.02 gives the 5-row table published with
// modded-nanogpt / nanochat.
NSCoefficients polar_express_coefficients(int64_t num_iters, double lower = 1e-3, double safety_eps = 2e-2,
                                          double cushion = 0.02407327424182761);

// A coefficient preset by name, for `steps` iterations: "standard",
// "dion" or "polar_express" (any case). Other names are an error naming
// `argument`.
NSCoefficients ns_coefficients_preset(const std::string& name, int64_t steps, const char* argument = "preset");

// The preset when `preset` is non-empty, else the flat table (see below).
NSCoefficients resolve_ns_coefficients(const std::string& preset, const std::vector<double>& flat, int64_t steps,
                                       const char* argument);

// A flat list of 3k values as k rows (validated: non-empty, a multiple of
// three, finite); errors name `argument`.
NSCoefficients ns_coefficients_from_flat(const std::vector<double>& flat, const char* argument);

struct NewtonSchulzOptions {
  NSCoefficients coefficients = standard_ns_coefficients();
  int64_t steps = 5;
  NSNormalization normalization = NSNormalization::Frobenius;
  double eps = 1e-7;
  // Frobenius: true divides by max(norm, eps) (torch.optim.Muon), false by
  // norm + eps (Keller Jordan's reference, rollfast).
  bool eps_clamp = true;
  // Dtype of the iteration (the matmuls and X): bfloat16 as torch.optim.Muon,
  // or nullopt for the input's dtype (fp32/fp64 give the exact polynomial).
  std::optional<at::ScalarType> dtype = at::kBFloat16;
};

// Orthogonalizes the last two dims of `input` (any leading dims are a batch,
// one independent matrix each) and returns the result in `options.dtype`.
// Tall matrices are iterated transposed, so the Gram X X^T is the small one.
at::Tensor newton_schulz(const at::Tensor& input, const NewtonSchulzOptions& options);

// Validates options; errors name `op` and the offending option.
void check_newton_schulz_options(const char* op, const NewtonSchulzOptions& options);

}  // namespace torchopt_ext::common
