// The blocked products of common/psgd.cpp (symmetric Grams, P = Q^T Q formed
// once, triangular blocks for EQ, the Procrustes step through R R) against
// the plain GEMM formulas, in float64 on axes long enough to be blocked
// (>= 256, uneven last blocks) and on the first, last and a middle axis.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <vector>

#include "torchopt_ext/common/psgd.h"

namespace psgd = torchopt_ext::common::psgd;

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// An upper-triangular, well-conditioned d x d factor.
torch::Tensor upper_factor(int64_t d) {
  return torch::eye(d, torch::kFloat64) + 0.3 * torch::triu(torch::randn({d, d}, torch::kFloat64)) / std::sqrt(d);
}

// Plain reference: m applied along `axis` of x.
torch::Tensor along(const torch::Tensor& x, const torch::Tensor& m, int64_t axis) {
  const auto moved = x.movedim(axis, 0);
  const auto sizes = moved.sizes().vec();
  return m.mm(moved.reshape({m.size(0), -1})).reshape(sizes).movedim(0, axis);
}

}  // namespace

TEST(PsgdBlocked, ContractionsMatchPlainGemms) {
  torch::manual_seed(3);
  // (530, 300): first and last axes; (2, 770, 3): a middle axis (the 2 and 3
  // axes are diagonal here, as for a conv's kernel axes with all_diag).
  for (const bool triangular : {false, true}) {
    const std::vector<int64_t> shape{530, 300};
    const torch::Tensor x = torch::randn(shape, torch::kFloat64);
    std::vector<torch::Tensor> qs{upper_factor(530), upper_factor(300)};
    if (!triangular) {
      for (auto& q : qs) {
        q = q + 0.1 * torch::randn_like(q) / std::sqrt(q.size(0));  // a full (non-triangular) factor
      }
    }
    const auto ref_q = along(along(x, qs[0], 0), qs[1], 1);
    const auto ref_p = along(along(x, qs[0].t().mm(qs[0]), 0), qs[1].t().mm(qs[1]), 1);
    EXPECT_LE(max_diff(psgd::apply_q(x, qs, /*batched=*/false, triangular), ref_q), 1e-12) << triangular;
    EXPECT_LE(max_diff(psgd::apply_p(x, qs, /*batched=*/false, triangular), ref_p), 1e-12) << triangular;
    const auto rows1 = x.t();
    EXPECT_LE(max_diff(psgd::factor_gram(x, 0, true), x.mm(x.t())), 1e-11);
    EXPECT_LE(max_diff(psgd::factor_gram(x, 1, true), rows1.mm(rows1.t())), 1e-11);
    // float32 too (the CPU mirrors the blocks by hand, per dtype).
    const auto x32 = x.to(torch::kFloat32);
    EXPECT_LE(max_diff(psgd::factor_gram(x32, 1, true).to(torch::kFloat64), rows1.mm(rows1.t())), 2e-3);
  }
  const torch::Tensor y = torch::randn({2, 770, 3}, torch::kFloat64);
  std::vector<torch::Tensor> qs{torch::rand({2}, torch::kFloat64) + 0.5, upper_factor(770),
                                torch::rand({3}, torch::kFloat64) + 0.5};
  const auto scaled = y * qs[0].view({2, 1, 1}) * qs[2].view({1, 1, 3});
  EXPECT_LE(max_diff(psgd::apply_q(y, qs, /*batched=*/false, true), along(scaled, qs[1], 1)), 1e-12);
  const auto p_ref = along(y * qs[0].square().view({2, 1, 1}) * qs[2].square().view({1, 1, 3}), qs[1].t().mm(qs[1]), 1);
  EXPECT_LE(max_diff(psgd::apply_p(y, qs, /*batched=*/false, true), p_ref), 1e-12);
  const auto rows = y.movedim(1, 0).reshape({770, -1});
  EXPECT_LE(max_diff(psgd::factor_gram(y, 1, true), rows.mm(rows.t())), 1e-11);
}

// Rank >= 3 with every factor dense (a conv weight) takes the rotating path:
// each axis contracted as the last one and moved to the front.
TEST(PsgdBlocked, RotatingContractionsMatchPerAxis) {
  torch::manual_seed(5);
  // (60, 4, 3, 2): P_0 applied as Q_0 then Q_0^T (0.6 d^2 > numel), the
  // others as the formed P_i; (5, 6, 7): every P_i formed.
  for (const auto& shape : {std::vector<int64_t>{60, 4, 3, 2}, std::vector<int64_t>{5, 6, 7}}) {
    for (const bool triangular : {false, true}) {
      const torch::Tensor x = torch::randn(shape, torch::kFloat64);
      std::vector<torch::Tensor> qs;
      for (const auto d : shape) {
        torch::Tensor q = upper_factor(d);
        qs.push_back(triangular ? q : q + 0.1 * torch::randn_like(q) / std::sqrt(d));
      }
      torch::Tensor ref_q = x;
      torch::Tensor ref_p = x;
      torch::Tensor ref_s = x;
      for (size_t i = 0; i < qs.size(); ++i) {
        const auto axis = static_cast<int64_t>(i);
        ref_q = along(ref_q, qs[i], axis);
        ref_p = along(ref_p, qs[i].t().mm(qs[i]), axis);
        ref_s = along(ref_s, torch::linalg_inv(qs[i]).t(), axis);  // fibers times q^{-1}
      }
      EXPECT_LE(max_diff(psgd::apply_q(x, qs, /*batched=*/false, triangular), ref_q), 1e-12) << triangular;
      EXPECT_LE(max_diff(psgd::apply_p(x, qs, /*batched=*/false, triangular), ref_p), 1e-12) << triangular;
      if (triangular) {
        EXPECT_LE(max_diff(psgd::solve_q_right(x, qs), ref_s), 1e-12);
      }
      EXPECT_TRUE(psgd::apply_p(x, qs).is_contiguous());
    }
  }
}

TEST(PsgdBlocked, FactorUpdatesMatchPlainFormulas) {
  torch::manual_seed(4);
  const int64_t d = 530;
  const double tiny = std::numeric_limits<double>::min();
  const torch::Tensor x = torch::randn({d, 60}, torch::kFloat64);
  const torch::Tensor c = torch::randn({d, 60}, torch::kFloat64);
  const torch::Tensor t1 = x.mm(x.t());
  const torch::Tensor t2 = c.mm(c.t());
  // EQ: q - eta triu(t1 - t2) q, eta = lr / (lower bound of t1 + t2).
  {
    psgd::FactorUpdateOptions options;
    options.geometry = psgd::Geometry::EQ;
    options.track_lipschitz = false;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
    auto gen_ref = at::make_generator<at::CPUGeneratorImpl>(11);
    const torch::Tensor q0 = upper_factor(d);
    torch::Tensor q = q0.clone();
    torch::Tensor lip = torch::zeros({}, torch::kFloat64);
    psgd::update_factor_(q, t1, t2, lip, options, gen);
    const auto eta = options.lr / (psgd::norm_lower_bound_spd(t1 + t2, gen_ref) + tiny);
    const auto ref = q0 - eta * torch::triu(t1 - t2).mm(q0);
    EXPECT_LE(max_diff(q, ref), 1e-12);
    EXPECT_GT(max_diff(q, q0), 1e-3);                                    // the step is not negligible
    EXPECT_EQ(max_diff(torch::tril(q, -1), torch::zeros_like(q)), 0.0);  // stays triangular
  }
  // Q0.5EQ1.5 before its Procrustes step: Q - eta (T1r Q - T2 Q), T1r =
  // T1 + damping (every entry), T2 = numel / d, eta = lr / (||T1r||_lb + T2).
  {
    psgd::FactorUpdateOptions options;
    options.geometry = psgd::Geometry::Q0p5EQ1p5;
    options.track_lipschitz = false;
    options.damping = 1e-3;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(13);
    auto gen_ref = at::make_generator<at::CPUGeneratorImpl>(13);
    const torch::Tensor q0 =
        torch::eye(d, torch::kFloat64) + 0.2 * torch::randn({d, d}, torch::kFloat64) / std::sqrt(d);
    torch::Tensor q = q0.clone();
    torch::Tensor lip = torch::zeros({}, torch::kFloat64);
    const auto t2s = torch::scalar_tensor(60.0 / d * 400.0, torch::kFloat64);
    const torch::Tensor scratch = t1.clone();
    psgd::update_factor_(q, scratch, t2s, lip, options, gen);  // overwrites its t1
    const auto t1r = t1 + options.damping;
    const auto eta = options.lr / (psgd::norm_lower_bound_spd(t1r, gen_ref) + t2s + tiny);
    torch::Tensor ref = q0 - eta * (t1r.mm(q0) - t2s * q0);
    psgd::procrustes_step_(ref, gen_ref, 0.125);
    EXPECT_LE(max_diff(q, ref), 1e-12);
    EXPECT_GT(max_diff(q, q0), 1e-3);
  }
  // Procrustes: Q + a (R Q + a/2 R R Q), R = (Q^T - Q) / ||Q^T - Q||_lb.
  {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(12);
    auto gen_ref = at::make_generator<at::CPUGeneratorImpl>(12);
    const torch::Tensor q0 =
        torch::eye(d, torch::kFloat64) + 0.2 * torch::randn({d, d}, torch::kFloat64) / std::sqrt(d);
    torch::Tensor q = q0.clone();
    psgd::procrustes_step_(q, gen, 0.125);
    torch::Tensor r = q0.t() - q0;
    r = r / (psgd::norm_lower_bound_skh(r, gen_ref) + tiny);
    const auto rq = r.mm(q0);
    const auto rrq = r.mm(rq);
    const auto tr_rq = rq.diagonal().sum();
    const auto tr_rrq = rrq.diagonal().sum();
    const auto a = torch::where(tr_rrq < 0, torch::clamp_max(-tr_rq / tr_rrq, 0.125),
                                torch::scalar_tensor(0.125, torch::kFloat64));
    const auto ref = q0 + a * (rq + 0.5 * a * rrq);
    EXPECT_LE(max_diff(q, ref), 1e-12);
    EXPECT_GT(max_diff(q, q0), 1e-3);
  }
}

// R = Q^T - Q of one matrix (the Kron Procrustes step; WhiteKron's tile
// stacks are tested in test_white_kron_fused.cpp): bitwise ATen's, row-major,
// with max |R| as the returned scale; a strided q takes ATen's path.
TEST(PsgdBlocked, SkewPartOfOneMatrixMatchesAten) {
  torch::manual_seed(7);
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const int64_t n : {1, 17, 300}) {
      const torch::Tensor q = torch::randn({n, n}, dtype);
      const torch::Tensor want = q.t() - q;
      torch::Tensor out = torch::empty_like(q);
      const torch::Tensor largest = psgd::skew_part(out, q);
      EXPECT_TRUE(torch::equal(out, want)) << n;
      EXPECT_TRUE(out.is_contiguous());
      EXPECT_EQ(largest.dim(), 0);
      EXPECT_EQ(largest.item<double>(), want.abs().max().item<double>()) << n;
      torch::Tensor out2 = torch::empty_like(q);
      psgd::skew_part(out2, q.t());  // strided: ATen
      EXPECT_TRUE(torch::equal(out2, q - q.t())) << n;
    }
  }
}
