// bench_basic_ops: verify, then time, edgespec's basic kernels (RMSNorm with and without the
// fused residual add, RoPE, SiLU-and-mul, embedding, argmax) through the same checked entry points
// the Python extension calls.
//
// For each op: fill the inputs on the device with hashed uniform values, run the kernel once and
// compare with a plain CPU reference (fp32 math on the same rounded inputs), then time it with
// CUDA events: warm-up launches, then --repeats samples of --batch back-to-back launches each,
// reporting the median per-launch time. Each sample is queued behind a kernel that spins until
// the host has enqueued the whole batch, so the events time the GPU running the kernels back to
// back rather than the host's launch rate (a decode-size kernel runs in about the time it takes
// to launch it). Every tensor is rotated through enough copies that one
// pass over them exceeds 3x the L2 cache, so a small decode-size problem is timed from HBM as in
// a real model (where the next layer's weights evict this one's), not from L2. The named baseline
// is cudaMemcpyAsync device-to-device moving the same number of bytes, measured the same way in
// the same run.
//
// Exit status: 0 verified and timed; 1 a kernel failed or disagreed with the reference;
// 2 bad command line; 77 no CUDA device (the automake/CTest convention for "skipped").
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "common/status.h"
#include "common/tensor_view.h"
#include "common/vec.cuh"
#include "kernels/activation.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/sampling.h"

namespace {

using namespace edgespec;
using namespace edgespec::bench;

const char kUsage[] = R"(usage: bench_basic_ops [options]

Verifies each kernel against a CPU reference, then times it (CUDA events, median of repeats,
inputs rotated through more than 3x L2) next to a device-to-device memcpy of the same bytes.

problem size (defaults: one decode step of a Llama-3.1-8B-shaped model)
  --rows N          rows / tokens                                  (default 1)
  --hidden H        hidden size (RMSNorm, embedding)               (default 4096)
  --inter I         SiLU-and-mul output width                      (default 14336)
  --vocab V         vocabulary (embedding table rows, argmax)      (default 128256)
  --heads-q N       query heads (RoPE)                             (default 32)
  --heads-kv N      key/value heads (RoPE)                         (default 8)
  --head-dim D      head dim (RoPE)                                (default 128)
  --rotary-dim R    rotary dim, even, <= D (RoPE)                  (default D)
  --positions P     rows of the RoPE cos/sin table                 (default 8192)
  --dtype T         bf16 | fp16 | fp32                             (default bf16)
measurement
  --ops LIST        comma list of rms_norm, rms_norm_residual, rope, silu_and_mul,
                    embedding, argmax                              (default all)
  --warmup N        launches before timing                         (default 20)
  --repeats N       timed samples; the median is reported          (default 50)
  --batch N         back-to-back launches per sample               (default 10)
  --device N        CUDA device index                              (default 0)
  --json PATH       also write the results in the bench/results JSON format
  --commit SHA      commit recorded in the JSON                    (default "unknown")
  --help            this text

exit status: 0 ok; 1 a kernel failed or disagreed with the reference; 2 bad command line;
77 no CUDA device (nothing was run).
)";

struct Options {
  long long rows = 1, hidden = 4096, inter = 14336, vocab = 128256;
  long long heads_q = 32, heads_kv = 8, head_dim = 128, rotary_dim = -1, positions = 8192;
  DType dtype = DType::kBFloat16;
  std::vector<std::string> ops = {"rms_norm", "rms_norm_residual", "rope", "silu_and_mul", "embedding", "argmax"};
  long long warmup = 20, repeats = 50, batch = 10, device = 0;
  std::string json, commit = "unknown";
};

// Returns an empty string on success, else what was wrong.
std::string parse_args(int argc, char** argv, Options* o, bool* help) {
  struct Count { const char* flag; long long* value; long long min; };
  const Count counts[] = {
      {"--rows", &o->rows, 1},        {"--hidden", &o->hidden, 1},     {"--inter", &o->inter, 1},
      {"--vocab", &o->vocab, 1},      {"--heads-q", &o->heads_q, 1},   {"--heads-kv", &o->heads_kv, 1},
      {"--head-dim", &o->head_dim, 2}, {"--rotary-dim", &o->rotary_dim, 2},
      {"--positions", &o->positions, 1}, {"--warmup", &o->warmup, 0},  {"--repeats", &o->repeats, 1},
      {"--batch", &o->batch, 1},      {"--device", &o->device, 0},
  };
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return "";
    }
    if (i + 1 >= argc) return flag + " needs a value (or unknown option)";
    const char* value = argv[++i];
    bool matched = false;
    for (const Count& c : counts) {
      if (flag == c.flag) {
        if (!parse_int(value, c.min, c.value)) {
          return flag + " expects an integer >= " + std::to_string(c.min) + ", got '" + value + "'";
        }
        matched = true;
      }
    }
    if (matched) continue;
    if (flag == "--dtype") {
      const std::string v = value;
      if (v == "bf16") o->dtype = DType::kBFloat16;
      else if (v == "fp16") o->dtype = DType::kFloat16;
      else if (v == "fp32") o->dtype = DType::kFloat32;
      else return "--dtype expects bf16, fp16 or fp32, got '" + v + "'";
    } else if (flag == "--ops") {
      o->ops = split_commas(value);
      for (const std::string& op : o->ops) {
        const char* known[] = {"rms_norm", "rms_norm_residual", "rope", "silu_and_mul", "embedding", "argmax"};
        if (std::none_of(std::begin(known), std::end(known), [&](const char* k) { return op == k; })) {
          return "--ops: unknown op '" + op + "'";
        }
      }
    } else if (flag == "--json") {
      o->json = value;
    } else if (flag == "--commit") {
      o->commit = value;
    } else {
      return "unknown option " + flag;
    }
  }
  if (o->rotary_dim < 0) o->rotary_dim = o->head_dim;
  if (o->rotary_dim % 2 != 0 || o->rotary_dim > o->head_dim) {
    return "--rotary-dim must be even and at most --head-dim";
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Device-side fills: every element of every copy gets a distinct hashed value, so no two rotated
// copies are identical and no zeros sneak in.

__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void fill_uniform(T* p, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const float u = static_cast<float>(splitmix64(seed ^ (i * 0x2545f4914f6cdd1dull)) >> 40) * 0x1p-24f;
    p[i] = from_float<T>(2.f * u - 1.f);  // [-1, 1)
  }
}

__global__ void fill_index(std::int64_t* p, std::int64_t n, std::uint64_t seed, std::int64_t modulo) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<std::int64_t>(splitmix64(seed ^ (i * 0x2545f4914f6cdd1dull)) % modulo);
  }
}

// ---------------------------------------------------------------------------------------------
// Host conversions of device storage.

float load_host(const unsigned char* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat32: { float f; std::memcpy(&f, base + 4 * i, 4); return f; }
    case DType::kFloat16: { __half h; std::memcpy(&h, base + 2 * i, 2); return __half2float(h); }
    case DType::kBFloat16: { __nv_bfloat16 b; std::memcpy(&b, base + 2 * i, 2); return __bfloat162float(b); }
    case DType::kInt32: { std::int32_t v; std::memcpy(&v, base + 4 * i, 4); return static_cast<float>(v); }
    case DType::kInt64: { std::int64_t v; std::memcpy(&v, base + 8 * i, 8); return static_cast<float>(v); }
  }
  return NAN;
}

float round_to(DType dtype, float x) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(__float2half_rn(x));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(x));
    default: return x;
  }
}

// Relative tolerance: two roundings to the storage type (unit roundoff 2^-8 for bf16, 2^-11 for
// fp16) plus fp32 reassociation of the sums.
float tolerance(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16: return 1.f / 64;
    case DType::kFloat16: return 1.f / 512;
    default: return 2e-5f;
  }
}

// ---------------------------------------------------------------------------------------------
// A benchmark case: its tensors (each rotated through a device pool), a launch and a check.

struct Arg {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  bool output = false;
  bool rotate = true;            // false: one copy (the embedding table is gathered, not streamed)
  std::int64_t index_range = 0;  // int64 inputs: values in [0, index_range)

  unsigned char* pool = nullptr;
  std::size_t slice_bytes = 0;
  long long copies = 1;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t s : shape) n *= s;
    return n;
  }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  TensorView view(long long iteration) const {
    TensorView v;
    v.data = reinterpret_cast<std::uintptr_t>(pool + (iteration % copies) * slice_bytes);
    v.rank = static_cast<int>(shape.size());
    std::int64_t stride = 1;
    for (int i = v.rank - 1; i >= 0; --i) {
      v.shape[i] = shape[i];
      v.strides[i] = stride;
      stride *= shape[i];
    }
    v.dtype = dtype;
    v.device = 0;  // overwritten with the selected device by the runner
    return v;
  }
};

using Host = std::vector<std::vector<float>>;  // slice 0 of every arg, as float

struct Case {
  std::string op, shape;
  std::vector<Arg> args;
  double bytes_moved = 0;  // minimum HBM traffic per call: every input read once, outputs written
  std::function<Status(const std::vector<TensorView>&, cudaStream_t)> launch;
  // Returns "" when the outputs in `host` match the reference, else the first mismatch.
  std::function<std::string(const Host&)> check;
};

std::string dims(std::initializer_list<long long> values) {
  std::string s = "[";
  for (long long v : values) s += (s.size() > 1 ? "," : "") + std::to_string(v);
  return s + "]";
}

// Compares out[i] to ref[i] with |out - ref| <= tol * (1 + |ref|); exact when tol == 0.
std::string compare(const char* what, const std::vector<float>& out, const std::vector<float>& ref, float tol) {
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const float err = std::fabs(out[i] - ref[i]);
    if (!(err <= tol * (1.f + std::fabs(ref[i])))) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s[%zu] = %g, reference %g (tolerance %g)", what, i, out[i], ref[i],
                    tol * (1.f + std::fabs(ref[i])));
      return buf;
    }
  }
  return "";
}

Case rms_norm_case(const Options& o, bool residual) {
  const long long R = o.rows, H = o.hidden;
  const DType t = o.dtype;
  Case c;
  c.op = residual ? "rms_norm_residual" : "rms_norm";
  c.shape = "x" + dims({R, H});
  c.args = {{"x", t, {R, H}}, {"weight", t, {H}}, {"out", t, {R, H}, true}};
  if (residual) {
    c.args.push_back({"residual", t, {R, H}});
    c.args.push_back({"residual_out", t, {R, H}, true});
  }
  const double es = dtype_size(t);
  c.bytes_moved = es * (H + R * H * (residual ? 4 : 2));
  c.launch = [residual](const std::vector<TensorView>& v, cudaStream_t s) {
    RmsNormArgs a{v[0], v[1], residual ? &v[3] : nullptr, v[2], residual ? &v[4] : nullptr, 1e-6f};
    return rms_norm(a, s);
  };
  c.check = [R, H, t, residual](const Host& h) {
    std::vector<float> ref(R * H), s_ref(R * H), s_row(H);
    for (long long r = 0; r < R; ++r) {
      double sum_sq = 0;
      for (long long i = 0; i < H; ++i) {
        const float x = h[0][r * H + i];
        s_row[i] = residual ? round_to(t, x + h[3][r * H + i]) : x;
        s_ref[r * H + i] = s_row[i];
        sum_sq += double(s_row[i]) * s_row[i];
      }
      const float inv = 1.f / std::sqrt(float(sum_sq / H) + 1e-6f);
      for (long long i = 0; i < H; ++i) ref[r * H + i] = round_to(t, s_row[i] * inv * h[1][i]);
    }
    std::string err = compare("out", h[2], ref, tolerance(t));
    if (err.empty() && residual) err = compare("residual_out", h[4], s_ref, 0.f);
    return err;
  };
  return c;
}

Case rope_case(const Options& o) {
  const long long T = o.rows, Hq = o.heads_q, Hk = o.heads_kv, D = o.head_dim, half = o.rotary_dim / 2;
  const long long P = o.positions;
  const DType t = o.dtype;
  Case c;
  c.op = "rope";
  c.shape = "q" + dims({T, Hq, D}) + " k" + dims({T, Hk, D}) + " rot" + std::to_string(2 * half);
  c.args = {{"q", t, {T, Hq, D}},
            {"k", t, {T, Hk, D}},
            {"positions", DType::kInt64, {T}, false, true, P},
            {"cos", DType::kFloat32, {P, half}, false, false},
            {"sin", DType::kFloat32, {P, half}, false, false},
            {"q_out", t, {T, Hq, D}, true},
            {"k_out", t, {T, Hk, D}, true}};
  c.bytes_moved = 2.0 * dtype_size(t) * T * (Hq + Hk) * D + 8.0 * T + 2.0 * 4 * T * half;
  c.launch = [](const std::vector<TensorView>& v, cudaStream_t s) {
    return apply_rope(RopeArgs{v[0], v[1], v[2], v[3], v[4], v[5], v[6]}, s);
  };
  c.check = [T, Hq, Hk, D, half, t](const Host& h) {
    for (int which = 0; which < 2; ++which) {
      const long long heads = which == 0 ? Hq : Hk;
      const std::vector<float>& x = h[which];
      std::vector<float> ref(T * heads * D);
      for (long long tok = 0; tok < T; ++tok) {
        const long long pos = static_cast<long long>(h[2][tok]);
        for (long long hd = 0; hd < heads; ++hd) {
          const float* src = &x[(tok * heads + hd) * D];
          float* dst = &ref[(tok * heads + hd) * D];
          for (long long d = 0; d < half; ++d) {
            const float cs = h[3][pos * half + d], sn = h[4][pos * half + d];
            dst[d] = round_to(t, src[d] * cs - src[d + half] * sn);
            dst[d + half] = round_to(t, src[d + half] * cs + src[d] * sn);
          }
          for (long long d = 2 * half; d < D; ++d) dst[d] = src[d];
        }
      }
      const std::string err = compare(which == 0 ? "q_out" : "k_out", h[5 + which], ref, tolerance(t));
      if (!err.empty()) return err;
    }
    return std::string();
  };
  return c;
}

Case silu_case(const Options& o) {
  const long long R = o.rows, I = o.inter;
  const DType t = o.dtype;
  Case c;
  c.op = "silu_and_mul";
  c.shape = "x" + dims({R, 2 * I});
  c.args = {{"x", t, {R, 2 * I}}, {"out", t, {R, I}, true}};
  c.bytes_moved = 3.0 * dtype_size(t) * R * I;
  c.launch = [](const std::vector<TensorView>& v, cudaStream_t s) { return silu_and_mul(SiluAndMulArgs{v[0], v[1]}, s); };
  c.check = [R, I, t](const Host& h) {
    std::vector<float> ref(R * I);
    for (long long r = 0; r < R; ++r) {
      for (long long i = 0; i < I; ++i) {
        const float g = h[0][r * 2 * I + i], u = h[0][r * 2 * I + I + i];
        ref[r * I + i] = round_to(t, g / (1.f + std::exp(-g)) * u);
      }
    }
    return compare("out", h[1], ref, tolerance(t));
  };
  return c;
}

Case embedding_case(const Options& o) {
  const long long T = o.rows, V = o.vocab, H = o.hidden;
  const DType t = o.dtype;
  const float scale = 12.f;  // MiniCPM's scale_emb; exercises the multiply
  Case c;
  c.op = "embedding";
  c.shape = "ids[" + std::to_string(T) + "] table" + dims({V, H});
  c.args = {{"ids", DType::kInt64, {T}, false, true, V}, {"table", t, {V, H}, false, false}, {"out", t, {T, H}, true}};
  c.bytes_moved = 2.0 * dtype_size(t) * T * H + 8.0 * T;
  c.launch = [scale](const std::vector<TensorView>& v, cudaStream_t s) {
    return embedding(EmbeddingArgs{v[0], v[1], v[2], scale}, s);
  };
  c.check = [T, H, t, scale](const Host& h) {
    std::vector<float> ref(T * H);
    for (long long tok = 0; tok < T; ++tok) {
      const long long id = static_cast<long long>(h[0][tok]);
      for (long long i = 0; i < H; ++i) ref[tok * H + i] = round_to(t, h[1][id * H + i] * scale);
    }
    return compare("out", h[2], ref, 0.f);
  };
  return c;
}

Case argmax_case(const Options& o) {
  const long long T = o.rows, V = o.vocab;
  const DType t = o.dtype;
  Case c;
  c.op = "argmax";
  c.shape = "logits" + dims({T, V});
  c.args = {{"logits", t, {T, V}}, {"out", DType::kInt64, {T}, true}};
  c.bytes_moved = double(dtype_size(t)) * T * V + 8.0 * T;
  c.launch = [](const std::vector<TensorView>& v, cudaStream_t s) { return argmax(ArgmaxArgs{v[0], v[1]}, s); };
  c.check = [T, V](const Host& h) {
    std::vector<float> ref(T);
    for (long long r = 0; r < T; ++r) {
      long long best = 0;  // strict > keeps the lowest index among ties; inputs have no NaN
      for (long long i = 1; i < V; ++i) {
        if (h[0][r * V + i] > h[0][r * V + best]) best = i;
      }
      ref[r] = static_cast<float>(best);
    }
    return compare("out", h[1], ref, 0.f);
  };
  return c;
}

// ---------------------------------------------------------------------------------------------

struct Result {
  std::string op, shape, error;
  double ours_ms = 0, copy_ms = 0, bytes = 0;
};

#define BENCH_CUDA(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t bench_err_ = (expr);                                                 \
    if (bench_err_ != cudaSuccess) return std::string(#expr) + ": " + cudaGetErrorString(bench_err_); \
  } while (0)

class Runner {
 public:
  Runner(const Options& o, std::size_t l2_bytes) : o_(o), l2_bytes_(l2_bytes) {}
  ~Runner() { release(); }

  Result run(Case& c) {
    Result r{c.op, c.shape, "", 0, 0, c.bytes_moved};
    r.error = allocate(c);
    if (r.error.empty()) r.error = verify(c);
    if (r.error.empty()) r.error = time(c, &r);
    release();
    return r;
  }

 private:
  // Enough copies that one pass over every rotated tensor is >= 3x L2, capped so that tiny
  // tensors do not need millions of slices.
  long long copies_for(std::size_t rotated_bytes) const {
    const std::size_t target = 3 * l2_bytes_;
    const long long copies = static_cast<long long>((target + rotated_bytes - 1) / std::max<std::size_t>(rotated_bytes, 1));
    return std::clamp<long long>(copies, 1, 1 << 16);
  }

  static std::size_t round_up(std::size_t n) { return (n + 255) / 256 * 256; }  // keeps slices aligned

  std::string allocate(Case& c) {
    std::size_t rotated = 0;
    for (const Arg& a : c.args) rotated += a.rotate ? round_up(a.bytes()) : 0;
    copies_ = copies_for(rotated);
    std::uint64_t seed = 1;
    for (Arg& a : c.args) {
      a.slice_bytes = round_up(std::max<std::size_t>(a.bytes(), 1));
      a.copies = a.rotate ? copies_ : 1;
      BENCH_CUDA(cudaMalloc(&a.pool, a.slice_bytes * a.copies));
      allocations_.push_back(a.pool);
      const std::int64_t n = static_cast<std::int64_t>(a.slice_bytes * a.copies / dtype_size(a.dtype));
      if (a.output) {
        BENCH_CUDA(cudaMemset(a.pool, 0xff, a.slice_bytes * a.copies));  // NaN / -1: unwritten shows
      } else if (a.dtype == DType::kInt64) {
        fill_index<<<1024, 256>>>(reinterpret_cast<std::int64_t*>(a.pool), n, seed++, a.index_range);
      } else if (a.dtype == DType::kFloat32) {
        fill_uniform<float><<<1024, 256>>>(reinterpret_cast<float*>(a.pool), n, seed++);
      } else if (a.dtype == DType::kFloat16) {
        fill_uniform<__half><<<1024, 256>>>(reinterpret_cast<__half*>(a.pool), n, seed++);
      } else if (a.dtype == DType::kBFloat16) {
        fill_uniform<__nv_bfloat16><<<1024, 256>>>(reinterpret_cast<__nv_bfloat16*>(a.pool), n, seed++);
      } else {
        return "bench: no fill for dtype " + std::string(dtype_name(a.dtype));
      }
      BENCH_CUDA(cudaGetLastError());
    }
    // The baseline copy moves bytes_moved / 2 from one rotated pool to another.
    copy_bytes_ = round_up(static_cast<std::size_t>(c.bytes_moved / 2));
    copy_copies_ = copies_for(2 * copy_bytes_);
    BENCH_CUDA(cudaMalloc(&copy_src_, copy_bytes_ * copy_copies_));
    allocations_.push_back(copy_src_);
    BENCH_CUDA(cudaMalloc(&copy_dst_, copy_bytes_ * copy_copies_));
    allocations_.push_back(copy_dst_);
    BENCH_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    BENCH_CUDA(cudaDeviceSynchronize());
    return "";
  }

  std::vector<TensorView> views(const Case& c, long long iteration) const {
    std::vector<TensorView> v;
    for (const Arg& a : c.args) {
      v.push_back(a.view(iteration));
      v.back().device = static_cast<int>(o_.device);
    }
    return v;
  }

  std::string verify(Case& c) {
    const Status st = c.launch(views(c, 0), stream_);
    if (!st.ok()) return "launch failed: " + st.message();
    BENCH_CUDA(cudaStreamSynchronize(stream_));
    Host host;
    std::vector<unsigned char> raw;
    for (const Arg& a : c.args) {
      raw.resize(a.bytes());
      BENCH_CUDA(cudaMemcpy(raw.data(), a.pool, a.bytes(), cudaMemcpyDeviceToHost));
      std::vector<float> f(a.numel());
      for (std::int64_t i = 0; i < a.numel(); ++i) f[i] = load_host(raw.data(), a.dtype, i);
      host.push_back(std::move(f));
    }
    const std::string mismatch = c.check(host);
    return mismatch.empty() ? "" : "verification failed: " + mismatch;
  }

  std::string time(Case& c, Result* r) {
    std::string err = timer_.median_ms(
        stream_, o_.warmup, o_.repeats, o_.batch,
        [&](long long i) {
          const Status st = c.launch(views(c, i), stream_);
          return st.ok() ? std::string() : st.message();
        },
        &r->ours_ms);
    if (!err.empty()) return err;
    return timer_.median_ms(
        stream_, o_.warmup, o_.repeats, o_.batch,
        [&](long long i) {
          const std::size_t off = static_cast<std::size_t>(i % copy_copies_) * copy_bytes_;
          const cudaError_t e = cudaMemcpyAsync(copy_dst_ + off, copy_src_ + off, copy_bytes_,
                                                cudaMemcpyDeviceToDevice, stream_);
          return e == cudaSuccess ? std::string() : std::string("cudaMemcpyAsync: ") + cudaGetErrorString(e);
        },
        &r->copy_ms);
  }

  void release() {
    for (void* p : allocations_) cudaFree(p);
    allocations_.clear();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }

  const Options& o_;
  std::size_t l2_bytes_;
  long long copies_ = 1, copy_copies_ = 1;
  std::size_t copy_bytes_ = 0;
  unsigned char* copy_src_ = nullptr;
  unsigned char* copy_dst_ = nullptr;
  std::vector<void*> allocations_;
  cudaStream_t stream_ = nullptr;
  BatchTimer timer_;
};

bool write_json(const Options& o, const std::string& device, const std::vector<Result>& results) {
  const std::string notes =
      format("bench/cpp/bench_basic_ops, dtype %s; CUDA events, %lld warm-up launches, median of %lld samples of "
             "%lld back-to-back launches, every tensor rotated through > 3x L2; gbps counts each input read once "
             "and each output written once",
             dtype_name(o.dtype), o.warmup, o.repeats, o.batch);
  std::vector<std::string> rows;
  for (const Result& r : results) {
    if (!r.error.empty()) continue;
    rows.push_back(format("{\"case\": \"%s %s\", \"ours_ms\": %.6f, \"baseline\": \"cudaMemcpyAsync D2D, same bytes\", "
                          "\"baseline_ms\": %.6f, \"speedup\": %.3f, \"gbps\": %.1f}",
                          r.op.c_str(), r.shape.c_str(), r.ours_ms, r.copy_ms, r.copy_ms / r.ours_ms,
                          r.bytes / r.ours_ms / 1e6));
  }
  return write_results_json("bench_basic_ops", o.json, "basic_ops", device, o.commit, notes, rows);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool help = false;
  const std::string usage_error = parse_args(argc, argv, &o, &help);
  cudaDeviceProp prop;
  const int status = start_main("bench_basic_ops", kUsage, help, usage_error, o.device, &prop);
  if (status >= 0) return status;
  std::printf("%s, dtype %s\n", describe_device(o.device, prop).c_str(), dtype_name(o.dtype));
  std::printf("%-18s %-40s %10s %9s %10s %9s %7s  %s\n", "op", "shape", "ours_ms", "GB/s", "copy_ms", "copy GB/s",
              "%copy", "check");

  Runner runner(o, static_cast<std::size_t>(prop.l2CacheSize));
  std::vector<Result> results;
  int exit_code = kExitOk;
  for (const std::string& op : o.ops) {
    Case c = op == "rms_norm"            ? rms_norm_case(o, false)
             : op == "rms_norm_residual" ? rms_norm_case(o, true)
             : op == "rope"              ? rope_case(o)
             : op == "silu_and_mul"      ? silu_case(o)
             : op == "embedding"         ? embedding_case(o)
                                         : argmax_case(o);
    Result r = runner.run(c);
    if (r.error.empty()) {
      const double gbps = r.bytes / r.ours_ms / 1e6, copy_gbps = r.bytes / r.copy_ms / 1e6;
      std::printf("%-18s %-40s %10.4f %9.1f %10.4f %9.1f %6.1f%%  ok\n", r.op.c_str(), r.shape.c_str(), r.ours_ms,
                  gbps, r.copy_ms, copy_gbps, 100.0 * r.copy_ms / r.ours_ms);
    } else {
      std::printf("%-18s %-40s FAILED: %s\n", r.op.c_str(), r.shape.c_str(), r.error.c_str());
      exit_code = kExitFailed;
    }
    results.push_back(r);
  }
  if (!o.json.empty() && !write_json(o, prop.name, results)) exit_code = kExitFailed;
  return exit_code;
}
