// The split Muon / PRISM functionals of the distributed ownership path
// (functional/matrix_owner.h), composed on one process with the rows of each
// matrix split over "ranks" as Shard(0) splits them (an empty trailing
// shard included): momentum on the shards, the matrix function on the whole
// matrix, the apply on the shards. Without Magma this must equal muon_step_ /
// prism_step_ bit for bit; with Magma (cosine from shard sums) to rounding.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/functional/matrix_owner.h"
#include "torchopt_ext/functional/muon.h"
#include "torchopt_ext/functional/prism.h"

namespace {

using namespace torchopt_ext;

constexpr int kRanks = 4;  // 3 rows over 4 ranks leave the last shard empty

std::vector<torch::Tensor> problem(int64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({7, 5}), torch::randn({3, 9}), torch::randn({4, 2, 3})};
}

std::vector<int64_t> sizes(const std::vector<torch::Tensor>& params) {
  std::vector<int64_t> out;
  for (const auto& p : params) {
    out.push_back(p.size(0));
    out.push_back(p.numel() / p.size(0));
  }
  return out;
}

// Rank r's rows under torch.chunk's split (views, so writes land in t).
torch::Tensor shard(const torch::Tensor& t, int r) {
  const int64_t rows = t.size(0);
  const int64_t size = (rows + kRanks - 1) / kRanks;
  const int64_t start = std::min(rows, r * size);
  return t.narrow(0, start, std::min(rows, start + size) - start);
}

std::vector<torch::Tensor> shards(const std::vector<torch::Tensor>& ts, int r) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(shard(t, r));
  }
  return out;
}

std::vector<torch::Tensor> zeros_like_all(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(torch::zeros_like(t));
  }
  return out;
}

std::vector<torch::Tensor> scalars(size_t n, double value) {
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back(torch::full({}, value));
  }
  return out;
}

const std::vector<double> kCoefficients{3.4445, -4.775, 2.0315};

void run_muon_split(std::vector<torch::Tensor>& params, std::vector<torch::Tensor>& buffers,
                    const std::vector<torch::Tensor>& grads, bool use_magma, std::vector<torch::Tensor>& scores,
                    std::vector<std::vector<torch::Tensor>>& steps) {
  const auto lr = torch::tensor(0.02, torch::kFloat64);
  std::vector<std::vector<torch::Tensor>> inputs(kRanks);
  auto sums = torch::zeros({static_cast<int64_t>(params.size()), 3}, torch::kFloat64);
  for (int r = 0; r < kRanks; ++r) {
    auto g = shards(grads, r);
    for (auto& t : g) {
      t = t.clone();
    }
    inputs[r] = zeros_like_all(shards(buffers, r));
    auto rank_sums = torch::zeros_like(sums);
    functional::muon_momentum_(g, shards(buffers, r), steps[r], inputs[r], rank_sums, 0.9, true, false, use_magma,
                               std::nullopt);
    sums += rank_sums;  // the all-reduce
  }
  common::NewtonSchulzOptions ns;
  std::vector<torch::Tensor> updates;
  for (size_t j = 0; j < params.size(); ++j) {
    std::vector<torch::Tensor> rows;
    for (int r = 0; r < kRanks; ++r) {
      rows.push_back(inputs[r][j]);
    }
    updates.push_back(common::newton_schulz(torch::cat(rows).reshape({params[j].size(0), -1}), ns));
  }
  std::vector<torch::Tensor> before;  // every rank scores from the same values
  for (const auto& s : scores) {
    before.push_back(s.clone());
  }
  for (int r = 0; r < kRanks; ++r) {
    std::vector<torch::Tensor> mine;
    for (const auto& u : updates) {
      mine.push_back(shard(u, r).reshape(-1));
    }
    std::vector<torch::Tensor> rank_scores;
    for (const auto& s : before) {
      rank_scores.push_back(s.clone());
    }
    if (r == 0) {
      rank_scores = scores;  // rank 0's scores are the ones checked
    }
    functional::matrix_apply_(shards(params, r), mine, use_magma ? rank_scores : std::vector<torch::Tensor>{}, steps[r],
                              lr, 0.1, sizes(params), "original",
                              use_magma ? std::optional<torch::Tensor>(sums) : std::nullopt, use_magma, 0.6, 2.0, false,
                              11);
  }
}

void check_muon(bool use_magma) {
  auto params = problem(0);
  auto ref = params;
  for (auto& p : ref) {
    p = p.clone();
  }
  auto buffers = zeros_like_all(params);
  auto ref_buffers = zeros_like_all(params);
  auto scores = scalars(params.size(), 0.5);
  auto ref_scores = scalars(params.size(), 0.5);
  std::vector<std::vector<torch::Tensor>> steps(kRanks);
  for (auto& s : steps) {
    s = scalars(params.size(), 0.0);
  }
  auto ref_steps = scalars(params.size(), 0.0);
  for (int k = 0; k < 4; ++k) {
    torch::manual_seed(100 + k);
    std::vector<torch::Tensor> grads;
    for (const auto& p : params) {
      grads.push_back(torch::randn_like(p));
    }
    run_muon_split(params, buffers, grads, use_magma, scores, steps);
    auto ref_grads = grads;
    for (auto& g : ref_grads) {
      g = g.clone();
    }
    functional::muon_step_(ref, ref_grads, ref_buffers, use_magma ? ref_scores : std::vector<torch::Tensor>{},
                           ref_steps, torch::tensor(0.02, torch::kFloat64), 0.1, 0.9, true, kCoefficients, 5, 1e-7,
                           "original", "frobenius", "", {}, at::kBFloat16, false, use_magma, 0.6, 2.0, false, 11,
                           std::nullopt, std::nullopt);
  }
  for (size_t j = 0; j < params.size(); ++j) {
    if (use_magma) {
      EXPECT_TRUE(torch::allclose(params[j], ref[j], 1e-6, 1e-6)) << j;
      EXPECT_NEAR(scores[j].item<double>(), ref_scores[j].item<double>(), 1e-7) << j;
    } else {
      EXPECT_TRUE(torch::equal(params[j], ref[j])) << j;
      EXPECT_TRUE(torch::equal(buffers[j], ref_buffers[j])) << j;
    }
    EXPECT_EQ(steps[kRanks - 1][j].item<double>(), 4.0);
  }
}

TEST(MatrixOwner, MuonSplitOverShardsEqualsMuonStep) { check_muon(false); }

TEST(MatrixOwner, MuonSplitWithMagmaTracksMuonStep) { check_muon(true); }

void check_prism(const std::string& mode, bool shape_nesterov) {
  auto params = problem(1);
  auto ref = params;
  for (auto& p : ref) {
    p = p.clone();
  }
  auto buffers = zeros_like_all(params);
  auto ref_buffers = zeros_like_all(params);
  std::vector<std::vector<torch::Tensor>> steps(kRanks);
  for (auto& s : steps) {
    s = scalars(params.size(), 0.0);
  }
  auto ref_steps = scalars(params.size(), 0.0);
  const std::vector<double> amps{0.5, 1.0};
  const auto lr = torch::tensor(0.02, torch::kFloat64);
  for (int k = 0; k < 3; ++k) {
    torch::manual_seed(200 + k);
    std::vector<torch::Tensor> grads;
    for (const auto& p : params) {
      grads.push_back(torch::randn_like(p));
    }
    std::vector<std::vector<torch::Tensor>> targets(kRanks), innovations(kRanks), lookahead(kRanks);
    const auto no_sums = torch::zeros({0, 3}, torch::kFloat64);
    for (int r = 0; r < kRanks; ++r) {
      auto g = shards(grads, r);
      for (auto& t : g) {
        t = t.clone();
      }
      targets[r] = zeros_like_all(g);
      innovations[r] = zeros_like_all(g);
      lookahead[r] = shape_nesterov ? std::vector<torch::Tensor>{} : zeros_like_all(g);
      functional::prism_momentum_(g, shards(buffers, r), steps[r], targets[r], innovations[r], lookahead[r], no_sums,
                                  0.9, true, shape_nesterov, false, "ema", false, false, 0, std::nullopt);
    }
    std::vector<torch::Tensor> updates;
    for (size_t j = 0; j < params.size(); ++j) {
      auto whole = [&](const std::vector<std::vector<torch::Tensor>>& parts) {
        std::vector<torch::Tensor> rows;
        for (int r = 0; r < kRanks; ++r) {
          rows.push_back(parts[r][j]);
        }
        return torch::cat(rows).reshape({params[j].size(0), -1});
      };
      const auto g = shape_nesterov ? std::optional<torch::Tensor>() : std::optional<torch::Tensor>(whole(lookahead));
      updates.push_back(functional::prism_shape(whole(targets), whole(innovations), g, 0.9, 0.7, 5, kCoefficients, mode,
                                                "frobenius", 6, 1e-5, 1.001, 1e-6, std::nullopt, std::nullopt, true,
                                                shape_nesterov, "ema", amps, at::kFloat));
    }
    for (int r = 0; r < kRanks; ++r) {
      std::vector<torch::Tensor> mine;
      for (const auto& u : updates) {
        mine.push_back(shard(u, r).reshape(-1));
      }
      functional::matrix_apply_(shards(params, r), mine, {}, steps[r], lr, 0.1, sizes(params), "none", std::nullopt,
                                false, 0.5, 2.0, false, 0);
    }
    auto ref_grads = grads;
    for (auto& t : ref_grads) {
      t = t.clone();
    }
    functional::prism_step_(ref, ref_grads, ref_buffers, {}, ref_steps, lr, 0.9, 0.7, 0.1, 5, kCoefficients, "", {},
                            mode, "frobenius", 6, 1e-5, 1.001, 1e-6, std::nullopt, std::nullopt, true, shape_nesterov,
                            false, "ema", amps, std::nullopt, true, std::nullopt, at::kFloat, false, false, 0.5, 2.0,
                            false, 0, std::nullopt, std::nullopt);
  }
  for (size_t j = 0; j < params.size(); ++j) {
    EXPECT_TRUE(torch::equal(params[j], ref[j])) << mode << " " << j;
    EXPECT_TRUE(torch::equal(buffers[j], ref_buffers[j])) << mode << " " << j;
  }
}

TEST(MatrixOwner, PrismSplitOverShardsEqualsPrismStep) {
  check_prism("original", true);
  check_prism("bidirectional", true);
  check_prism("original", false);
}

TEST(MatrixOwner, ApplyRejectsBadSizes) {
  auto params = problem(0);
  std::vector<torch::Tensor> updates;
  for (const auto& p : params) {
    updates.push_back(torch::zeros({p.numel()}));
  }
  auto steps = scalars(params.size(), 1.0);
  try {
    functional::matrix_apply_(params, updates, {}, steps, torch::tensor(0.1), 0.0, {1, 2}, "none", std::nullopt, false,
                              0.5, 2.0, false, 0);
    FAIL() << "expected an error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("matrix_sizes must hold (rows, cols) per param"), std::string::npos);
  }
}

}  // namespace
