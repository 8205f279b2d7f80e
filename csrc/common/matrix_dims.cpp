#include "torchopt_ext/common/matrix_dims.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace torchopt_ext::common {

int64_t matrix_dims_ndim(const MatrixDims& dims) {
  return static_cast<int64_t>(dims.reduction.size() + dims.output.size() + dims.batch.size());
}

void check_matrix_dims(const MatrixDims& dims, const char* argument) {
  TORCH_CHECK_VALUE(!dims.reduction.empty(), "invalid ", argument, ": the reduction axes must not be empty");
  TORCH_CHECK_VALUE(!dims.output.empty(), "invalid ", argument, ": the output axes must not be empty");
  const int64_t ndim = matrix_dims_ndim(dims);
  std::vector<int> seen(static_cast<size_t>(ndim), 0);
  for (const auto* axes : {&dims.reduction, &dims.output, &dims.batch}) {
    for (const int64_t axis : *axes) {
      TORCH_CHECK_VALUE(axis >= 0 && axis < ndim, "invalid ", argument, ": axis ", axis,
                        " is out of range: the spec has ", ndim, " axes, so they must be 0..", ndim - 1);
      TORCH_CHECK_VALUE(seen[static_cast<size_t>(axis)]++ == 0, "invalid ", argument, ": axis ", axis,
                        " appears more than once (reduction, output and batch axes must not overlap)");
    }
  }
  // ndim distinct axes in [0, ndim): every axis is covered, none is missing.
}

void encode_matrix_dims(const std::optional<MatrixDims>& dims, std::vector<int64_t>& out) {
  if (!dims) {
    out.push_back(-1);
    return;
  }
  for (const auto* axes : {&dims->reduction, &dims->output, &dims->batch}) {
    out.push_back(static_cast<int64_t>(axes->size()));
    out.insert(out.end(), axes->begin(), axes->end());
  }
}

std::vector<int64_t> encode_matrix_dims(const std::optional<MatrixDims>& dims) {
  std::vector<int64_t> out;
  encode_matrix_dims(dims, out);
  return out;
}

std::vector<std::optional<MatrixDims>> decode_matrix_dims(c10::IntArrayRef flat, size_t count, const char* argument) {
  std::vector<std::optional<MatrixDims>> specs(count);
  if (flat.empty()) {
    return specs;
  }
  size_t pos = 0;
  auto next = [&]() {
    TORCH_CHECK_VALUE(pos < flat.size(), "invalid ", argument, ": the encoded specs end early");
    return flat[pos++];
  };
  for (size_t i = 0; i < count; ++i) {
    const int64_t first = next();
    if (first == -1) {
      continue;
    }
    MatrixDims dims;
    int64_t n = first;
    for (auto* axes : {&dims.reduction, &dims.output, &dims.batch}) {
      TORCH_CHECK_VALUE(n >= 0, "invalid ", argument, ": negative axis count ", n);
      for (int64_t k = 0; k < n; ++k) {
        axes->push_back(next());
      }
      if (axes != &dims.batch) {
        n = next();
      }
    }
    check_matrix_dims(dims, argument);
    specs[i] = std::move(dims);
  }
  TORCH_CHECK_VALUE(pos == flat.size(), "invalid ", argument, ": ", flat.size() - pos, " values left over after ",
                    count, " specs");
  return specs;
}

MatrixLayout matrix_layout(c10::IntArrayRef sizes, const std::optional<MatrixDims>& dims, const char* argument) {
  MatrixLayout layout;
  const auto ndim = static_cast<int64_t>(sizes.size());
  if (!dims) {
    TORCH_CHECK_VALUE(ndim >= 2, "invalid ", argument, ": a tensor of shape ", sizes, " is not a matrix");
    layout.rows = sizes[0];
    layout.cols = 1;
    for (int64_t d = 1; d < ndim; ++d) {
      layout.cols *= sizes[d];
    }
    return layout;
  }
  TORCH_CHECK_VALUE(matrix_dims_ndim(*dims) == ndim, "invalid ", argument, ": the spec has ", matrix_dims_ndim(*dims),
                    " axes but the param has shape ", sizes);
  layout.batched = true;
  layout.rows = 1;
  layout.cols = 1;
  for (const int64_t axis : dims->batch) {
    layout.batch *= sizes[axis];
    layout.perm.push_back(axis);
  }
  for (const int64_t axis : dims->output) {
    layout.rows *= sizes[axis];
    layout.perm.push_back(axis);
  }
  for (const int64_t axis : dims->reduction) {
    layout.cols *= sizes[axis];
    layout.perm.push_back(axis);
  }
  for (const int64_t axis : layout.perm) {
    layout.permuted_sizes.push_back(sizes[axis]);
  }
  return layout;
}

at::Tensor to_matrices(const at::Tensor& t, const MatrixLayout& layout) {
  if (!layout.batched) {
    return t.reshape({layout.rows, layout.cols});
  }
  return t.permute(layout.perm).contiguous().view({layout.batch, layout.rows, layout.cols});
}

at::Tensor from_matrices(const at::Tensor& m, const MatrixLayout& layout, c10::IntArrayRef sizes) {
  if (!layout.batched) {
    return m.reshape(sizes);
  }
  std::vector<int64_t> inverse(layout.perm.size());
  for (size_t i = 0; i < layout.perm.size(); ++i) {
    inverse[static_cast<size_t>(layout.perm[i])] = static_cast<int64_t>(i);
  }
  return m.reshape(layout.permuted_sizes).permute(inverse);
}

}  // namespace torchopt_ext::common
