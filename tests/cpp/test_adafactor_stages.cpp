// adafactor_stage_ (the FSDP2 path): the three stages back to back equal
// adafactor_step_ bit for bit, and stages run on row shards of a matrix (and
// element shards of a vector) with their statistics summed between stages,
// as the Python front end's all-reduces do, equal the unsharded step.
#include <cmath>
#include <optional>

#include "test_utils.h"
#include "torchopt_ext/torchopt_ext.h"

namespace {

namespace fn = torchopt_ext::functional;

// Stats length for a param (layout in kernels/cpu/adafactor.h).
int64_t stats_size(const torch::Tensor& p) {
  if (p.dim() < 2) {
    return 3;
  }
  int64_t batches = 1;
  for (int64_t d = 0; d + 2 < p.dim(); ++d) {
    batches *= p.size(d);
  }
  return 4 + batches + batches * p.size(-1);
}

struct Lists {
  std::vector<torch::Tensor> params, rows, cols, vars, avgs, steps;
};

// Row shards keep whole rows, so a shard's state shapes follow from its own
// shape: (rows, 1) and the whole (1, C) column EMA.
Lists make_state(const std::vector<torch::Tensor>& params) {
  Lists l;
  l.params = params;
  for (const auto& p : params) {
    if (p.dim() >= 2) {
      auto row_shape = p.sizes().vec();
      row_shape.back() = 1;
      auto col_shape = p.sizes().vec();
      col_shape[col_shape.size() - 2] = 1;
      l.rows.push_back(torch::zeros(row_shape));
      l.cols.push_back(torch::zeros(col_shape));
    } else {
      l.vars.push_back(torch::zeros_like(p));
    }
    l.avgs.push_back(torch::zeros_like(p));
    l.steps.push_back(torch::zeros({}, torch::kFloat32));
  }
  return l;
}

void fused(Lists& l, std::vector<torch::Tensor> grads) {
  fn::adafactor_step_(l.params, grads, l.rows, l.cols, l.vars, l.avgs, l.steps, torch::tensor(0.05, torch::kFloat64),
                      -0.8, std::nullopt, 1e-3, 1.0, 0.1, 0.9, true, true, false, false, false, 0, std::nullopt,
                      std::nullopt);
}

void stage(int64_t s, Lists& l, std::vector<torch::Tensor>& grads, std::vector<torch::Tensor>& stats) {
  fn::adafactor_stage_(s, l.params, grads, l.rows, l.cols, l.vars, l.avgs, l.steps,
                       torch::tensor(0.05, torch::kFloat64), stats, -0.8, std::nullopt, 1e-3, 1.0, 0.1, 0.9, true, true,
                       false, false, false, 0, std::nullopt, std::nullopt);
}

TEST(AdafactorStages, BackToBackEqualTheFusedStepBitwise) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> init = {torch::randn({37, 19}), torch::randn({2, 5, 3}), torch::randn({41})};
  std::vector<torch::Tensor> a_params, b_params;
  for (const auto& t : init) {
    a_params.push_back(t.clone());
    b_params.push_back(t.clone());
  }
  auto a = make_state(a_params);
  auto b = make_state(b_params);
  for (int step = 0; step < 5; ++step) {
    std::vector<torch::Tensor> grads;
    for (const auto& t : init) {
      grads.push_back(torch::randn_like(t));
    }
    fused(a, grads);
    std::vector<torch::Tensor> stats;
    for (const auto& p : b.params) {
      stats.push_back(torch::zeros({stats_size(p)}, torch::kFloat64));
    }
    for (int64_t s = 1; s <= 3; ++s) {
      stage(s, b, grads, stats);
    }
  }
  for (size_t i = 0; i < init.size(); ++i) {
    EXPECT_TRUE(torch::equal(a.params[i], b.params[i])) << i;
    EXPECT_TRUE(torch::equal(a.avgs[i], b.avgs[i])) << i;
  }
  for (size_t i = 0; i < a.rows.size(); ++i) {
    EXPECT_TRUE(torch::equal(a.rows[i], b.rows[i]));
    EXPECT_TRUE(torch::equal(a.cols[i], b.cols[i]));
  }
}

TEST(AdafactorStages, RowShardsWithSummedStatsMatchTheUnshardedStep) {
  torch::manual_seed(1);
  const auto matrix = torch::randn({13, 7});
  const auto vector = torch::randn({13});
  auto whole = make_state({matrix.clone(), vector.clone()});
  // Three uneven shards (5, 5, 3 rows / elements) and one empty one.
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 5}, {5, 10}, {10, 13}, {13, 13}};
  std::vector<Lists> shards;
  for (const auto& [lo, hi] : ranges) {
    shards.push_back(make_state({matrix.slice(0, lo, hi).clone(), vector.slice(0, lo, hi).clone()}));
  }
  for (int step = 0; step < 10; ++step) {
    const auto gm = torch::randn({13, 7});
    const auto gv = torch::randn({13});
    fused(whole, {gm.clone(), gv.clone()});
    std::vector<std::vector<torch::Tensor>> grads, stats;
    for (size_t r = 0; r < ranges.size(); ++r) {
      const auto [lo, hi] = ranges[r];
      grads.push_back({gm.slice(0, lo, hi).clone(), gv.slice(0, lo, hi).clone()});
      stats.push_back(
          {torch::zeros({stats_size(shards[r].params[0])}, torch::kFloat64), torch::zeros({3}, torch::kFloat64)});
    }
    // Sums over ranks of [begin, end) of every rank's stats of param i.
    auto reduce = [&](size_t i, int64_t begin, int64_t end) {
      auto total = torch::zeros({end - begin}, torch::kFloat64);
      for (auto& s : stats) {
        total += s[i].slice(0, begin, end);
      }
      for (auto& s : stats) {
        s[i].slice(0, begin, end).copy_(total);
      }
    };
    for (size_t r = 0; r < ranges.size(); ++r) {
      stage(1, shards[r], grads[r], stats[r]);
    }
    reduce(0, 0, 2);
    reduce(0, 3, stats_size(shards[0].params[0]));
    reduce(1, 0, 2);
    for (size_t r = 0; r < ranges.size(); ++r) {
      stage(2, shards[r], grads[r], stats[r]);
    }
    reduce(0, 2, 3);
    reduce(1, 2, 3);
    for (size_t r = 0; r < ranges.size(); ++r) {
      stage(3, shards[r], grads[r], stats[r]);
    }
  }
  std::vector<torch::Tensor> m, v, rows;
  for (auto& s : shards) {
    m.push_back(s.params[0]);
    v.push_back(s.params[1]);
    rows.push_back(s.rows[0]);
    // Every shard holds the same whole column EMA.
    EXPECT_TRUE(torch::equal(s.cols[0], shards[0].cols[0]));
  }
  EXPECT_TRUE(torch::allclose(torch::cat(m), whole.params[0], 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(torch::cat(v), whole.params[1], 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(torch::cat(rows), whole.rows[0], 1e-6, 0));
  EXPECT_TRUE(torch::allclose(shards[0].cols[0], whole.cols[0], 1e-6, 0));
  // The shards really differ from a run without the reduction: a wrong sum would not pass.
  EXPECT_GT((torch::cat(m) - matrix).abs().max().item<double>(), 1e-3);
}

TEST(AdafactorStages, StatsOfTheWrongSizeNameTheArgument) {
  auto l = make_state({torch::randn({4, 3})});
  std::vector<torch::Tensor> grads = {torch::randn({4, 3})};
  std::vector<torch::Tensor> stats = {torch::zeros({5}, torch::kFloat64)};
  try {
    stage(1, l, grads, stats);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("stats[0]"), std::string::npos) << e.what();
  }
  EXPECT_EQ(l.steps[0].item<float>(), 0.0f);
}

}  // namespace
