// Checked entry point of the RoPE family (host only; the kernel lives in rope.cuh).
#include "kernels/rope.h"

#include <limits>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

namespace {

constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();

Status check_heads(const TensorView& v, const char* name, const TensorView& q) {
  EDGESPEC_RETURN_IF_ERROR(check_view(v, name, 3));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(v, name));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(v, name, q.dtype, "the dtype of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(v, name, 0, q.size(0), "the token count of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(v, name, 2, q.size(2), "the head dim of q"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(v.size(1), kIntMax, "rope: number of heads"));
  return check_same_device(q, "q", v, name);
}

Status check_table(const TensorView& v, const char* name, const TensorView& q) {
  EDGESPEC_RETURN_IF_ERROR(check_view(v, name, 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(v, name));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(v, name, DType::kFloat32, "rope tables are fp32"));
  return check_same_device(q, "q", v, name);
}

Status check_rope(const RopeArgs& a) {
  const TensorView& q = a.q;
  EDGESPEC_RETURN_IF_ERROR(check_view(q, "q", 3));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(q, "q", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  EDGESPEC_RETURN_IF_ERROR(check_fits(q.size(1), kIntMax, "rope: number of heads"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(q.size(2), kIntMax, "rope: head dim"));
  EDGESPEC_RETURN_IF_ERROR(check_heads(a.k, "k", q));
  EDGESPEC_RETURN_IF_ERROR(check_heads(a.q_out, "q_out", q));
  EDGESPEC_RETURN_IF_ERROR(check_heads(a.k_out, "k_out", q));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.q_out, "q_out", q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.k_out, "k_out", a.k, "k"));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.positions, "positions", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(a.positions, "positions", {DType::kInt32, DType::kInt64}));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.positions, "positions", 0, q.size(0), "one position per token of q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", a.positions, "positions"));

  EDGESPEC_RETURN_IF_ERROR(check_table(a.cos, "cos", q));
  EDGESPEC_RETURN_IF_ERROR(check_table(a.sin, "sin", q));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.sin, "sin", a.cos, "cos"));
  const std::int64_t half = a.cos.size(1);
  if (half < 1 || 2 * half > q.size(2)) {
    return Status::invalid("cos: rotary dim 2 * " + std::to_string(half) + " must be in [2, head dim " +
                           std::to_string(q.size(2)) + "]");
  }

  const TensorView* outs[] = {&a.q_out, &a.k_out};
  const char* out_names[] = {"q_out", "k_out"};
  const TensorView* ins[] = {&a.q, &a.k, &a.positions, &a.cos, &a.sin};
  const char* in_names[] = {"q", "k", "positions", "cos", "sin"};
  for (int o = 0; o < 2; ++o) {
    EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(*outs[o], out_names[o]));
    for (int i = 0; i < 5; ++i) {
      EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[o], out_names[o], *ins[i], in_names[i]));
    }
  }
  return check_disjoint(a.q_out, "q_out", a.k_out, "k_out");
}

template <typename T, typename PosT>
RopeParams<T, PosT> make_params(const RopeArgs& a) {
  RopeParams<T, PosT> p;
  p.q = a.q.ptr<const T>();
  p.q_token_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  p.k = a.k.ptr<const T>();
  p.k_token_stride = a.k.stride(0);
  p.k_head_stride = a.k.stride(1);
  p.positions = a.positions.ptr<const PosT>();
  p.positions_stride = a.positions.stride(0);
  p.cos = a.cos.ptr<const float>();
  p.cos_row_stride = a.cos.stride(0);
  p.sin = a.sin.ptr<const float>();
  p.sin_row_stride = a.sin.stride(0);
  p.table_rows = a.cos.size(0);
  p.q_out = a.q_out.ptr<T>();
  p.q_out_token_stride = a.q_out.stride(0);
  p.q_out_head_stride = a.q_out.stride(1);
  p.k_out = a.k_out.ptr<T>();
  p.k_out_token_stride = a.k_out.stride(0);
  p.k_out_head_stride = a.k_out.stride(1);
  p.tokens = a.q.size(0);
  p.heads_q = static_cast<int>(a.q.size(1));
  p.heads_k = static_cast<int>(a.k.size(1));
  p.head_dim = static_cast<int>(a.q.size(2));
  p.rotary_half = static_cast<int>(a.cos.size(1));
  return p;
}

}  // namespace

Status apply_rope(const RopeArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_rope(args));
  if (args.q.numel() == 0 && args.k.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.q.device));
  return EDGESPEC_FLOAT_SWITCH(args.q.dtype, "apply_rope", T, [&] {
    return EDGESPEC_INDEX_SWITCH(args.positions.dtype, "apply_rope", PosT, [&] {
      return launch_rope<T, PosT>(make_params<T, PosT>(args), stream);
    });
  });
}

}  // namespace edgespec
