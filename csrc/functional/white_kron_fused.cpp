#include "torchopt_ext/functional/white_kron_fused.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>

// Built with -ffp-contract=off (CMakeLists.txt): a contracted a * b + c would
// round once where the ATen chains round twice.

namespace torchopt_ext::functional::white_kron_fused {

namespace {

constexpr int64_t kBlock = 16;  // cache block of the transposed reads

at::Tensor bcast(const at::Tensor& per_tile) { return per_tile.view({-1, 1, 1}); }

// One loop applies when every tensor is a contiguous CPU tensor of the
// stack's float / double type (per-tile vectors too, masks bool).
bool loop_ok(const at::Tensor& stack, std::initializer_list<at::Tensor> same,
             std::initializer_list<at::Tensor> per_tile, const at::Tensor& mask = at::Tensor()) {
  const auto type = stack.scalar_type();
  if (!stack.is_cpu() || (type != at::kFloat && type != at::kDouble) || stack.dim() != 3 || !stack.is_contiguous()) {
    return false;
  }
  for (const auto& x : same) {
    if (!x.is_cpu() || x.scalar_type() != type || !x.is_contiguous() || x.sizes() != stack.sizes()) {
      return false;
    }
  }
  for (const auto& x : per_tile) {
    if (!x.is_cpu() || x.scalar_type() != type || !x.is_contiguous() || x.numel() != stack.size(0)) {
      return false;
    }
  }
  return !mask.defined() ||
         (mask.is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == stack.size(0));
}

// body(tile index, offset of its first element), tiles over the threads.
template <typename F>
void for_tiles(const at::Tensor& stack, const F& body) {
  const int64_t per_tile = stack.size(1) * stack.size(2);
  at::parallel_for(0, stack.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      body(t, t * per_tile);
    }
  });
}

}  // namespace

void noisy_(const at::Tensor& out, const at::Tensor& noise, double noise_scale, const at::Tensor& g) {
  const bool ok = loop_ok(out, {g}, {}) && noise.is_cpu() && noise.is_contiguous() && noise.sizes() == out.sizes() &&
                  (noise.scalar_type() == at::kDouble || noise.scalar_type() == out.scalar_type());
  if (!ok) {
    out.copy_(noise).mul_(noise_scale).add_(g);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "white_kron_noisy_", [&] {
    // As ATen: the float64 draw rounds to the math type, the scalar too.
    const auto scale = static_cast<scalar_t>(noise_scale);
    const int64_t per_tile = out.size(1) * out.size(2);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* x = g.data_ptr<scalar_t>();
    auto run = [&](const auto* n) {
      for_tiles(out, [&](int64_t, int64_t base) {
        for (int64_t i = base; i < base + per_tile; ++i) {
          const auto v = static_cast<scalar_t>(n[i]) * scale;
          o[i] = v + x[i];
        }
      });
    };
    if (noise.scalar_type() == at::kDouble) {
      run(noise.data_ptr<double>());
    } else {
      run(noise.data_ptr<scalar_t>());
    }
  });
}

void descend_(const at::Tensor& out, const at::Tensor& q, const at::Tensor& t2, const at::Tensor& z) {
  if (!loop_ok(out, {q}, {t2, z})) {
    out.sub_(bcast(t2) * q).mul_(-bcast(z)).add_(q);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "white_kron_descend_", [&] {
    const int64_t per_tile = out.size(1) * out.size(2);
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* x = q.data_ptr<scalar_t>();
    const scalar_t* c = t2.data_ptr<scalar_t>();
    const scalar_t* s = z.data_ptr<scalar_t>();
    for_tiles(out, [&](int64_t t, int64_t base) {
      const scalar_t ct = c[t], nz = -s[t];
      for (int64_t i = base; i < base + per_tile; ++i) {
        const scalar_t d = o[i] - ct * x[i];
        const scalar_t e = d * nz;
        o[i] = e + x[i];
      }
    });
  });
}

void rotate_(const at::Tensor& x, const at::Tensor& rq, const at::Tensor& q, const at::Tensor& half_a,
             const at::Tensor& a, const at::Tensor& take) {
  if (!loop_ok(x, {rq, q}, {half_a, a}, take)) {
    x.mul_(bcast(half_a)).add_(rq).mul_(bcast(a)).add_(q);
    x.copy_(at::where(bcast(take), x, q));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "white_kron_rotate_", [&] {
    const int64_t per_tile = x.size(1) * x.size(2);
    scalar_t* o = x.data_ptr<scalar_t>();
    const scalar_t* r = rq.data_ptr<scalar_t>();
    const scalar_t* y = q.data_ptr<scalar_t>();
    const scalar_t* h = half_a.data_ptr<scalar_t>();
    const scalar_t* s = a.data_ptr<scalar_t>();
    const bool* k = take.data_ptr<bool>();
    for_tiles(x, [&](int64_t t, int64_t base) {
      if (!k[t]) {
        std::copy(y + base, y + base + per_tile, o + base);
        return;
      }
      const scalar_t ht = h[t], st = s[t];
      for (int64_t i = base; i < base + per_tile; ++i) {
        const scalar_t u = o[i] * ht + r[i];
        const scalar_t w = u * st;
        o[i] = w + y[i];
      }
    });
  });
}

void symmetrize_(const at::Tensor& x) {
  if (!loop_ok(x, {}, {}) || x.size(1) != x.size(2)) {
    x.copy_(x.add(x.transpose(1, 2)).mul_(0.5));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "white_kron_symmetrize_", [&] {
    const int64_t n = x.size(1);
    scalar_t* o = x.data_ptr<scalar_t>();
    const auto half = static_cast<scalar_t>(0.5);
    for_tiles(x, [&](int64_t, int64_t base) {
      scalar_t* p = o + base;
      // Upper blocks with their mirror; both entries from the old values.
      for (int64_t ib = 0; ib < n; ib += kBlock) {
        for (int64_t jb = ib; jb < n; jb += kBlock) {
          for (int64_t i = ib; i < std::min(ib + kBlock, n); ++i) {
            for (int64_t j = jb == ib ? i : jb; j < std::min(jb + kBlock, n); ++j) {
              const scalar_t v = (p[i * n + j] + p[j * n + i]) * half;
              p[i * n + j] = v;
              p[j * n + i] = v;
            }
          }
        }
      }
    });
  });
}

}  // namespace torchopt_ext::functional::white_kron_fused
