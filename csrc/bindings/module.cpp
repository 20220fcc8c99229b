// edgespec._C: the only pybind11 translation unit.
//
// Thin by design: convert Python integers/tuples into TensorViews, call the checked entry points,
// and turn a non-OK Status into edgespec._C.KernelError (a RuntimeError; edgespec/ops/_kernels.py
// re-raises it as edgespec.errors.KernelError) whose message names the op, every argument's
// dtype/shape/strides/device and the reason. Nothing here touches the GPU at import time: cudart
// is linked statically and initialises itself on the first runtime call, so `import edgespec._C`
// works on a machine without a driver.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dispatch.h"
#include "common/status.h"
#include "common/tensor_view.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/attention_plan.h"
#include "kernels/dense_gemm.h"
#include "kernels/embedding.h"
#include "kernels/moe.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sampling.h"
#include "kernels/sparse_attention.h"
#include "kernels/w4a16.h"

#ifndef EDGESPEC_CUDA_ARCHS
#error "EDGESPEC_CUDA_ARCHS must be defined by the build (comma-separated architectures the kernels target)"
#endif

namespace py = pybind11;
using namespace edgespec;

namespace {

class KernelFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using NamedView = std::pair<const char*, const TensorView*>;

void raise_if_error(const char* op, const Status& status, std::initializer_list<NamedView> args) {
  if (status.ok()) return;
  std::string msg = std::string(op) + ": " + status.message() + " (arguments:";
  for (const auto& [name, view] : args) {
    if (view != nullptr) msg += std::string(" ") + name + "=" + describe(*view) + ";";
  }
  msg.back() = ')';
  throw KernelFailure(msg);
}

TensorView make_view(std::uint64_t data, const std::vector<std::int64_t>& shape,
                     const std::vector<std::int64_t>& strides, DType dtype, int device) {
  if (shape.size() > static_cast<std::size_t>(kMaxRank)) {
    throw py::value_error("TensorView: rank " + std::to_string(shape.size()) + " exceeds the maximum of " +
                          std::to_string(kMaxRank));
  }
  if (strides.size() != shape.size()) {
    throw py::value_error("TensorView: " + std::to_string(shape.size()) + " sizes but " +
                          std::to_string(strides.size()) + " strides");
  }
  TensorView v;
  v.data = data;
  v.rank = static_cast<int>(shape.size());
  for (int i = 0; i < v.rank; ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  v.dtype = dtype;
  v.device = device;
  return v;
}

cudaStream_t as_stream(std::uint64_t handle) {
  return reinterpret_cast<cudaStream_t>(static_cast<std::uintptr_t>(handle));
}

const TensorView* opt(const std::optional<TensorView>& v) { return v ? &*v : nullptr; }

py::list split_list(const std::string& text, char sep) {
  py::list items;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(sep, start), text.size());
    if (end > start) items.append(text.substr(start, end - start));
    start = end + 1;
  }
  return items;
}

py::dict build_info() {
  py::dict info;
  info["cuda"] = true;
  info["architectures"] = split_list(EDGESPEC_CUDA_ARCHS, ',');
  py::list dtypes;
  for (DType d : kCompiledFloatDtypes) dtypes.append(dtype_name(d));
  info["dtypes"] = dtypes;
  // Head dims of head-dim-specialised kernel instances (attention).
  py::list head_dims;
  for (int d : kAttentionHeadDims) head_dims.append(d);
  info["head_dims"] = head_dims;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#ifdef EDGESPEC_HAS_SM90
  info["sm90_kernels"] = true;
#else
  info["sm90_kernels"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "edgespec CUDA kernels. Call them through edgespec.ops, which validates and falls back.";
  m.attr("HAS_CUDA") = true;
  m.attr("MAX_RANK") = kMaxRank;
  py::register_exception<KernelFailure>(m, "KernelError", PyExc_RuntimeError);

  py::enum_<DType>(m, "DType")
      .value("fp32", DType::kFloat32)
      .value("fp16", DType::kFloat16)
      .value("bf16", DType::kBFloat16)
      .value("int32", DType::kInt32)
      .value("int64", DType::kInt64);

  py::class_<TensorView>(m, "TensorView",
                         "A checked view of a CUDA tensor: address, shape, strides (elements), dtype, device.")
      .def(py::init(&make_view), py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("dtype"),
           py::arg("device"))
      .def_property_readonly("data", [](const TensorView& v) { return v.data; })
      .def_property_readonly("shape", [](const TensorView& v) {
        return std::vector<std::int64_t>(v.shape, v.shape + v.rank);
      })
      .def_property_readonly("strides", [](const TensorView& v) {
        return std::vector<std::int64_t>(v.strides, v.strides + v.rank);
      })
      .def_property_readonly("dtype", [](const TensorView& v) { return v.dtype; })
      .def_property_readonly("device", [](const TensorView& v) { return v.device; })
      .def("__repr__", [](const TensorView& v) { return "TensorView(" + describe(v) + ")"; });

  m.def("build_info", &build_info, "What this extension was compiled for (never touches the GPU).");

  m.def(
      "rms_norm",
      [](const TensorView& x, const TensorView& weight, const std::optional<TensorView>& residual,
         const TensorView& out, const std::optional<TensorView>& residual_out, float eps, std::uint64_t stream) {
        RmsNormArgs a{x, weight, opt(residual), out, opt(residual_out), eps};
        raise_if_error("rms_norm", rms_norm(a, as_stream(stream)),
                       {{"x", &x}, {"weight", &weight}, {"residual", opt(residual)}, {"out", &out},
                        {"residual_out", opt(residual_out)}});
      },
      py::arg("x"), py::arg("weight"), py::arg("residual"), py::arg("out"), py::arg("residual_out"),
      py::arg("eps"), py::arg("stream"),
      "out = rms_norm(x [+ residual]) * weight; residual_out = x + residual. See csrc/kernels/norm.h.");

  m.def(
      "apply_rope",
      [](const TensorView& q, const TensorView& k, const TensorView& positions, const TensorView& cos,
         const TensorView& sin, const TensorView& q_out, const TensorView& k_out, std::uint64_t stream) {
        RopeArgs a{q, k, positions, cos, sin, q_out, k_out};
        raise_if_error("apply_rope", apply_rope(a, as_stream(stream)),
                       {{"q", &q}, {"k", &k}, {"positions", &positions}, {"cos", &cos}, {"sin", &sin},
                        {"q_out", &q_out}, {"k_out", &k_out}});
      },
      py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("q_out"),
      py::arg("k_out"), py::arg("stream"), "Rotate-half RoPE, out of place. See csrc/kernels/rope.h.");

  m.def(
      "silu_and_mul",
      [](const TensorView& x, const TensorView& out, std::uint64_t stream) {
        raise_if_error("silu_and_mul", silu_and_mul(SiluAndMulArgs{x, out}, as_stream(stream)),
                       {{"x", &x}, {"out", &out}});
      },
      py::arg("x"), py::arg("out"), py::arg("stream"),
      "out = silu(x[:, :I]) * x[:, I:]. See csrc/kernels/activation.h.");

  m.def(
      "embedding",
      [](const TensorView& ids, const TensorView& table, const TensorView& out, float scale, std::uint64_t stream) {
        raise_if_error("embedding", embedding(EmbeddingArgs{ids, table, out, scale}, as_stream(stream)),
                       {{"ids", &ids}, {"table", &table}, {"out", &out}});
      },
      py::arg("ids"), py::arg("table"), py::arg("out"), py::arg("scale"), py::arg("stream"),
      "out = table[ids] * scale. See csrc/kernels/embedding.h.");

  m.def(
      "argmax",
      [](const TensorView& logits, const TensorView& out, std::uint64_t stream) {
        raise_if_error("argmax", argmax(ArgmaxArgs{logits, out}, as_stream(stream)),
                       {{"logits", &logits}, {"out", &out}});
      },
      py::arg("logits"), py::arg("out"), py::arg("stream"),
      "out[t] = argmax(logits[t]) (lowest index on ties, NaN wins). See csrc/kernels/sampling.h.");

  m.attr("NUCLEUS_MASS_BITS") = kNucleusMassBits;
  m.def(
      "nucleus_floor",
      [](const TensorView& probs, std::uint64_t need, const TensorView& out, const TensorView& workspace,
         std::uint64_t stream) {
        raise_if_error("nucleus_floor", nucleus_floor(NucleusFloorArgs{probs, need, out, workspace}, as_stream(stream)),
                       {{"probs", &probs}, {"out", &out}, {"workspace", &workspace}});
      },
      py::arg("probs"), py::arg("need"), py::arg("out"), py::arg("workspace"), py::arg("stream"),
      "out[r] = the smallest probability top-p keeps in row r (mass counted in units of 2^-40). See "
      "csrc/kernels/sampling.h.");
  m.def("nucleus_floor_workspace_words", &nucleus_floor_workspace_words, py::arg("rows"), py::arg("vocab"),
        "int64 scratch words nucleus_floor needs.");

  m.attr("ATTENTION_MAX_TREE_TOKENS") = kAttentionMaxTreeTokens;
  m.attr("ATTENTION_MAX_SPLITS") = kAttentionMaxSplits;
  m.def(
      "attention",
      [](const TensorView& q, const TensorView& k, const TensorView& v, const std::optional<TensorView>& tree_mask,
         const TensorView& out, const std::optional<TensorView>& partial_out,
         const std::optional<TensorView>& partial_lse, float scale, int splits, std::uint64_t stream,
         const std::optional<TensorView>& block_mask, const std::optional<TensorView>& seqlen, bool sm90,
         int chunk_tiles, const std::optional<TensorView>& resume, int rank_tiles) {
        AttentionArgs a{q, k, v, opt(tree_mask), out, opt(partial_out), opt(partial_lse), scale, splits};
        a.block_mask = opt(block_mask);
        a.seqlen = opt(seqlen);
        a.chunk_tiles = chunk_tiles;
        a.resume = opt(resume);
        a.rank_tiles = rank_tiles;
        a.sm90 = sm90;
        raise_if_error("attention", attention(a, as_stream(stream)),
                       {{"q", &q}, {"k", &k}, {"v", &v}, {"tree_mask", opt(tree_mask)}, {"out", &out},
                        {"partial_out", opt(partial_out)}, {"partial_lse", opt(partial_lse)},
                        {"block_mask", opt(block_mask)}, {"seqlen", opt(seqlen)}, {"resume", opt(resume)}});
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("tree_mask"), py::arg("out"), py::arg("partial_out"),
      py::arg("partial_lse"), py::arg("scale"), py::arg("splits"), py::arg("stream"), py::arg("block_mask") = py::none(),
      py::arg("seqlen") = py::none(), py::arg("sm90") = false, py::arg("chunk_tiles") = 0,
      py::arg("resume") = py::none(), py::arg("rank_tiles") = 0,
      "Causal or tree-masked GQA attention of the last T of S cache slots, split-KV when splits > 1; "
      "chunk_tiles > 0 (rank_tiles > 0 with a block mask): row-invariant (decoded and verified tokens bitwise "
      "equal); sm90: the Hopper kernels "
      "(csrc/kernels/sm90/attention_sm90.h). See csrc/kernels/attention.h.");
  m.def("attention_num_splits", &attention_num_splits, py::arg("tokens"), py::arg("seqlen"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("tree"), py::arg("num_sms"),
        "Key-range splits the attention kernels use for this shape on a GPU with num_sms SMs (host only, "
        "no GPU needed). See csrc/kernels/attention_plan.h.");
  m.def("attention_sm90_num_splits", &attention_sm90_num_splits, py::arg("tokens"), py::arg("seqlen"),
        py::arg("heads_q"), py::arg("heads_kv"), py::arg("num_sms"),
        "Key-range splits the Hopper attention kernels use for this shape (host only). See attention_plan.h.");
  m.def("attention_invariant_chunk_tiles", &attention_invariant_chunk_tiles, py::arg("span"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("num_sms"),
        "Tiles per key chunk of the row-invariant attention mode for a cache of `span` slots (host only). "
        "See csrc/kernels/attention_plan.h.");
  m.def("attention_invariant_splits", &attention_invariant_splits, py::arg("seqlen"), py::arg("chunk_tiles"),
        "Chunks (splits) of a row-invariant attention call over seqlen slots (host only).");
  m.def("attention_tail_smem_bytes", &attention_tail_smem_bytes, py::arg("head_dim"), py::arg("tokens"),
        py::arg("group"), py::arg("mask_words"), py::arg("block_words") = 0,
        "Shared memory (bytes) of one tail block of a row-invariant tree call (host only).");
  m.def("attention_sm90_tail_smem_bytes", &attention_sm90_tail_smem_bytes, py::arg("head_dim"), py::arg("tokens"),
        "Shared memory (bytes) of one Hopper tail block of a row-invariant tree call (host only).");
  m.attr("ATTENTION_MAX_TAIL_GROUP") = kAttentionMaxTailGroup;
  m.attr("ATTENTION_RESUME_EXTRA") = kAttentionResumeExtra;
  m.def("attention_smem_bytes", &attention_smem_bytes, py::arg("head_dim"), py::arg("tokens"), py::arg("group"),
        py::arg("tree"), py::arg("mask_words"), py::arg("block_words"),
        "Shared memory (bytes) one attention block needs for this call (host only). See attention_plan.h.");
  m.def(
      "max_shared_memory_optin",
      [](int device) {
        int value = 0;
        raise_if_error("max_shared_memory_optin",
                       Status::from_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                                         "cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)"),
                       {});
        return value;
      },
      py::arg("device"), "Shared memory (bytes) a kernel of this process may opt in to per block on `device`.");

  m.def(
      "sparse_compress_keys",
      [](const TensorView& k, const TensorView& ck, const TensorView& range, int kernel_size, int kernel_stride,
         int max_new_kernels, std::uint64_t stream) {
        SparseCompressArgs a{k, ck, range, kernel_size, kernel_stride, max_new_kernels};
        raise_if_error("sparse_compress_keys", sparse_compress_keys(a, as_stream(stream)),
                       {{"k", &k}, {"ck", &ck}, {"range", &range}});
      },
      py::arg("k"), py::arg("ck"), py::arg("range"), py::arg("kernel_size"), py::arg("kernel_stride"),
      py::arg("max_new_kernels"), py::arg("stream"),
      "InfLLM-v2 compressed keys for the token range read from `range` on the device. See "
      "csrc/kernels/sparse_attention.h.");

  m.def("sparse_scores_mma_applies", &sparse_scores_mma_applies, py::arg("group"), py::arg("head_dim"),
        py::arg("elem_bytes"),
        "Whether the tensor-core score kernels take a selection call of these shapes (host only).");
  m.attr("SPARSE_MMA_KERNELS") = kSparseMmaKernels;
  m.def(
      "sparse_select_blocks",
      [](const TensorView& q, const TensorView& ck, const TensorView& positions, const TensorView& kv_limit,
         const TensorView& partial, const TensorView& scores, const TensorView& block_mask, int num_blocks,
         int block_size, int kernel_size, int kernel_stride, int init_blocks, int window_blocks, int topk,
         int dense_len, int kernels_per_split, float scale, std::uint64_t stream,
         const std::optional<TensorView>& path, bool sm90) {
        SparseSelectArgs a{q, ck, positions, kv_limit, partial, scores, block_mask, num_blocks, block_size,
                           kernel_size, kernel_stride, init_blocks, window_blocks, topk, dense_len,
                           kernels_per_split, scale, opt(path), sm90};
        raise_if_error("sparse_select_blocks", sparse_select_blocks(a, as_stream(stream)),
                       {{"q", &q}, {"ck", &ck}, {"positions", &positions}, {"kv_limit", &kv_limit},
                        {"partial", &partial}, {"scores", &scores}, {"block_mask", &block_mask},
                        {"path", opt(path)}});
      },
      py::arg("q"), py::arg("ck"), py::arg("positions"), py::arg("kv_limit"), py::arg("partial"), py::arg("scores"),
      py::arg("block_mask"), py::arg("num_blocks"), py::arg("block_size"), py::arg("kernel_size"),
      py::arg("kernel_stride"), py::arg("init_blocks"), py::arg("window_blocks"), py::arg("topk"),
      py::arg("dense_len"), py::arg("kernels_per_split"), py::arg("scale"), py::arg("stream"),
      py::arg("path") = py::none(), py::arg("sm90") = false,
      "InfLLM-v2 block scores and selection -> bit-packed block mask. See csrc/kernels/sparse_attention.h.");

  m.def(
      "blockffn",
      [](const TensorView& x, const TensorView& router, const TensorView& router_norm, const TensorView& up,
         const TensorView& down, const TensorView& out, const TensorView& weights, const TensorView& active,
         const TensorView& hidden, const TensorView& partial, const TensorView& sync,
         const std::optional<TensorView>& counters, int router_splits, int up_splits, int down_splits, float eps,
         std::uint64_t stream) {
        BlockFFNArgs a{x, router, router_norm, up, down, out, weights, active, hidden, partial, sync,
                       opt(counters), router_splits, up_splits, down_splits, eps};
        raise_if_error("blockffn", blockffn(a, as_stream(stream)),
                       {{"x", &x}, {"router", &router}, {"router_norm", &router_norm}, {"up", &up}, {"down", &down},
                        {"out", &out}, {"weights", &weights}, {"active", &active}, {"hidden", &hidden},
                        {"partial", &partial}, {"sync", &sync}, {"counters", opt(counters)}});
      },
      py::arg("x"), py::arg("router"), py::arg("router_norm"), py::arg("up"), py::arg("down"), py::arg("out"),
      py::arg("weights"), py::arg("active"), py::arg("hidden"), py::arg("partial"), py::arg("sync"),
      py::arg("counters"), py::arg("router_splits"), py::arg("up_splits"), py::arg("down_splits"), py::arg("eps"),
      py::arg("stream"),
      "BlockFFN step over the union of active experts (router, gathered up, gathered down). See csrc/kernels/moe.h.");
  m.def(
      "blockffn_router",
      [](const TensorView& x, const TensorView& router, const TensorView& router_norm, const TensorView& weights,
         const TensorView& active, const TensorView& partial, const TensorView& sync,
         const std::optional<TensorView>& counters, int router_splits, float eps, std::uint64_t stream) {
        BlockFFNRouterArgs a{x, router, router_norm, weights, active, partial, sync, opt(counters), router_splits, eps};
        raise_if_error("blockffn_router", blockffn_router(a, as_stream(stream)),
                       {{"x", &x}, {"router", &router}, {"router_norm", &router_norm}, {"weights", &weights},
                        {"active", &active}, {"partial", &partial}, {"sync", &sync}, {"counters", opt(counters)}});
      },
      py::arg("x"), py::arg("router"), py::arg("router_norm"), py::arg("weights"), py::arg("active"),
      py::arg("partial"), py::arg("sync"), py::arg("counters"), py::arg("router_splits"), py::arg("eps"),
      py::arg("stream"),
      "BlockFFN router alone (weights, active list, counters), for 4-bit experts. See csrc/kernels/moe.h.");
  m.def("blockffn_sync_words", &blockffn_sync_words, py::arg("hidden"), py::arg("experts"), py::arg("expert_size"),
        "int32 arrival counters blockffn needs (zero on entry, left zero).");
  m.def("blockffn_partial_floats", &blockffn_partial_floats, py::arg("tokens"), py::arg("hidden"), py::arg("experts"),
        py::arg("expert_size"), py::arg("router_splits"), py::arg("up_splits"), py::arg("down_splits"),
        "fp32 split-K scratch blockffn needs.");

  m.attr("W4A16_MAX_ROWS") = kW4A16MaxRows;
  m.def(
      "w4a16_gemm",
      [](const TensorView& x, const TensorView& qweight, const TensorView& scales, const std::optional<TensorView>& zeros,
         const std::optional<TensorView>& bias, const TensorView& out, const std::optional<TensorView>& partial,
         const std::optional<TensorView>& counters, int group_size, int splits, std::uint64_t stream,
         const std::optional<TensorView>& active, const std::optional<TensorView>& expert_weights, int expert_size,
         bool gather_rows) {
        W4A16Args a{x,          qweight,    scales,       opt(zeros),          opt(bias),  out,
                    opt(partial), opt(counters), group_size, splits, opt(active), opt(expert_weights),
                    expert_size, gather_rows};
        raise_if_error("w4a16_gemm", w4a16_gemm(a, as_stream(stream)),
                       {{"x", &x}, {"qweight", &qweight}, {"scales", &scales}, {"zeros", opt(zeros)},
                        {"bias", opt(bias)}, {"out", &out}, {"partial", opt(partial)}, {"counters", opt(counters)},
                        {"active", opt(active)}, {"expert_weights", opt(expert_weights)}});
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("out"),
      py::arg("partial"), py::arg("counters"), py::arg("group_size"), py::arg("splits"), py::arg("stream"),
      py::arg("active") = py::none(), py::arg("expert_weights") = py::none(), py::arg("expert_size") = 0,
      py::arg("gather_rows") = false,
      "out = x @ dequant(qweight).T (+ bias) with 4-bit fragment-ordered weights, optionally over the active "
      "experts only (BlockFFN). See csrc/kernels/w4a16.h.");
  m.def(
      "dense_gemm",
      [](const TensorView& x, const TensorView& weight, const std::optional<TensorView>& bias, const TensorView& out,
         const std::optional<TensorView>& partial, const std::optional<TensorView>& counters, int splits,
         std::uint64_t stream) {
        DenseGemmArgs a{x, weight, opt(bias), out, opt(partial), opt(counters), splits};
        raise_if_error("dense_gemm", dense_gemm(a, as_stream(stream)),
                       {{"x", &x}, {"weight", &weight}, {"bias", opt(bias)}, {"out", &out}, {"partial", opt(partial)},
                        {"counters", opt(counters)}});
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("partial"), py::arg("counters"),
      py::arg("splits"), py::arg("stream"),
      "out = x @ weight.T (+ bias), 16-bit weights [N, K], M <= 64 rows, row-invariant. See "
      "csrc/kernels/dense_gemm.h.");
  m.def("w4a16_num_splits", &w4a16_num_splits, py::arg("n"), py::arg("k"), py::arg("num_sms"),
        "Split-K factor the W4A16 kernel uses for this shape, whatever the row count (host only, no GPU "
        "needed). See csrc/kernels/w4a16.h.");
}
