// The shared matrix core in LibTorch: Newton-Schulz coefficient presets
// (Polar Express computed in float64 and checked against the published
// table), and per-tensor dimension specs in Muon and PRISM (a stacked
// (L, in, out) weight equals L independent 2-D weights bitwise, conv
// kernels, errors naming the option, checkpoints).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <array>
#include <cmath>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/common/matrix_dims.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/optim/muon.h"
#include "torchopt_ext/optim/prism.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

// The 5-row table published with modded-nanogpt / nanochat ("num_iters=5,
// safety_factor=2e-2, cushion=2", a cushion of 0.02).
constexpr std::array<std::array<double, 3>, 5> kPublished{{
    {8.156554524902461, -22.48329292557795, 15.878769915207462},
    {4.042929935166739, -2.808917465908714, 0.5000178451051316},
    {3.8916678022926607, -2.772484153217685, 0.5060648178503393},
    {3.285753657755655, -2.3681294933425376, 0.46449024233003106},
    {2.3465413258596377, -1.7097828382687081, 0.42323551169305323},
}};

TEST(NewtonSchulz, PolarExpressReproducesThePublishedTable) {
  const auto rows = common::polar_express_coefficients(5, 1e-3, 2e-2, 0.02);
  ASSERT_EQ(rows.size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    for (size_t j = 0; j < 3; ++j) {
      EXPECT_NEAR(rows[i][j], kPublished[i][j], 1e-12 * std::abs(kPublished[i][j])) << i << "," << j;
    }
  }
}

TEST(NewtonSchulz, PresetsByName) {
  EXPECT_EQ(common::ns_coefficients_preset("standard", 5), common::standard_ns_coefficients());
  const auto dion = common::ns_coefficients_preset("Dion", 5);
  ASSERT_EQ(dion.size(), 5u);
  EXPECT_EQ(dion[0][0], 4.0848);
  EXPECT_EQ(dion[4][2], 1.2012);
  // rollfast's defaults (cushion 0.0241): a different first row than the published table.
  const auto pe = common::ns_coefficients_preset("polar_express", 3);
  ASSERT_EQ(pe.size(), 3u);
  EXPECT_NEAR(pe[0][0], 8.124717664848651, 1e-12);
  EXPECT_EQ(common::ns_coefficients_preset("polar_express", 8).size(), 8u);
  expect_throws_mentioning([] { common::ns_coefficients_preset("fast", 5, "ns_preset"); }, "ns_preset");
}

TEST(NewtonSchulz, PolarExpressOrthogonalizesFurtherThanStandard) {
  torch::manual_seed(0);
  const auto g = torch::randn({64, 128}, torch::kFloat64);
  common::NewtonSchulzOptions options;
  options.dtype = std::nullopt;
  const double standard_min = torch::linalg_svdvals(common::newton_schulz(g, options)).min().item<double>();
  options.coefficients = common::ns_coefficients_preset("polar_express", 5);
  const auto s = torch::linalg_svdvals(common::newton_schulz(g, options));
  EXPECT_GT(s.min().item<double>(), standard_min + 0.1);
  EXPECT_LT(s.max().item<double>(), 1.2);
}

// The iteration written the allocating way (gram, addmm), as before the
// buffers: the buffered loop must give the same bits on the CPU.
torch::Tensor allocating_newton_schulz(const torch::Tensor& input, const common::NSCoefficients& rows, int64_t steps,
                                       torch::ScalarType dtype) {
  torch::Tensor x = input.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  const bool transposed = x.size(0) > x.size(1);
  if (transposed) {
    x = x.mT();
  }
  x.div_(x.norm().clamp_min(1e-7));
  for (int64_t i = 0; i < steps; ++i) {
    const auto& [a, b, c] = rows[std::min<size_t>(static_cast<size_t>(i), rows.size() - 1)];
    const torch::Tensor g = torch::matmul(x, x.mT());
    const torch::Tensor poly = torch::addmm(g, g, g, b, c);
    x = torch::addmm(x, poly, x, a, 1.0);
  }
  return transposed ? x.mT() : x;
}

TEST(NewtonSchulz, BufferedIterationEqualsTheAllocatingFormBitwise) {
  torch::manual_seed(3);
  for (const auto& shape : {std::vector<int64_t>{33, 17}, std::vector<int64_t>{17, 33}, std::vector<int64_t>{24, 24}}) {
    const torch::Tensor x = torch::randn(shape, torch::kFloat64);
    for (const auto dtype : {torch::kFloat32, torch::kFloat64, torch::kBFloat16}) {
      for (const auto& rows : {common::standard_ns_coefficients(), common::dion_ns_coefficients()}) {
        common::NewtonSchulzOptions options;
        options.coefficients = rows;
        options.steps = 6;
        options.dtype = dtype;
        const torch::Tensor got = common::newton_schulz(x, options);
        const torch::Tensor want = allocating_newton_schulz(x, rows, 6, dtype);
        EXPECT_TRUE(torch::equal(got, want)) << shape << " " << dtype;
      }
    }
  }
}

TEST(MatrixDims, ValidationNamesTheArgument) {
  using common::MatrixDims;
  expect_throws_mentioning([] { common::check_matrix_dims(MatrixDims{{0, 1}, {1}, {}}, "matrix_dims"); },
                           "matrix_dims");  // overlap
  expect_throws_mentioning([] { common::check_matrix_dims(MatrixDims{{2}, {0}, {}}, "matrix_dims"); },
                           "matrix_dims");  // axis 1 missing
  expect_throws_mentioning([] { common::check_matrix_dims(MatrixDims{{}, {0}, {}}, "matrix_dims"); },
                           "matrix_dims");  // empty reduction
  const std::vector<torch::Tensor> params{torch::randn({3, 4})};
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().matrix_dims(MatrixDims{{1}, {1}, {0}})); },
                           "matrix_dims");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().matrix_dims(MatrixDims{{0}, {2}, {}})); },
                           "matrix_dims");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().ns_preset("fast")); }, "ns_preset");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().ns_preset("fast")); }, "ns_preset");
}

// Runs `make(stacked)` on an (L, in, out) weight with spec (red 1, out 2,
// batch 0) and `make(singles)` on its L (out, in) layers. One intra-op
// thread: bitwise. Two: the singles run side by side with single-threaded
// ops (common::run_side_by_side) while the stacked batch splits its ops, so
// they agree to rounding.
template <typename Optimizer, typename Options>
void expect_stacked_equals_independent(Options options) {
  for (const int threads : {1, 2}) {
    const int saved = at::get_num_threads();
    at::set_num_threads(threads);
    torch::manual_seed(1);
    const int64_t layers = 3;
    auto stacked = torch::randn({layers, 10, 6});
    std::vector<torch::Tensor> singles;
    for (int64_t i = 0; i < layers; ++i) {
      singles.push_back(stacked[i].t().contiguous());
    }
    Optimizer opt_stacked({stacked}, Options(options).matrix_dims(common::MatrixDims{{1}, {2}, {0}}));
    Optimizer opt_singles(singles, options);
    for (int step = 0; step < 5; ++step) {
      const auto g = torch::randn_like(stacked);
      stacked.mutable_grad() = g;
      for (int64_t i = 0; i < layers; ++i) {
        singles[static_cast<size_t>(i)].mutable_grad() = g[i].t().contiguous();
      }
      opt_stacked.step();
      opt_singles.step();
    }
    at::set_num_threads(saved);
    for (int64_t i = 0; i < layers; ++i) {
      if (threads == 1) {
        EXPECT_TRUE(torch::equal(stacked[i].t(), singles[static_cast<size_t>(i)])) << "layer " << i;
      } else {
        EXPECT_TRUE(torch::allclose(stacked[i].t(), singles[static_cast<size_t>(i)], 1e-5, 1e-6))
            << "layer " << i << " at 2 threads";
      }
    }
  }
}

TEST(MatrixDims, MuonStackedLayersEqualIndependentMatrices) {
  expect_stacked_equals_independent<optim::Muon>(optim::MuonOptions(0.02).ns_dtype(at::kFloat));
  expect_stacked_equals_independent<optim::Muon>(optim::MuonOptions(0.02).adjust_lr_fn("match_rms_adamw"));
}

TEST(MatrixDims, PRISMStackedLayersEqualIndependentMatrices) {
  expect_stacked_equals_independent<optim::PRISM>(
      optim::PRISMOptions(0.02).weight_decay(0.1).grad_clip_max_amps(std::make_tuple(0.05, 0.02)));
  expect_stacked_equals_independent<optim::PRISM>(optim::PRISMOptions(0.02).mode("bidirectional"));
}

TEST(MatrixDims, ConvKernelSpecEqualsFlattenedRouteAndBiasKeepsAdamW) {
  torch::manual_seed(2);
  auto conv = torch::randn({8, 3, 2, 2});
  auto flat = conv.clone();
  auto bias = torch::randn({8});
  optim::Muon spec(std::vector<torch::Tensor>{conv, bias},
                   optim::MuonOptions(0.02).ns_dtype(at::kFloat).matrix_dims(common::MatrixDims{{1, 2, 3}, {0}, {}}));
  optim::Muon routed({flat}, optim::MuonOptions(0.02).ns_dtype(at::kFloat).use_muon(true));
  for (int step = 0; step < 3; ++step) {
    conv.mutable_grad() = torch::randn_like(conv);
    flat.mutable_grad() = conv.grad().clone();
    bias.mutable_grad() = torch::randn_like(bias);
    spec.step();
    routed.step();
  }
  EXPECT_TRUE(torch::equal(conv, flat));
  const auto& state = static_cast<const optim::MuonParamState&>(*spec.state().at(bias.unsafeGetTensorImpl()));
  EXPECT_TRUE(state.exp_avg().defined());
}

TEST(MatrixDims, CheckpointRoundTripKeepsSpecAndPreset) {
  std::vector<torch::Tensor> params{torch::randn({2, 6, 5}), torch::randn({5, 9}), torch::randn({4})};
  const auto spec = common::MatrixDims{{1}, {2}, {0}};
  check_checkpoint_round_trip<optim::PRISM, optim::PRISMOptions, optim::PRISMParamState>(
      optim::PRISMOptions(0.01).ns_preset("polar_express").matrix_dims(spec).initial_lr(0.01), optim::PRISMOptions(0.5),
      params, 3, 3);
  check_checkpoint_round_trip<optim::Muon, optim::MuonOptions, optim::MuonParamState>(
      optim::MuonOptions(0.01).ns_preset("dion").matrix_dims(spec).initial_lr(0.01), optim::MuonOptions(0.5), params, 3,
      3);
}

}  // namespace
