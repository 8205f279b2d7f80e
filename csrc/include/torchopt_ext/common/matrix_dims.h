// Per-tensor dimension specs for the matrix optimizers (rollfast.md §3.1
// "dimension numbers"): which axes of a param are reduction (input-feature)
// axes, which are output-feature axes and which index independent matrices.
// The matrix core sees the param as a batch of (rows = prod(output),
// cols = prod(reduction)) matrices, torch's (out, in) orientation, so the
// default 2-D spec is output = {0}, reduction = {1}.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace torchopt_ext::common {

struct MatrixDims {
  std::vector<int64_t> reduction;  // input features: the columns
  std::vector<int64_t> output;     // output features: the rows
  std::vector<int64_t> batch;      // one independent matrix per index
  friend bool operator==(const MatrixDims& lhs, const MatrixDims& rhs) {
    return lhs.reduction == rhs.reduction && lhs.output == rhs.output && lhs.batch == rhs.batch;
  }
};

// Checks a spec on its own: reduction and output non-empty, axes >= 0, each
// axis used once, and together exactly 0..ndim-1. Errors name `argument`.
void check_matrix_dims(const MatrixDims& dims, const char* argument);

// The number of axes a spec describes (the ndim of the params it fits).
int64_t matrix_dims_ndim(const MatrixDims& dims);

// Flat encoding used by the op schemas (one int list for a whole param list):
// per param either [-1] (the default: rows = dim 0, cols = the rest) or
// [n_red, red..., n_out, out..., n_batch, batch...].
void encode_matrix_dims(const std::optional<MatrixDims>& dims, std::vector<int64_t>& out);
std::vector<int64_t> encode_matrix_dims(const std::optional<MatrixDims>& dims);
// Decodes `count` entries (an empty list means all default); errors name `argument`.
std::vector<std::optional<MatrixDims>> decode_matrix_dims(c10::IntArrayRef flat, size_t count, const char* argument);

// How one param maps onto its matrices.
struct MatrixLayout {
  bool batched = false;       // a spec was given: matrices are (batch, rows, cols)
  std::vector<int64_t> perm;  // batch..., output..., reduction...
  std::vector<int64_t> permuted_sizes;
  int64_t batch = 1;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Without a spec: rows = sizes[0], cols = the product of the rest (2-D
// result). With one: the spec must have sizes.size() axes (else an error
// naming `argument`).
MatrixLayout matrix_layout(c10::IntArrayRef sizes, const std::optional<MatrixDims>& dims, const char* argument);

// A param-shaped tensor as its matrices: (rows, cols) without a spec, a
// contiguous (batch, rows, cols) copy with one (so each matrix is laid out
// exactly as a 2-D param of that shape would be).
at::Tensor to_matrices(const at::Tensor& t, const MatrixLayout& layout);
// The inverse of to_matrices, back to `sizes`.
at::Tensor from_matrices(const at::Tensor& m, const MatrixLayout& layout, c10::IntArrayRef sizes);

}  // namespace torchopt_ext::common
