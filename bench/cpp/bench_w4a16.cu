// bench_w4a16: verify, then time, the W4A16 GEMM (csrc/kernels/w4a16.h) through the same checked
// entry point the Python extension calls, on the layer shapes of SmolLM2-135M, Llama-3.2-1B and
// Llama-3.1-8B (q|k|v and gate|up fused, as edgespec loads them) at M = 1, 4, 16, 32, 64 rows.
//
// Verify: random 4-bit words, scales (and integer zero points with --zeros int) and activations
// are generated on the device; the output (poisoned with NaN first) is compared on --check-cols
// columns, every row, with a float64 host reference that decodes the tile layout on its own from
// the description in w4a16.h (not from the packing code). Tolerance per element: 2 ulp of T times
// sum_k |x w| plus 1 ulp of |reference| (weights are rounded to T once, accumulation is fp32).
//
// Time: CUDA events around --batch back-to-back calls, each on a different weight copy (copies
// together > 3x L2, so weights stream from DRAM as in a model whose other layers evict them),
// queued behind a kernel that spins until the whole batch is enqueued; median of --repeats
// samples. Reported: ms, GB/s of the bytes the call must move (4-bit weights, scales, zeros,
// activations, output) and their share of the copy bandwidth measured in the same run.
// Baseline: a device-to-device copy whose traffic (bytes read + written) equals the bytes a bf16
// GEMM of the same shape reads (K x N x 2): the floor for cuBLAS bf16 at these M, which is what
// torch.matmul bf16 runs (the Python benchmark times torch.matmul and tinygemm themselves; this
// binary links no cuBLAS so that it builds with the bare toolkit).
//
// Exit status: 0 verified and timed; 1 a kernel failed or disagreed with the reference;
// 2 bad command line; 77 no CUDA device (the automake/CTest convention for "skipped").
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "bench_common.cuh"
#include "common/status.h"
#include "common/tensor_view.h"
#include "common/vec.cuh"
#include "kernels/w4a16.h"

namespace {

using namespace edgespec;
using namespace edgespec::bench;

const char kUsage[] = R"(usage: bench_w4a16 [options]

Verifies the W4A16 kernel against a float64 host reference on sampled columns, then times it
(CUDA events, median of repeats, weights rotated through more than 3x L2) next to a device copy
moving as many bytes as a bf16 GEMM of the same shape reads.

problem (default: every model, layer and row count below)
  --models LIST     comma list of smollm2-135m, llama3-1b, llama3-8b
  --layers LIST     comma list of qkv, o, gate_up, down (q|k|v and gate|up fused)
  --rows LIST       comma list of M values, 1..64            (default 1,4,16,32,64)
  --group G         group size, a multiple of 32 or -1 for per-channel (default 128)
  --zeros MODE      sym (zero point 8) | int (per-group integer zero points) (default sym)
  --dtype T         bf16 | fp16                                (default bf16)
  --splits N        force the split-K factor (default: the kernel's plan for this GPU)
measurement
  --warmup N        calls before timing                        (default 10)
  --repeats N       timed samples; the median is reported      (default 30)
  --batch N         back-to-back calls per sample              (default 16)
  --check-cols N    output columns checked against the reference (default 48)
  --device N        CUDA device index                          (default 0)
  --json PATH       also write the results in the bench/results JSON format
  --commit SHA      commit recorded in the JSON                (default "unknown")
  --help            this text

exit status: 0 ok; 1 a kernel failed or disagreed with the reference; 2 bad command line;
77 no CUDA device (nothing was run).
)";

struct Model {
  const char* name;
  long long hidden, inter, heads_q, heads_kv, head_dim;
};
const Model kModels[] = {{"smollm2-135m", 576, 1536, 9, 3, 64},
                         {"llama3-1b", 2048, 8192, 32, 8, 64},
                         {"llama3-8b", 4096, 14336, 32, 8, 128}};

struct Options {
  std::vector<std::string> models = {"smollm2-135m", "llama3-1b", "llama3-8b"};
  std::vector<std::string> layers = {"qkv", "o", "gate_up", "down"};
  std::vector<long long> rows = {1, 4, 16, 32, 64};
  long long group = 128, splits = 0;
  bool zeros = false;
  DType dtype = DType::kBFloat16;
  long long warmup = 10, repeats = 30, batch = 16, check_cols = 48, device = 0;
  std::string json, commit = "unknown";
};

const Model* find_model(const std::string& name) {
  for (const Model& m : kModels) {
    if (name == m.name) return &m;
  }
  return nullptr;
}

// (K, N) of a layer.
bool layer_shape(const Model& m, const std::string& layer, long long* k, long long* n) {
  const long long q = m.heads_q * m.head_dim, kv = m.heads_kv * m.head_dim;
  if (layer == "qkv") *k = m.hidden, *n = q + 2 * kv;
  else if (layer == "o") *k = q, *n = m.hidden;
  else if (layer == "gate_up") *k = m.hidden, *n = 2 * m.inter;
  else if (layer == "down") *k = m.inter, *n = m.hidden;
  else return false;
  return true;
}

std::string parse_args(int argc, char** argv, Options* o, bool* help) {
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      *help = true;
      return "";
    }
    if (i + 1 >= argc) return flag + " needs a value (or is unknown)";
    const std::string value = argv[++i];
    struct Count { const char* name; long long* field; long long min; };
    const Count counts[] = {{"--group", &o->group, -1},     {"--splits", &o->splits, 1},
                            {"--warmup", &o->warmup, 0},   {"--repeats", &o->repeats, 1},
                            {"--batch", &o->batch, 1},     {"--check-cols", &o->check_cols, 1},
                            {"--device", &o->device, 0}};
    const Count* count = nullptr;
    for (const Count& c : counts) count = flag == c.name ? &c : count;
    if (count != nullptr) {
      if (!parse_int(value, count->min, count->field)) {
        return flag + " expects an integer >= " + std::to_string(count->min) + ", got '" + value + "'";
      }
    } else if (flag == "--models") {
      o->models = split_commas(value);
      for (const std::string& m : o->models) {
        if (find_model(m) == nullptr) return "--models: unknown model '" + m + "'";
      }
    } else if (flag == "--layers") {
      o->layers = split_commas(value);
      long long k, n;
      for (const std::string& l : o->layers) {
        if (!layer_shape(kModels[0], l, &k, &n)) return "--layers: unknown layer '" + l + "'";
      }
    } else if (flag == "--rows") {
      o->rows.clear();
      for (const std::string& r : split_commas(value)) {
        long long m = 0;
        if (!parse_int(r, 1, &m) || m > kW4A16MaxRows) return "--rows: '" + r + "' is not in 1..64";
        o->rows.push_back(m);
      }
    } else if (flag == "--zeros") {
      if (value != "sym" && value != "int") return "--zeros expects sym or int, got '" + value + "'";
      o->zeros = value == "int";
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
  if (o->group == 0 || (o->group != -1 && o->group % kW4A16GroupAlign != 0)) {
    return "--group must be -1 or a positive multiple of " + std::to_string(kW4A16GroupAlign);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Device-side random inputs.

__global__ void fill_words(std::uint32_t* p, std::int64_t n, std::uint64_t seed) {
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    p[i] = mix_hash(seed * 0x9e3779b97f4a7c15ull + i);
  }
}

// mode 0: uniform in [lo, hi); mode 1: integers 0..15 (zero points).
template <typename T>
__global__ void fill_values(T* p, std::int64_t n, std::uint64_t seed, float lo, float hi, int mode) {
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) {
    const std::uint32_t h = mix_hash(seed * 0x9e3779b97f4a7c15ull + i);
    const float u = static_cast<float>(h >> 8) * 0x1p-24f;
    p[i] = from_float<T>(mode == 1 ? static_cast<float>(h & 15u) : lo + (hi - lo) * u);
  }
}

std::string cuda_error(const char* what, cudaError_t e) { return std::string(what) + ": " + cudaGetErrorString(e); }

double to_double_host(std::uint16_t bits, DType dtype) {
  // bf16: the high half of an fp32; fp16: decoded by hand (host code, no device intrinsics).
  if (dtype == DType::kBFloat16) {
    const std::uint32_t f = static_cast<std::uint32_t>(bits) << 16;
    float out;
    std::memcpy(&out, &f, 4);
    return out;
  }
  const int sign = bits >> 15, exp = (bits >> 10) & 31, man = bits & 1023;
  double v = exp == 0 ? std::ldexp(man, -24) : exp == 31 ? NAN : std::ldexp(1024 + man, exp - 25);
  return sign ? -v : v;
}

// The 4-bit value at (k, n) of a tile-layout weight, decoded from the description in w4a16.h.
int tile_value(const std::vector<std::uint32_t>& words, long long n_total, long long k, long long n) {
  const long long kt = k / 16, nt = n / 64, r = k % 16, c = n % 64;
  const long long j = c / 16, h = (c % 16) / 8, g = c % 8;
  const long long lane = 4 * g + (r % 8) / 2;
  // Fragment element e = 4h + 2 (r >= 8) + (r odd); nibble i holds e = [0,2,4,6,1,3,5,7][i].
  const int e = static_cast<int>(4 * h + 2 * (r >= 8) + (r % 2));
  const int nibble = e % 2 == 0 ? e / 2 : 4 + e / 2;
  const std::uint32_t word = words[((kt * (n_total / 64) + nt) * 32 + lane) * 4 + j];
  return static_cast<int>((word >> (4 * nibble)) & 15u);
}

struct Result {
  std::string name, error;
  long long m = 0, k = 0, n = 0;
  int splits = 1;
  double ms = 0, copy_ms = 0, bytes = 0, copy_bytes = 0;
};

class Bench {
 public:
  Bench(const Options& o, const cudaDeviceProp& prop) : o_(o), prop_(prop) { cudaStreamCreate(&stream_); }
  ~Bench() {
    release();
    cudaStreamDestroy(stream_);
  }
  Bench(const Bench&) = delete;
  Bench& operator=(const Bench&) = delete;

  Result run(const std::string& model, const std::string& layer, long long m) {
    Result r;
    r.name = model + " " + layer + " M=" + std::to_string(m);
    r.m = m;
    layer_shape(*find_model(model), layer, &r.k, &r.n);
    r.error = setup(r.k, r.n, m);
    if (r.error.empty()) r.error = verify(r);
    if (r.error.empty()) r.error = time(r);
    release();
    return r;
  }

 private:
  std::int64_t groups() const { return o_.group == -1 ? 1 : (k_ + o_.group - 1) / o_.group; }
  int group_size() const { return static_cast<int>(o_.group == -1 ? k_ : o_.group); }
  std::int64_t word_count() const { return k_ / 16 * 2 * n_; }
  std::size_t elem() const { return 2; }

  template <typename P>
  std::string alloc(P** p, std::size_t bytes) {
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(p), bytes);
    if (e != cudaSuccess) return cuda_error("cudaMalloc", e);
    owned_.push_back(*p);
    return "";
  }

  void release() {
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
  }

  std::string setup(long long k, long long n, long long m) {
    k_ = k, n_ = n, m_ = m;
    const std::size_t weight_bytes = word_count() * 4 + groups() * n * elem() * (o_.zeros ? 2 : 1);
    copies_ = std::max<long long>(1, std::min<long long>(64, (3ll * prop_.l2CacheSize + weight_bytes - 1) / weight_bytes));
    std::string err = alloc(&qweight_, word_count() * 4 * copies_);
    if (err.empty()) err = alloc(&scales_, groups() * n * elem() * copies_);
    if (err.empty() && o_.zeros) err = alloc(&zeros_, groups() * n * elem() * copies_);
    if (err.empty()) err = alloc(&x_, m * k * elem());
    if (err.empty()) err = alloc(&out_, m * n * elem());
    splits_ = o_.splits > 0 ? static_cast<int>(std::min<long long>(o_.splits, k / 16))
                            : w4a16_num_splits(n, k, prop_.multiProcessorCount);
    if (err.empty() && splits_ > 1) err = alloc(&partial_, sizeof(float) * splits_ * m * n);
    if (err.empty()) err = alloc(&counters_, sizeof(int) * (n / 64));
    // The copy baseline moves K * N bytes each way: the K * N * 2 bytes a bf16 GEMM reads.
    copy_bytes_ = static_cast<std::size_t>(k) * n;
    copy_copies_ = std::max<long long>(1, std::min<long long>(64, (3ll * prop_.l2CacheSize + copy_bytes_ - 1) / copy_bytes_));
    if (err.empty()) err = alloc(&copy_src_, copy_bytes_ * copy_copies_);
    if (err.empty()) err = alloc(&copy_dst_, copy_bytes_ * copy_copies_);
    if (!err.empty()) return err;
    cudaMemsetAsync(counters_, 0, sizeof(int) * (n / 64), stream_);
    cudaMemsetAsync(copy_src_, 1, copy_bytes_ * copy_copies_, stream_);
    fill_words<<<1024, 256, 0, stream_>>>(qweight_, word_count() * copies_, 1);
    const bool bf16 = o_.dtype == DType::kBFloat16;
    auto fill = [&](void* p, std::int64_t count, std::uint64_t seed, float lo, float hi, int mode) {
      if (bf16) fill_values<<<1024, 256, 0, stream_>>>(static_cast<__nv_bfloat16*>(p), count, seed, lo, hi, mode);
      else fill_values<<<1024, 256, 0, stream_>>>(static_cast<__half*>(p), count, seed, lo, hi, mode);
    };
    fill(scales_, groups() * n * copies_, 2, 0.002f, 0.02f, 0);
    if (o_.zeros) fill(zeros_, groups() * n * copies_, 3, 0.f, 0.f, 1);
    fill(x_, m * k, 4, -1.f, 1.f, 0);
    const cudaError_t e = cudaStreamSynchronize(stream_);
    return e == cudaSuccess ? "" : cuda_error("filling inputs", e);
  }

  TensorView view(void* p, std::initializer_list<std::int64_t> shape, DType dtype) const {
    TensorView v;
    v.data = reinterpret_cast<std::uintptr_t>(p);
    v.rank = static_cast<int>(shape.size());
    int i = 0;
    for (std::int64_t s : shape) v.shape[i++] = s;
    std::int64_t stride = 1;
    for (int d = v.rank - 1; d >= 0; --d) {
      v.strides[d] = stride;
      stride *= v.shape[d];
    }
    v.dtype = dtype;
    v.device = static_cast<int>(o_.device);
    return v;
  }

  std::string call(long long copy) {
    const TensorView x = view(x_, {m_, k_}, o_.dtype);
    const TensorView qw = view(qweight_ + copy * word_count(), {k_ / 16, 2 * n_}, DType::kInt32);
    const TensorView sc = view(reinterpret_cast<char*>(scales_) + copy * groups() * n_ * elem(), {groups(), n_}, o_.dtype);
    const TensorView zr = o_.zeros ? view(reinterpret_cast<char*>(zeros_) + copy * groups() * n_ * elem(), {groups(), n_}, o_.dtype)
                                   : TensorView{};
    const TensorView out = view(out_, {m_, n_}, o_.dtype);
    const TensorView partial = view(partial_, {splits_, m_, n_}, DType::kFloat32);
    const TensorView counters = view(counters_, {n_ / 64}, DType::kInt32);
    W4A16Args a{x, qw, sc, o_.zeros ? &zr : nullptr, nullptr, out, splits_ > 1 ? &partial : nullptr,
                splits_ > 1 ? &counters : nullptr, group_size(), splits_};
    const Status s = w4a16_gemm(a, stream_);
    return s.ok() ? "" : s.message();
  }

  std::string verify(Result& r) {
    cudaMemsetAsync(out_, 0xFF, m_ * n_ * elem(), stream_);  // NaN in bf16 and fp16
    std::string err = call(0);
    if (!err.empty()) return err;
    cudaError_t e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess) return cuda_error("running w4a16_gemm", e);
    std::vector<std::uint32_t> words(word_count());
    std::vector<std::uint16_t> sc(groups() * n_), zr(o_.zeros ? groups() * n_ : 0), x(m_ * k_), out(m_ * n_);
    cudaMemcpy(words.data(), qweight_, words.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(sc.data(), scales_, sc.size() * 2, cudaMemcpyDeviceToHost);
    if (o_.zeros) cudaMemcpy(zr.data(), zeros_, zr.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(x.data(), x_, x.size() * 2, cudaMemcpyDeviceToHost);
    e = cudaMemcpy(out.data(), out_, out.size() * 2, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return cuda_error("copying results", e);
    const double ulp = o_.dtype == DType::kBFloat16 ? 0x1p-8 : 0x1p-11;
    const long long cols = std::min<long long>(o_.check_cols, n_);
    for (long long c = 0; c < cols; ++c) {
      const long long n = c == cols - 1 ? n_ - 1 : (c * 7919) % n_;
      std::vector<double> w(k_);
      for (long long k = 0; k < k_; ++k) {
        const long long g = k / group_size();
        const double z = o_.zeros ? to_double_host(zr[g * n_ + n], o_.dtype) : 8.0;
        w[k] = (tile_value(words, n_, k, n) - z) * to_double_host(sc[g * n_ + n], o_.dtype);
      }
      for (long long row = 0; row < m_; ++row) {
        double ref = 0, mag = 0;
        for (long long k = 0; k < k_; ++k) {
          const double xv = to_double_host(x[row * k_ + k], o_.dtype);
          ref += xv * w[k];
          mag += std::fabs(xv * w[k]);
        }
        const double got = to_double_host(out[row * n_ + n], o_.dtype);
        const double tol = 2 * ulp * mag + ulp * std::fabs(ref);
        if (!(std::fabs(got - ref) <= tol)) {
          char msg[160];
          std::snprintf(msg, sizeof msg, "mismatch at row %lld, column %lld: got %.6g, reference %.6g (tolerance %.3g)",
                        row, n, got, ref, tol);
          return msg;
        }
      }
    }
    r.splits = splits_;
    return "";
  }

  std::string time(Result& r) {
    std::string err = timer_.median_ms(stream_, o_.warmup, o_.repeats, o_.batch,
                                       [&](long long i) { return call(i % copies_); }, &r.ms);
    if (!err.empty()) return err;
    err = timer_.median_ms(
        stream_, o_.warmup, o_.repeats, o_.batch,
        [&](long long i) {
          const std::size_t off = static_cast<std::size_t>(i % copy_copies_) * copy_bytes_;
          const cudaError_t e = cudaMemcpyAsync(copy_dst_ + off, copy_src_ + off, copy_bytes_,
                                                cudaMemcpyDeviceToDevice, stream_);
          return e == cudaSuccess ? std::string() : cuda_error("cudaMemcpyAsync", e);
        },
        &r.copy_ms);
    r.bytes = word_count() * 4.0 + groups() * n_ * elem() * (o_.zeros ? 2.0 : 1.0) + (m_ * k_ + m_ * n_) * elem();
    r.copy_bytes = 2.0 * copy_bytes_;
    return err;
  }

  const Options& o_;
  const cudaDeviceProp& prop_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> owned_;
  std::uint32_t* qweight_ = nullptr;
  void *scales_ = nullptr, *zeros_ = nullptr, *x_ = nullptr, *out_ = nullptr;
  float* partial_ = nullptr;
  int* counters_ = nullptr;
  char *copy_src_ = nullptr, *copy_dst_ = nullptr;
  long long k_ = 0, n_ = 0, m_ = 0, copies_ = 1, copy_copies_ = 1;
  std::size_t copy_bytes_ = 0;
  int splits_ = 1;
  BatchTimer timer_;
};

bool write_json(const Options& o, const std::string& device, const std::vector<Result>& results) {
  const std::string notes =
      format("bench/cpp/bench_w4a16, %s activations, group %lld, %s; verified against a float64 host reference "
             "decoding the tile layout independently; CUDA events, median of %lld samples of %lld back-to-back calls "
             "on weights rotated through > 3x L2; baseline = device copy whose traffic equals the bytes a bf16 GEMM "
             "reads (K*N*2); pct_peak_bw = GB/s over that copy's GB/s",
             dtype_name(o.dtype), o.group, o.zeros ? "integer zero points" : "symmetric", o.repeats, o.batch);
  std::vector<std::string> rows;
  for (const Result& r : results) {
    if (!r.error.empty()) continue;
    const double gbps = r.bytes / (r.ms * 1e6), copy_gbps = r.copy_bytes / (r.copy_ms * 1e6);
    rows.push_back(format("{\"case\": \"%s\", \"m\": %lld, \"k\": %lld, \"n\": %lld, \"splits\": %d, \"ours_ms\": %.6f, "
                          "\"baseline\": \"device copy, bf16 weight traffic\", \"baseline_ms\": %.6f, "
                          "\"speedup\": %.3f, \"gbps\": %.1f, \"pct_peak_bw\": %.1f}",
                          r.name.c_str(), r.m, r.k, r.n, r.splits, r.ms, r.copy_ms, r.copy_ms / r.ms, gbps,
                          100 * gbps / copy_gbps));
  }
  return write_results_json("bench_w4a16", o.json, "w4a16_gemm_cpp", device, o.commit, notes, rows);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool help = false;
  const std::string usage_error = parse_args(argc, argv, &o, &help);
  cudaDeviceProp prop;
  const int status = start_main("bench_w4a16", kUsage, help, usage_error, o.device, &prop);
  if (status >= 0) return status;
  std::printf("%s; %s, group %lld, %s\n", describe_device(o.device, prop).c_str(), dtype_name(o.dtype), o.group,
              o.zeros ? "zero points" : "symmetric");
  std::printf("%-26s %6s %6s %6s %10s %10s %8s %8s %8s\n", "case", "K", "N", "splits", "ms", "copy ms", "x copy",
              "GB/s", "% copy");
  Bench bench(o, prop);
  std::vector<Result> results;
  bool failed = false;
  for (const std::string& model : o.models) {
    for (const std::string& layer : o.layers) {
      for (long long m : o.rows) {
        Result r = bench.run(model, layer, m);
        if (!r.error.empty()) {
          std::printf("%-26s FAILED: %s\n", r.name.c_str(), r.error.c_str());
          failed = true;
        } else {
          const double gbps = r.bytes / (r.ms * 1e6), copy_gbps = r.copy_bytes / (r.copy_ms * 1e6);
          std::printf("%-26s %6lld %6lld %6d %10.4f %10.4f %8.2f %8.0f %7.1f%%\n", r.name.c_str(), r.k, r.n, r.splits,
                      r.ms, r.copy_ms, r.copy_ms / r.ms, gbps, 100 * gbps / copy_gbps);
        }
        results.push_back(r);
      }
    }
  }
  if (!o.json.empty() && !write_json(o, prop.name, results)) return kExitFailed;
  return failed ? kExitFailed : kExitOk;
}
