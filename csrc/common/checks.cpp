#include "common/checks.h"

#include <utility>
#include <string>

namespace edgespec {

namespace {
std::string str(std::int64_t v) { return std::to_string(v); }

// Offsets (in elements) of the first and one past the last element a view can touch.
void extent(const TensorView& v, std::int64_t* lo, std::int64_t* hi) {
  std::int64_t low = 0, high = 0;
  for (int i = 0; i < v.rank; ++i) {
    const std::int64_t reach = (v.shape[i] - 1) * v.strides[i];
    if (reach < 0) low += reach; else high += reach;
  }
  *lo = low;
  *hi = high + 1;
}
}  // namespace

Status check_view(const TensorView& v, const char* name, int rank) {
  if (v.rank != rank) {
    return Status::invalid(std::string(name) + ": expected " + str(rank) + " dims, got " +
                           str(v.rank) + " (" + shape_string(v) + ")");
  }
  for (int i = 0; i < v.rank; ++i) {
    if (v.shape[i] < 0) return Status::invalid(std::string(name) + ": negative size in " + shape_string(v));
  }
  if (v.device < 0) {
    return Status::invalid(std::string(name) + ": device index " + str(v.device) + " is not a CUDA device");
  }
  if (v.numel() > 0 && v.data == 0) return Status::invalid(std::string(name) + ": null data pointer");
  if (v.numel() > 0 && v.data % static_cast<std::uint64_t>(dtype_size(v.dtype)) != 0) {
    return Status::invalid(std::string(name) + ": data pointer is not aligned to its " +
                           dtype_name(v.dtype) + " element size");
  }
  return Status::success();
}

Status check_dtype(const TensorView& v, const char* name, DType expected, const char* why) {
  if (v.dtype == expected) return Status::success();
  return Status::invalid(std::string(name) + ": expected dtype " + dtype_name(expected) + " (" + why +
                         "), got " + dtype_name(v.dtype));
}

Status check_dtype_in(const TensorView& v, const char* name, std::initializer_list<DType> allowed) {
  std::string names;
  for (DType d : allowed) {
    if (d == v.dtype) return Status::success();
    names += names.empty() ? "" : ", ";
    names += dtype_name(d);
  }
  return Status::invalid(std::string(name) + ": expected dtype in {" + names + "}, got " +
                         dtype_name(v.dtype));
}

Status check_same_device(const TensorView& first, const char* first_name, const TensorView& other,
                         const char* other_name) {
  if (first.device == other.device) return Status::success();
  return Status::invalid(std::string(other_name) + " is on cuda:" + str(other.device) + " but " +
                         first_name + " is on cuda:" + str(first.device));
}

Status check_size(const TensorView& v, const char* name, int dim, std::int64_t expected,
                  const char* what) {
  if (v.size(dim) == expected) return Status::success();
  return Status::invalid(std::string(name) + ": dim " + str(dim) + " has size " + str(v.size(dim)) +
                         ", expected " + str(expected) + " (" + what + ")");
}

Status check_same_shape(const TensorView& v, const char* name, const TensorView& ref,
                        const char* ref_name) {
  bool same = v.rank == ref.rank;
  for (int i = 0; same && i < v.rank; ++i) same = v.shape[i] == ref.shape[i];
  if (same) return Status::success();
  return Status::invalid(std::string(name) + " has shape " + shape_string(v) + " but " + ref_name +
                         " has " + shape_string(ref));
}

Status check_rows_contiguous(const TensorView& v, const char* name) {
  if (v.rank > 0 && v.size(-1) > 1 && v.stride(-1) != 1) {
    return Status::invalid(std::string(name) + ": last dim must have stride 1, got strides of " +
                           describe(v));
  }
  for (int i = 0; i < v.rank; ++i) {
    if (v.strides[i] < 0) {
      return Status::invalid(std::string(name) + ": negative stride in " + describe(v));
    }
  }
  return Status::success();
}

Status check_no_self_overlap(const TensorView& v, const char* name) {
  int dims[kMaxRank];
  int n = 0;
  for (int i = 0; i < v.rank; ++i) {
    if (v.shape[i] > 1) dims[n++] = i;
  }
  // Insertion sort by stride: at most kMaxRank entries.
  for (int i = 1; i < n; ++i) {
    for (int j = i; j > 0 && v.strides[dims[j]] < v.strides[dims[j - 1]]; --j) std::swap(dims[j], dims[j - 1]);
  }
  std::int64_t span = 0;  // largest offset reachable with the dims examined so far
  for (int i = 0; i < n; ++i) {
    const std::int64_t stride = v.strides[dims[i]];
    if (stride <= span) {
      return Status::invalid(std::string(name) + ": elements overlap in memory (" + describe(v) +
                             "); outputs need distinct addresses");
    }
    span += (v.shape[dims[i]] - 1) * stride;
  }
  return Status::success();
}

Status check_contiguous(const TensorView& v, const char* name) {
  std::int64_t expected = 1;
  for (int i = v.rank - 1; i >= 0; --i) {
    if (v.shape[i] != 1 && v.strides[i] != expected) {
      return Status::invalid(std::string(name) + ": expected a contiguous tensor, got " + describe(v));
    }
    expected *= v.shape[i];
  }
  return Status::success();
}

Status check_disjoint(const TensorView& out, const char* out_name, const TensorView& in,
                      const char* in_name) {
  if (out.numel() == 0 || in.numel() == 0) return Status::success();
  std::int64_t olo, ohi, ilo, ihi;
  extent(out, &olo, &ohi);
  extent(in, &ilo, &ihi);
  const std::int64_t os = dtype_size(out.dtype), is = dtype_size(in.dtype);
  const std::uint64_t out_begin = out.data + olo * os, out_end = out.data + ohi * os;
  const std::uint64_t in_begin = in.data + ilo * is, in_end = in.data + ihi * is;
  if (out_end <= in_begin || in_end <= out_begin) return Status::success();
  return Status::invalid(std::string(out_name) + " overlaps " + in_name +
                         " in memory; the kernel is out-of-place");
}

Status check_fits(std::int64_t value, std::int64_t limit, const char* what) {
  if (value <= limit) return Status::success();
  return Status::unsupported(std::string(what) + " is " + str(value) + ", above the limit of " +
                             str(limit) + " of this kernel's launch shape");
}

}  // namespace edgespec
