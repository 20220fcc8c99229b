// bench_attention: verify, then time, the attention kernels (csrc/kernels/attention.h) through the
// same checked entry point the Python extension calls: decode (T = 1), causal prefill (T = context)
// and tree verification (T tree tokens of a random tree) at several contexts.
//
// Verify: a naive fp32 GPU reference (one block per checked (token, head) row: scores, softmax and
// P.V in fp32 from the same rounded inputs) on --check-rows sampled rows, including the first and
// last token; every output element of the kernel call is also checked to be finite (outputs and
// split scratch are poisoned with NaN first). Tolerance per row: 8 units of the storage type's
// rounding times the row's largest |reference| (P is rounded to 16 bits before P.V, as in
// FlashAttention; an all-zero or garbage row fails it).
//
// Time: CUDA events around --batch back-to-back calls, each on a different input set (K/V, Q and
// outputs rotated through > 3x L2, so K/V stream from DRAM as in a model whose other layers evict
// them), queued behind a kernel that spins until the host has enqueued the whole batch (so the
// GPU runs the calls back to back and host launch cost is not timed); median of --repeats
// samples. Reported: ms per call, TB/s (Q + K/V + output bytes), TFLOP/s (4 x D x Hq x visible
// (query, key) pairs), and a device-to-device copy of the K/V bytes timed the same way (its
// TB/s counts bytes read + written): the DRAM bandwidth a decode step can hope for.
//
// Exit status: 0 verified and timed; 1 a kernel failed or disagreed with the reference;
// 2 bad command line; 77 no CUDA device (the automake/CTest convention for "skipped").
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "common/status.h"
#include "common/tensor_view.h"
#include "common/vec.cuh"
#include "kernels/attention.h"
#include "kernels/attention_plan.h"

namespace {

using namespace edgespec;
using namespace edgespec::bench;

const char kUsage[] = R"(usage: bench_attention [options]

Verifies the attention kernels against a naive fp32 GPU reference on sampled rows, then times them
(CUDA events, median of repeats, inputs rotated through more than 3x L2) next to a device-to-device
copy of the same K/V bytes.

problem (default: Llama-3.1-8B attention, every phase, contexts 4K..32K)
  --model NAME      llama3-8b (32 q / 8 kv heads, D 128) | minicpm4-8b (32 / 2, D 128)
  --heads-q N --heads-kv N --head-dim D      explicit shape instead of --model
  --phases LIST     comma list of decode, prefill, tree         (default decode,prefill,tree)
  --contexts LIST   comma list, K = 1024 (4K, 32768, ...)       (default 4K,8K,16K,32K)
                    decode/tree: the committed prefix; prefill: the prompt length
  --tree-tokens N   tree size for the tree phase                (default 64)
  --dtype T         bf16 | fp16                                 (default bf16)
  --splits N        force the split-KV count (default: the plan for this GPU)
  --sm90 0|1        prefill and tree phases (with --invariant also decode) on the Hopper wgmma
                    kernels (csrc/kernels/sm90; needs a compute capability 9.0 GPU and a 90a-real
                    build, else nothing is run: exit 77)
  --invariant SPAN  decode and tree phases in the row-invariant mode (csrc/kernels/attention.h), key
                    chunks planned for a cache of SPAN tokens (e.g. 32K); 0: off (default)
measurement
  --warmup N        calls before timing                         (default 10)
  --repeats N       timed samples; the median is reported       (default 30)
  --batch N         back-to-back calls per sample               (default 8)
  --check-rows N    (token, head) rows checked against the reference (default 48)
  --device N        CUDA device index                           (default 0)
  --json PATH       also write the results in the bench/results JSON format
  --commit SHA      commit recorded in the JSON                 (default "unknown")
  --help            this text

exit status: 0 ok; 1 a kernel failed or disagreed with the reference; 2 bad command line;
77 no CUDA device (nothing was run).
)";

struct Options {
  long long heads_q = 32, heads_kv = 8, head_dim = 128, tree_tokens = 64, splits = 0, sm90 = 0, invariant = 0;
  std::string model = "llama3-8b";
  std::vector<std::string> phases = {"decode", "prefill", "tree"};
  std::vector<long long> contexts = {4096, 8192, 16384, 32768};
  DType dtype = DType::kBFloat16;
  long long warmup = 10, repeats = 30, batch = 8, check_rows = 48, device = 0;
  std::string json, commit = "unknown";
};

// "4K" -> 4096, "32768" -> 32768; false on anything else or a value below `min_value`.
bool parse_tokens(const std::string& text, long long min_value, long long* out) {
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str()) return false;
  if (*end == 'K' || *end == 'k') {
    v *= 1024;
    ++end;
  }
  if (*end != '\0' || v < min_value) return false;
  *out = v;
  return true;
}

// Returns "" on success, else what was wrong.
std::string parse_args(int argc, char** argv, Options* o, bool* help) {
  bool explicit_shape = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return "";
    }
    if (i + 1 >= argc) return flag + " needs a value (or is unknown)";
    const std::string value = argv[++i];
    struct Count { const char* name; long long* field; long long min; };
    const Count counts[] = {{"--heads-q", &o->heads_q, 1},     {"--heads-kv", &o->heads_kv, 1},
                            {"--head-dim", &o->head_dim, 1},   {"--tree-tokens", &o->tree_tokens, 1},
                            {"--splits", &o->splits, 1},       {"--warmup", &o->warmup, 0},
                            {"--repeats", &o->repeats, 1},     {"--batch", &o->batch, 1},
                            {"--check-rows", &o->check_rows, 1}, {"--device", &o->device, 0},
                            {"--sm90", &o->sm90, 0},           {"--invariant", &o->invariant, 0}};
    const Count* count = nullptr;
    for (const Count& c : counts) count = flag == c.name ? &c : count;
    if (count != nullptr) {
      if (!parse_tokens(value, count->min, count->field)) {
        return flag + " expects an integer >= " + std::to_string(count->min) + ", got '" + value + "'";
      }
      explicit_shape = explicit_shape || flag.rfind("--head", 0) == 0;
    } else if (flag == "--model") {
      o->model = value;
    } else if (flag == "--phases") {
      o->phases = split_commas(value);
      for (const std::string& p : o->phases) {
        if (p != "decode" && p != "prefill" && p != "tree") return "--phases: unknown phase '" + p + "'";
      }
    } else if (flag == "--contexts") {
      o->contexts.clear();
      for (const std::string& c : split_commas(value)) {
        long long ctx = 0;
        if (!parse_tokens(c, 1, &ctx)) return "--contexts: '" + c + "' is not a token count such as 4K or 4096";
        o->contexts.push_back(ctx);
      }
    } else if (flag == "--dtype") {
      if (value == "bf16") o->dtype = DType::kBFloat16;
      else if (value == "fp16") o->dtype = DType::kFloat16;
      else return "--dtype expects bf16 or fp16, got '" + value + "'";
    } else if (flag == "--json") {
      o->json = value;
    } else if (flag == "--commit") {
      o->commit = value;
    } else {
      return "unknown option " + flag;
    }
  }
  if (explicit_shape) {
    o->model = "custom";
  } else if (o->model == "llama3-8b") {
    o->heads_q = 32, o->heads_kv = 8, o->head_dim = 128;
  } else if (o->model == "minicpm4-8b") {
    o->heads_q = 32, o->heads_kv = 2, o->head_dim = 128;
  } else {
    return "--model expects llama3-8b or minicpm4-8b (or give --heads-q/--heads-kv/--head-dim), got '" +
           o->model + "'";
  }
  if (o->heads_q % o->heads_kv != 0) return "--heads-q must be a multiple of --heads-kv";
  if (o->head_dim != 64 && o->head_dim != 128) return "--head-dim must be 64 or 128 (the compiled head dims)";
  if (o->tree_tokens > kAttentionMaxTreeTokens) {
    return "--tree-tokens must be at most " + std::to_string(kAttentionMaxTreeTokens);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Device-side inputs: hashed uniform values, distinct for every element of every rotated copy.

template <typename T>
__global__ void fill_hashed(T* p, std::int64_t n, std::uint64_t seed, float amplitude) {
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    const float u = static_cast<float>(mix_hash(seed * 0x9e3779b97f4a7c15ull + i) >> 8) * 0x1p-24f;  // [0, 1)
    p[i] = from_float<T>(amplitude * (2.f * u - 1.f));
  }
}

// Naive fp32 reference for selected rows: block b computes out_ref[b, :] for (token, head) =
// rows[b]. scores: fp32 scratch [rows, S].
template <typename T>
__global__ void reference_rows(const T* q, const T* k, const T* v, const std::uint64_t* tree, int words,
                               const int* rows, int tokens, int seqlen, int heads_q, int heads_kv, int head_dim,
                               float scale, float* scores, float* out_ref) {
  __shared__ float reduce[256];
  const int token = rows[2 * blockIdx.x], head = rows[2 * blockIdx.x + 1];
  const int kv = head / (heads_q / heads_kv);
  const int prefix = seqlen - tokens;
  const T* qrow = q + (static_cast<std::int64_t>(token) * heads_q + head) * head_dim;
  float* s = scores + static_cast<std::int64_t>(blockIdx.x) * seqlen;
  float local_max = -INFINITY;
  for (int j = threadIdx.x; j < seqlen; j += blockDim.x) {
    bool visible;
    if (tree != nullptr) {
      const int node = j - prefix;
      visible = node < 0 || ((tree[static_cast<std::int64_t>(token) * words + node / 64] >> (node % 64)) & 1u);
    } else {
      visible = j <= prefix + token;
    }
    float dot = -INFINITY;
    if (visible) {
      const T* krow = k + (static_cast<std::int64_t>(j) * heads_kv + kv) * head_dim;
      dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += to_float(qrow[d]) * to_float(krow[d]);
      dot *= scale;
    }
    s[j] = dot;
    local_max = fmaxf(local_max, dot);
  }
  reduce[threadIdx.x] = local_max;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) reduce[threadIdx.x] = fmaxf(reduce[threadIdx.x], reduce[threadIdx.x + w]);
    __syncthreads();
  }
  const float row_max = reduce[0];
  __syncthreads();
  float local_sum = 0.f;
  for (int j = threadIdx.x; j < seqlen; j += blockDim.x) {
    s[j] = expf(s[j] - row_max);
    local_sum += s[j];
  }
  reduce[threadIdx.x] = local_sum;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) reduce[threadIdx.x] += reduce[threadIdx.x + w];
    __syncthreads();
  }
  const float inv = 1.f / reduce[0];
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < seqlen; ++j) acc += s[j] * to_float(v[(static_cast<std::int64_t>(j) * heads_kv + kv) * head_dim + d]);
    out_ref[static_cast<std::int64_t>(blockIdx.x) * head_dim + d] = acc * inv;
  }
}

float host_float(const std::uint16_t bits, DType dtype) {
  if (dtype == DType::kBFloat16) {
    const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}

// ---------------------------------------------------------------------------------------------

struct Problem {
  std::string phase;
  long long context = 0, tokens = 0, seqlen = 0;
  double pairs = 0;  // visible (query token, key) pairs
};

struct Result {
  std::string name, error;
  Problem pb;
  int splits = 1;
  double ms = 0, copy_ms = 0, bytes = 0, kv_bytes = 0;
};

#define BENCH_CHECK(expr)                                                                                \
  do {                                                                                                   \
    const cudaError_t bench_err_ = (expr);                                                               \
    if (bench_err_ != cudaSuccess) return std::string(#expr) + ": " + cudaGetErrorString(bench_err_);    \
  } while (0)

class Bench {
 public:
  Bench(const Options& o, const cudaDeviceProp& prop) : o_(o), prop_(prop) {}
  ~Bench() { free_all(); }

  Result run(const Problem& pb) {
    Result r;
    r.pb = pb;
    r.name = o_.model + " " + pb.phase + " " + std::to_string(pb.context / 1024) + "K" + (sm90(pb) ? " sm90" : "") +
             (invariant(pb) ? " invariant" : "");
    r.error = setup(pb, &r);
    if (r.error.empty()) r.error = verify(pb);
    if (r.error.empty()) r.error = time(&r);
    free_all();
    return r;
  }

 private:
  std::size_t elt() const { return 2; }
  // Decode steps take the Hopper kernels only in the row-invariant mode (where a tree's rows must
  // agree with them, so both run on one kernel family).
  bool invariant(const Problem& pb) const { return o_.invariant > 0 && pb.phase != "prefill"; }
  bool sm90(const Problem& pb) const { return o_.sm90 != 0 && (pb.phase != "decode" || invariant(pb)); }

  template <typename P>
  std::string alloc(P** ptr, std::size_t bytes) {
    void* p = nullptr;
    BENCH_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 256)));
    owned_.push_back(p);
    *ptr = static_cast<P*>(p);
    return "";
  }

  std::string fill(void* p, std::int64_t n, std::uint64_t seed, float amplitude) {
    if (o_.dtype == DType::kBFloat16) {
      fill_hashed<__nv_bfloat16><<<1024, 256, 0, stream_>>>(static_cast<__nv_bfloat16*>(p), n, seed, amplitude);
    } else {
      fill_hashed<__half><<<1024, 256, 0, stream_>>>(static_cast<__half*>(p), n, seed, amplitude);
    }
    BENCH_CHECK(cudaGetLastError());
    return "";
  }

  std::string setup(const Problem& pb, Result* r) {
    BENCH_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    const std::int64_t T = pb.tokens, S = pb.seqlen, Hq = o_.heads_q, Hkv = o_.heads_kv, D = o_.head_dim;
    q_elems_ = T * Hq * D;
    kv_elems_ = S * Hkv * D;
    const std::size_t per_copy = (2 * q_elems_ + 2 * kv_elems_) * elt();
    copies_ = std::clamp<long long>(static_cast<long long>(3 * prop_.l2CacheSize / per_copy) + 1, 1, 64);
    std::string err;
    for (auto* buf : {&q_, &k_, &v_, &out_}) {
      const std::int64_t n = (buf == &k_ || buf == &v_) ? kv_elems_ : q_elems_;
      if (!(err = alloc(buf, n * elt() * copies_)).empty()) return err;
    }
    const float amp[] = {2.f, 1.f, 1.f};  // q wider than k: scores of order 1, a peaked softmax
    int which = 0;
    for (auto* buf : {&q_, &k_, &v_}) {
      const std::int64_t n = (buf == &q_ ? q_elems_ : kv_elems_) * copies_;
      if (!(err = fill(*buf, n, 17 + which, amp[which])).empty()) return err;
      ++which;
    }
    if (pb.phase == "tree") {
      // A random tree in topological order: parent among the previous 8 tokens (deep, bushy).
      std::mt19937 rng(1234);
      words_ = static_cast<int>((T + 63) / 64);
      std::vector<std::uint64_t> mask(T * words_, 0);
      std::vector<int> parent(T, -1);
      for (int i = 1; i < T; ++i) parent[i] = std::max(0, i - 1 - static_cast<int>(rng() % 8));
      for (int i = 0; i < T; ++i) {
        for (int j = i; j >= 0; j = parent[j]) mask[i * words_ + j / 64] |= std::uint64_t{1} << (j % 64);
      }
      double tree_pairs = 0;
      for (std::uint64_t w : mask) tree_pairs += __builtin_popcountll(w);
      r->pb.pairs = static_cast<double>(T) * (S - T) + tree_pairs;
      if (!(err = alloc(&tree_, mask.size() * 8)).empty()) return err;
      BENCH_CHECK(cudaMemcpy(tree_, mask.data(), mask.size() * 8, cudaMemcpyHostToDevice));
    } else {
      r->pb.pairs = static_cast<double>(T) * (S - T) + static_cast<double>(T) * (T + 1) / 2;
    }
    chunk_tiles_ = invariant(pb) ? attention_invariant_chunk_tiles(o_.invariant, static_cast<int>(Hq),
                                                                   static_cast<int>(Hkv), prop_.multiProcessorCount)
                                 : 0;
    splits_ = chunk_tiles_ > 0   ? attention_invariant_splits(S, chunk_tiles_)
              : o_.splits > 0 ? static_cast<int>(o_.splits)
              : sm90(pb)      ? attention_sm90_num_splits(T, S, static_cast<int>(Hq), static_cast<int>(Hkv),
                                                          prop_.multiProcessorCount)
                            : attention_num_splits(T, S, static_cast<int>(Hq), static_cast<int>(Hkv),
                                                   tree_ != nullptr, prop_.multiProcessorCount);
    r->splits = splits_;
    const bool tails = chunk_tiles_ > 0 && tree_ != nullptr;  // an invariant tree: partials and resume state
    if (tails && !(err = alloc(&resume_, T * Hq * attention_resume_stride(static_cast<int>(D)) * 4)).empty()) {
      return err;
    }
    if (splits_ > 1 || tails) {
      if (!(err = alloc(&partial_out_, splits_ * q_elems_ * 4)).empty()) return err;
      if (!(err = alloc(&partial_lse_, splits_ * T * Hq * 4)).empty()) return err;
    }
    r->kv_bytes = 2.0 * kv_elems_ * elt();
    r->bytes = r->kv_bytes + 2.0 * q_elems_ * elt() + (tree_ ? T * words_ * 8.0 : 0.0);
    copy_bytes_ = static_cast<std::size_t>(r->kv_bytes);
    if (!(err = alloc(&copy_src_, copy_bytes_ * copies_)).empty()) return err;
    if (!(err = alloc(&copy_dst_, copy_bytes_ * copies_)).empty()) return err;
    BENCH_CHECK(cudaStreamSynchronize(stream_));
    return "";
  }

  // A contiguous view of copy `copy` of a rotated buffer of `shape`.
  TensorView view(const void* base, long long copy, std::initializer_list<std::int64_t> shape, DType dt) const {
    TensorView v;
    v.rank = static_cast<int>(shape.size());
    std::int64_t numel = 1;
    for (std::int64_t s : shape) numel *= s;
    v.data = reinterpret_cast<std::uintptr_t>(base) + static_cast<std::uint64_t>(copy * numel * dtype_size(dt));
    std::int64_t stride = numel;
    int i = 0;
    for (std::int64_t s : shape) {
      stride /= s;
      v.shape[i] = s;
      v.strides[i++] = stride;
    }
    v.dtype = dt;
    v.device = static_cast<int>(o_.device);
    return v;
  }

  Status launch(long long i, const Problem& pb) {
    const long long c = i % copies_;
    const std::int64_t T = pb.tokens, S = pb.seqlen, Hq = o_.heads_q, Hkv = o_.heads_kv, D = o_.head_dim;
    TensorView mask, po, pl;
    AttentionArgs a;
    a.q = view(q_, c, {T, Hq, D}, o_.dtype);
    a.k = view(k_, c, {S, Hkv, D}, o_.dtype);
    a.v = view(v_, c, {S, Hkv, D}, o_.dtype);
    a.out = view(out_, c, {T, Hq, D}, o_.dtype);
    if (tree_ != nullptr) {
      mask = view(tree_, 0, {T, words_}, DType::kInt64);
      a.tree_mask = &mask;
    }
    TensorView resume;
    if (resume_ != nullptr) {
      resume = view(resume_, 0, {T * Hq, attention_resume_stride(static_cast<int>(D))}, DType::kFloat32);
      a.resume = &resume;
    }
    a.chunk_tiles = chunk_tiles_;
    if (partial_out_ != nullptr) {
      po = view(partial_out_, 0, {splits_, T * Hq, D}, DType::kFloat32);
      pl = view(partial_lse_, 0, {splits_, T * Hq}, DType::kFloat32);
      a.partial_out = &po;
      a.partial_lse = &pl;
    }
    a.scale = 1.f / std::sqrt(static_cast<float>(D));
    a.splits = splits_;
    a.sm90 = sm90(pb);
    return attention(a, stream_);
  }

  std::string verify(const Problem& pb) {
    const std::int64_t T = pb.tokens, S = pb.seqlen, Hq = o_.heads_q, D = o_.head_dim;
    // Poison copy 0 of the output and the scratch: all-ones bytes are NaN in bf16, fp16 and fp32.
    BENCH_CHECK(cudaMemsetAsync(out_, 0xff, q_elems_ * elt(), stream_));
    if (partial_out_ != nullptr) {
      BENCH_CHECK(cudaMemsetAsync(partial_out_, 0xff, splits_ * q_elems_ * 4, stream_));
      BENCH_CHECK(cudaMemsetAsync(partial_lse_, 0xff, splits_ * T * Hq * 4, stream_));
    }
    const Status st = launch(0, pb);
    if (!st.ok()) return "attention failed: " + st.message();
    // Rows to check: first and last token, the rest spread with a fixed seed.
    std::mt19937 rng(99);
    const long long n = std::min<long long>(o_.check_rows, T * Hq);
    std::vector<int> rows;
    for (long long i = 0; i < n; ++i) {
      const int tok = i == 0 ? 0 : i == 1 ? static_cast<int>(T - 1) : static_cast<int>(rng() % T);
      rows.push_back(tok);
      rows.push_back(static_cast<int>(rng() % Hq));
    }
    int* rows_dev = nullptr;
    float *scores = nullptr, *ref = nullptr;
    std::string err;
    if (!(err = alloc(&rows_dev, rows.size() * 4)).empty()) return err;
    if (!(err = alloc(&scores, n * S * 4)).empty()) return err;
    if (!(err = alloc(&ref, n * D * 4)).empty()) return err;
    BENCH_CHECK(cudaMemcpyAsync(rows_dev, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, stream_));
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    if (o_.dtype == DType::kBFloat16) {
      reference_rows<__nv_bfloat16><<<static_cast<unsigned>(n), 256, 0, stream_>>>(
          static_cast<const __nv_bfloat16*>(q_), static_cast<const __nv_bfloat16*>(k_),
          static_cast<const __nv_bfloat16*>(v_), tree_, words_, rows_dev, T, S, Hq, o_.heads_kv, D, scale, scores,
          ref);
    } else {
      reference_rows<__half><<<static_cast<unsigned>(n), 256, 0, stream_>>>(static_cast<const __half*>(q_), static_cast<const __half*>(k_),
                                                     static_cast<const __half*>(v_), tree_, words_, rows_dev, T, S,
                                                     Hq, o_.heads_kv, D, scale, scores, ref);
    }
    BENCH_CHECK(cudaGetLastError());
    std::vector<std::uint16_t> out(q_elems_);
    std::vector<float> ref_host(n * D);
    BENCH_CHECK(cudaMemcpyAsync(out.data(), out_, q_elems_ * elt(), cudaMemcpyDeviceToHost, stream_));
    BENCH_CHECK(cudaMemcpyAsync(ref_host.data(), ref, n * D * 4, cudaMemcpyDeviceToHost, stream_));
    BENCH_CHECK(cudaStreamSynchronize(stream_));
    for (std::int64_t i = 0; i < q_elems_; ++i) {
      if (!std::isfinite(host_float(out[i], o_.dtype))) {
        return "output element " + std::to_string(i) + " is not finite (never written, or NaN leaked in)";
      }
    }
    const float unit = o_.dtype == DType::kBFloat16 ? 0x1p-8f : 0x1p-11f;
    for (long long i = 0; i < n; ++i) {
      const int tok = rows[2 * i], head = rows[2 * i + 1];
      float row_max = 0.f, err_max = 0.f;
      for (int d = 0; d < D; ++d) row_max = std::max(row_max, std::fabs(ref_host[i * D + d]));
      for (int d = 0; d < D; ++d) {
        const float ours = host_float(out[(static_cast<std::int64_t>(tok) * Hq + head) * D + d], o_.dtype);
        err_max = std::max(err_max, std::fabs(ours - ref_host[i * D + d]));
      }
      if (!(err_max <= 8.f * unit * row_max + 1e-6f)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, "row (token %d, head %d): max error %.3g above %.3g (8 units x max |ref| %.3g)",
                      tok, head, err_max, 8.f * unit * row_max, row_max);
        return buf;
      }
    }
    return "";
  }

  std::string time(Result* r) {
    std::string err = timer_.median_ms(
        stream_, o_.warmup, o_.repeats, o_.batch,
        [&](long long i) {
          const Status st = launch(i, r->pb);
          return st.ok() ? std::string() : st.message();
        },
        &r->ms);
    if (!err.empty()) return err;
    return timer_.median_ms(
        stream_, o_.warmup, o_.repeats, o_.batch,
        [&](long long i) {
          const std::size_t off = static_cast<std::size_t>(i % copies_) * copy_bytes_;
          const cudaError_t e = cudaMemcpyAsync(static_cast<char*>(copy_dst_) + off,
                                                static_cast<char*>(copy_src_) + off, copy_bytes_,
                                                cudaMemcpyDeviceToDevice, stream_);
          return e == cudaSuccess ? std::string() : std::string("cudaMemcpyAsync: ") + cudaGetErrorString(e);
        },
        &r->copy_ms);
  }

  void free_all() {
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    q_ = k_ = v_ = out_ = nullptr;
    tree_ = nullptr;
    partial_out_ = partial_lse_ = resume_ = nullptr;
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }

  const Options& o_;
  const cudaDeviceProp& prop_;
  std::vector<void*> owned_;
  void *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *out_ = nullptr, *copy_src_ = nullptr, *copy_dst_ = nullptr;
  std::uint64_t* tree_ = nullptr;
  float *partial_out_ = nullptr, *partial_lse_ = nullptr, *resume_ = nullptr;
  int chunk_tiles_ = 0;
  std::int64_t q_elems_ = 0, kv_elems_ = 0;
  std::size_t copy_bytes_ = 0;
  long long copies_ = 1;
  int words_ = 0, splits_ = 1;
  cudaStream_t stream_ = nullptr;
  BatchTimer timer_;
};

double tflops(const Options& o, const Result& r) { return 4.0 * o.head_dim * o.heads_q * r.pb.pairs / (r.ms * 1e9); }

bool write_json(const Options& o, const std::string& device, const std::vector<Result>& results) {
  const std::string notes =
      format("bench/cpp/bench_attention, %s, heads %lld/%lld, D %lld; verified on sampled rows against a naive fp32 "
             "GPU reference; CUDA events, median of %lld samples of %lld back-to-back calls on inputs rotated "
             "through > 3x L2; baseline = device-to-device copy of the K/V bytes",
             dtype_name(o.dtype), o.heads_q, o.heads_kv, o.head_dim, o.repeats, o.batch);
  std::vector<std::string> rows;
  for (const Result& r : results) {
    if (!r.error.empty()) continue;
    rows.push_back(format("{\"case\": \"%s\", \"tokens\": %lld, \"seqlen\": %lld, \"splits\": %d, \"ours_ms\": %.6f, "
                          "\"baseline\": \"cudaMemcpyAsync D2D of the K/V bytes\", \"baseline_ms\": %.6f, "
                          "\"speedup\": %.3f, \"tbps\": %.3f, \"tflops\": %.2f, \"copy_tbps\": %.3f}",
                          r.name.c_str(), r.pb.tokens, r.pb.seqlen, r.splits, r.ms, r.copy_ms, r.copy_ms / r.ms,
                          r.bytes / (r.ms * 1e9), tflops(o, r), 2 * r.kv_bytes / (r.copy_ms * 1e9)));
  }
  return write_results_json("bench_attention", o.json, "attention_cpp", device, o.commit, notes, rows);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool help = false;
  const std::string usage_error = parse_args(argc, argv, &o, &help);
  cudaDeviceProp prop;
  const int status = start_main("bench_attention", kUsage, help, usage_error, o.device, &prop);
  if (status >= 0) return status;
  if (o.sm90 != 0 && (prop.major != 9 || prop.minor != 0)) {
    std::printf("bench_attention: --sm90 needs a compute capability 9.0 GPU, this is %d.%d; nothing run\n", prop.major,
                prop.minor);
    return 77;
  }
  std::printf("%s; %s, %lld q / %lld kv heads, D %lld\n", describe_device(o.device, prop).c_str(),
              dtype_name(o.dtype), o.heads_q, o.heads_kv, o.head_dim);
  std::printf("%-26s %6s %7s %6s %10s %8s %9s %10s %9s\n", "case", "T", "S", "splits", "ms", "TB/s", "TFLOP/s",
              "copy TB/s", "% copy");
  Bench bench(o, prop);
  std::vector<Result> results;
  bool failed = false;
  for (const std::string& phase : o.phases) {
    for (long long ctx : o.contexts) {
      Problem pb;
      pb.phase = phase;
      pb.context = ctx;
      pb.tokens = phase == "decode" ? 1 : phase == "tree" ? o.tree_tokens : ctx;
      pb.seqlen = phase == "prefill" ? ctx : ctx + pb.tokens;
      Result r = bench.run(pb);
      if (!r.error.empty()) {
        std::printf("%-26s FAILED: %s\n", r.name.c_str(), r.error.c_str());
        failed = true;
      } else {
        const double tbps = r.bytes / (r.ms * 1e9), copy_tbps = 2 * r.kv_bytes / (r.copy_ms * 1e9);
        std::printf("%-26s %6lld %7lld %6d %10.4f %8.3f %9.2f %10.3f %8.1f%%\n", r.name.c_str(), pb.tokens,
                    pb.seqlen, r.splits, r.ms, tbps, tflops(o, r), copy_tbps, 100 * tbps / copy_tbps);
      }
      results.push_back(r);
    }
  }
  if (!o.json.empty() && !write_json(o, prop.name, results)) return kExitFailed;
  return failed ? kExitFailed : kExitOk;
}
