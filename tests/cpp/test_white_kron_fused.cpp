// The fused WhiteKron passes (functional/white_kron_fused.h) must be bit for
// bit the ATen chains they replaced: checked here on contiguous float32 /
// float64 stacks (the CPU loops) and on non-contiguous views of the same
// values (the ATen fallback that CUDA tensors take), with NaN and inf mixed
// in, odd tile sizes (partial cache blocks) and 1 and 2 threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/functional/white_kron_fused.h"

namespace {

namespace fused = torchopt_ext::functional::white_kron_fused;

at::Tensor bcast(const at::Tensor& v) { return v.view({-1, 1, 1}); }

// Same bits everywhere but inside NaNs (their sign / payload is not part of
// the contract): same NaN positions, every other value bitwise equal.
void expect_bitwise(const at::Tensor& got, const at::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  ASSERT_TRUE(at::equal(got.isnan(), want.isnan())) << what << ": NaN positions differ";
  const at::Tensor keep = want.isnan().logical_not();
  const auto bits = got.scalar_type() == at::kDouble ? at::kLong : at::kInt;
  EXPECT_TRUE(at::equal(got.masked_select(keep).view(bits), want.masked_select(keep).view(bits)))
      << what << ": values differ";
}

// Same values, non-contiguous: the fused functions then run the ATen chain.
at::Tensor strided(const at::Tensor& x) { return x.transpose(1, 2).contiguous().transpose(1, 2); }

// A stack with a few NaN / inf entries in tile 0 (tile 1 stays finite).
at::Tensor stack(at::IntArrayRef shape, at::ScalarType type, bool specials) {
  at::Tensor x = at::randn(shape, at::TensorOptions().dtype(type));
  if (specials) {
    x[0][1][2] = std::numeric_limits<double>::quiet_NaN();
    x[0][2][0] = std::numeric_limits<double>::infinity();
    x[0][0][3] = -std::numeric_limits<double>::infinity();
  }
  return x;
}

struct Case {
  at::ScalarType type;
  std::vector<int64_t> shape;
};

std::vector<Case> cases() {
  std::vector<Case> out;
  for (auto type : {at::kFloat, at::kDouble}) {
    for (std::vector<int64_t> shape : {std::vector<int64_t>{3, 37, 37}, {2, 16, 16}, {4, 5, 5}, {2, 64, 64}}) {
      out.push_back({type, shape});
    }
  }
  return out;
}

template <typename F>
void for_threads(const F& body) {
  const int threads = at::get_num_threads();
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    body(t);
  }
  at::set_num_threads(threads);
}

TEST(WhiteKronFused, NoisyMatchesAten) {
  at::manual_seed(0);
  for_threads([](int threads) {
    for (const auto& c : cases()) {
      for (bool specials : {false, true}) {
        const at::Tensor g = stack(c.shape, c.type, specials);
        const at::Tensor noise = stack(c.shape, at::kDouble, specials);  // draws are float64
        const double scale = 1e-3;
        const at::Tensor want = noise.to(c.type).clone().mul_(scale).add_(g);  // (to: no copy for float64)
        const std::string what = "noisy " + std::string(c10::toString(c.type)) + " threads " + std::to_string(threads);
        at::Tensor out = at::empty_like(g);
        fused::noisy_(out, noise, scale, g);
        expect_bitwise(out, want, what);
        at::Tensor out2 = strided(at::empty_like(g));
        fused::noisy_(out2, strided(noise), scale, strided(g));
        expect_bitwise(out2, want, what + " (fallback)");
        // The noise already in the math type.
        at::Tensor out3 = at::empty_like(g);
        fused::noisy_(out3, noise.to(c.type), scale, g);
        expect_bitwise(out3, want, what + " (math-type noise)");
      }
    }
  });
}

TEST(WhiteKronFused, DescendMatchesAten) {
  at::manual_seed(1);
  for_threads([](int threads) {
    for (const auto& c : cases()) {
      const auto options = at::TensorOptions().dtype(c.type);
      const at::Tensor t1q = stack(c.shape, c.type, true);
      const at::Tensor q = stack(c.shape, c.type, false);
      const at::Tensor t2 = at::rand({c.shape[0]}, options) * 40;
      const at::Tensor z = at::rand({c.shape[0]}, options) * 0.01;
      const at::Tensor want = t1q.clone().sub_(bcast(t2) * q).mul_(-bcast(z)).add_(q);
      const std::string what = "descend " + std::string(c10::toString(c.type)) + " threads " + std::to_string(threads);
      at::Tensor out = t1q.clone();
      fused::descend_(out, q, t2, z);
      expect_bitwise(out, want, what);
      at::Tensor out2 = strided(t1q);
      fused::descend_(out2, strided(q), t2, z);
      expect_bitwise(out2, want, what + " (fallback)");
    }
  });
}

TEST(WhiteKronFused, SkewPartMatchesAten) {
  at::manual_seed(2);
  for_threads([](int threads) {
    for (const auto& c : cases()) {
      for (bool specials : {false, true}) {
        const at::Tensor q = stack(c.shape, c.type, specials);
        const at::Tensor want = q.transpose(1, 2) - q;
        const at::Tensor want_max = at::maximum(want.amax({1, 2}), want.amin({1, 2}).neg());
        const std::string what = "skew_part " + std::string(c10::toString(c.type)) + " threads " +
                                 std::to_string(threads) + (specials ? " specials" : "");
        at::Tensor out = at::empty_like(q);
        expect_bitwise(torchopt_ext::common::psgd::skew_part(out, q), want_max, what + " max");
        expect_bitwise(out, want, what);
        at::Tensor out2 = strided(at::empty_like(q));
        expect_bitwise(torchopt_ext::common::psgd::skew_part(out2, strided(q)), want_max, what + " max (fallback)");
        expect_bitwise(out2, want, what + " (fallback)");
        if (specials) {
          EXPECT_TRUE(want_max[0].isnan().item<bool>()) << what;  // the NaN tile reports NaN
          EXPECT_TRUE(std::isfinite(want_max[1].item<double>())) << what;
        }
      }
    }
  });
}

TEST(WhiteKronFused, RotateMatchesAten) {
  at::manual_seed(3);
  for_threads([](int threads) {
    for (const auto& c : cases()) {
      const auto options = at::TensorOptions().dtype(c.type);
      const int64_t t = c.shape[0];
      const at::Tensor rrq = stack(c.shape, c.type, true);
      const at::Tensor rq = stack(c.shape, c.type, false);
      const at::Tensor q = stack(c.shape, c.type, false);
      const at::Tensor a = at::rand({t}, options) * 0.125;
      const at::Tensor half_a = 0.5 * a;
      // Tiles alternate: rotated, kept.
      const at::Tensor take = at::arange(t, at::kLong).remainder(2) == 0;
      at::Tensor moved = rrq.clone().mul_(bcast(half_a)).add_(rq).mul_(bcast(a)).add_(q);
      const at::Tensor want = at::where(bcast(take), moved, q);
      const std::string what = "rotate " + std::string(c10::toString(c.type)) + " threads " + std::to_string(threads);
      at::Tensor out = rrq.clone();
      fused::rotate_(out, rq, q, half_a, a, take);
      expect_bitwise(out, want, what);
      at::Tensor out2 = strided(rrq);
      fused::rotate_(out2, strided(rq), strided(q), half_a, a, take);
      expect_bitwise(out2, want, what + " (fallback)");
    }
  });
}

TEST(WhiteKronFused, SymmetrizeMatchesAten) {
  at::manual_seed(4);
  for_threads([](int threads) {
    for (const auto& c : cases()) {
      at::Tensor x = stack(c.shape, c.type, true);
      // x + x overflows to inf on the diagonal, as in ATen.
      x[1][0][0] = c.type == at::kFloat ? static_cast<double>(std::numeric_limits<float>::max())
                                        : std::numeric_limits<double>::max();
      const at::Tensor want = x.add(x.transpose(1, 2)).mul_(0.5);
      const std::string what =
          "symmetrize " + std::string(c10::toString(c.type)) + " threads " + std::to_string(threads);
      at::Tensor out = x.clone();
      fused::symmetrize_(out);
      expect_bitwise(out, want, what);
      EXPECT_TRUE(std::isinf(out[1][0][0].item<double>())) << what;
      at::Tensor out2 = strided(x);
      fused::symmetrize_(out2);
      expect_bitwise(out2, want, what + " (fallback)");
    }
  });
}

}  // namespace
