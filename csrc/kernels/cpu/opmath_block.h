// Reduced-precision storage, fp32 math: a chunk is processed in small blocks
// that are widened to the opmath type (float for bf16/fp16/fp32, double for
// fp64) and narrowed back on store. fp32/fp64 storage is used in place.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace torchopt_ext::kernels::cpu {

// Elements per inner block; five opmath buffers of this size stay in L1.
inline constexpr int64_t kBlockNumel = 512;

// SplitMix64 finaliser: a counter-based hash, so the random bits for element i
// do not depend on how the work was split across threads.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Stochastic rounding of an fp32 value to bf16: adding 16 uniform random bits
// below the kept mantissa and truncating rounds up with probability equal to
// the discarded fraction, so the rounding is unbiased in expectation.
inline c10::BFloat16 round_bf16_stochastic(float value, uint32_t random16) {
  if (!std::isfinite(value)) {
    return c10::BFloat16(value);
  }
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = bits + (random16 & 0xFFFFu);
  // Rounding a finite value up past the largest bf16 keeps the sign and gives
  // inf, the same as round-to-nearest does for values that large.
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// A view of `n` elements of storage type T as opmath values: aliases the
// storage when T already is the opmath type, copies through `buffer` otherwise.
template <typename T>
class OpmathBlock {
 public:
  using opmath_t = at::opmath_type<T>;

  OpmathBlock(T* storage, opmath_t* buffer, int64_t n) : storage_(storage), n_(n) {
    if constexpr (std::is_same_v<T, opmath_t>) {
      data_ = storage;
      (void)buffer;
    } else {
      data_ = buffer;
      int64_t i = 0;
      if constexpr (kReducedFloat) {
        for (; i + RVec::size() <= n; i += RVec::size()) {
          auto [low, high] = at::vec::convert_to_float<T>(RVec::loadu(storage + i));
          low.store(buffer + i);
          high.store(buffer + i + FVec::size());
        }
      }
      for (; i < n; ++i) {
        buffer[i] = static_cast<opmath_t>(storage[i]);
      }
    }
  }

  opmath_t* data() const { return data_; }

  // Round-to-nearest store (a no-op when aliasing).
  void store() const {
    if constexpr (!std::is_same_v<T, opmath_t>) {
      int64_t i = 0;
      if constexpr (kReducedFloat) {
        for (; i + RVec::size() <= n_; i += RVec::size()) {
          at::vec::convert_from_float<T>(FVec::loadu(data_ + i), FVec::loadu(data_ + i + FVec::size()))
              .store(storage_ + i);
        }
      }
      for (; i < n_; ++i) {
        storage_[i] = static_cast<T>(data_[i]);
      }
    }
  }

  // Stochastic rounding for bf16 storage; other types round to nearest.
  // `stream` identifies the tensor and step, `offset` the block's first element.
  void store_stochastic(uint64_t stream, int64_t offset) const {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      for (int64_t i = 0; i < n_; ++i) {
        const auto random = static_cast<uint32_t>(mix64(stream ^ static_cast<uint64_t>(offset + i)));
        storage_[i] = round_bf16_stochastic(data_[i], random);
      }
    } else {
      (void)stream;
      (void)offset;
      store();
    }
  }

 private:
  // bf16/fp16 widen and narrow a full vector at a time (one Vectorized<T>
  // holds two Vectorized<float> worth of lanes).
  static constexpr bool kReducedFloat = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  using FVec = at::vec::Vectorized<float>;
  using RVec = at::vec::Vectorized<T>;

  T* storage_;
  opmath_t* data_;
  int64_t n_;
};

// GradScaler contract: grads are divided by the loss scale and the unscaled
// values written back to the grad tensor.
template <typename T>
inline void unscale_grad_block(const OpmathBlock<T>& grad, typename OpmathBlock<T>::opmath_t scale, int64_t n) {
  auto* g = grad.data();
  for (int64_t i = 0; i < n; ++i) {
    g[i] = g[i] / scale;
  }
  grad.store();
}

// Per-tensor random stream for stochastic rounding: the user's seed, the
// tensor's position in its group and the step count, hashed together.
inline uint64_t rounding_stream(int64_t seed, int64_t tensor_index, double step) {
  return mix64(mix64(static_cast<uint64_t>(seed)) ^ mix64(static_cast<uint64_t>(tensor_index) << 32) ^
               static_cast<uint64_t>(step));
}

}  // namespace torchopt_ext::kernels::cpu
