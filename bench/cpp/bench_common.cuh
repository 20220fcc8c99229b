// Plumbing shared by the C++ benchmark binaries: exit codes, the start of main() (--help, command-line
// errors, opening the device), integer and comma-separated options, the bench/results JSON file, and
// the CUDA-event timer that measures back-to-back kernel calls.
//
// Timing method: each sample queues a kernel that spins until the host has enqueued the whole
// batch of calls (a flag in mapped pinned memory), then records events around the batch. The GPU
// therefore runs the calls back to back and the events measure GPU time, not the host's launch
// rate (a decode-size kernel runs in about the time it takes to launch it).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

namespace edgespec::bench {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
constexpr int kExitNoDevice = 77;  // automake/CTest "skipped"

// A whole decimal integer >= min_value; false on anything else ("12x", "", below the minimum).
inline bool parse_int(const std::string& text, long long min_value, long long* out) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || *end != '\0' || v < min_value) return false;
  *out = v;
  return true;
}

inline std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    if (end > start) parts.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return parts;
}

// "2026-11-23" (UTC), for the JSON results.
inline std::string utc_date() {
  char date[16];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  return date;
}

// printf into a std::string.
__attribute__((format(printf, 1, 2))) inline std::string format(const char* fmt, ...) {
  std::va_list args, again;
  va_start(args, fmt);
  va_copy(again, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, args);
  va_end(args);
  std::string out(n > 0 ? static_cast<std::size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(&out[0], out.size() + 1, fmt, again);
  va_end(again);
  return out;
}

inline std::string json_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += ch;
  }
  return out;
}

// Writes `path` in the bench/results format:
//   {"benchmark": ..., "device": ..., "commit": ..., "date": <today, UTC>,
//    "notes": ...,
//    "rows": [<rows, one JSON object each, already formatted>]}
// On failure prints "<program>: cannot write <path>" and returns false.
inline bool write_results_json(const char* program, const std::string& path, const std::string& benchmark,
                               const std::string& device, const std::string& commit, const std::string& notes,
                               const std::vector<std::string>& rows) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  bool ok = f != nullptr;
  if (ok) {
    std::fprintf(f, "{\"benchmark\": \"%s\", \"device\": \"%s\", \"commit\": \"%s\", \"date\": \"%s\",\n \"notes\": \"%s\",\n \"rows\": [",
                 json_escape(benchmark).c_str(), json_escape(device).c_str(), json_escape(commit).c_str(),
                 utc_date().c_str(), json_escape(notes).c_str());
    for (std::size_t i = 0; i < rows.size(); ++i) std::fprintf(f, "%s\n  %s", i == 0 ? "" : ",", rows[i].c_str());
    std::fprintf(f, "\n]}\n");
    ok = std::fclose(f) == 0;
  }
  if (!ok) std::fprintf(stderr, "%s: cannot write %s\n", program, path.c_str());
  return ok;
}

// Selects device `index` and fills `prop`. Returns kExitOk, or the exit status after printing why
// (kExitNoDevice when no GPU is visible: the caller should exit with it, nothing was run).
inline int open_device(const char* program, long long index, cudaDeviceProp* prop) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("%s: no CUDA device available (%s); nothing to benchmark\n", program,
                err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0");
    return kExitNoDevice;
  }
  if (index >= count) {
    std::fprintf(stderr, "%s: --device %lld but only %d device(s)\n", program, index, count);
    return kExitUsage;
  }
  if (cudaSetDevice(static_cast<int>(index)) != cudaSuccess ||
      cudaGetDeviceProperties(prop, static_cast<int>(index)) != cudaSuccess) {
    std::fprintf(stderr, "%s: cannot open device %lld\n", program, index);
    return kExitFailed;
  }
  return kExitOk;
}

// "device 0: NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, L2 52 MB)", the first line a benchmark prints.
inline std::string describe_device(long long index, const cudaDeviceProp& prop) {
  return format("device %lld: %s (sm_%d%d, %d SMs, L2 %.0f MB)", index, prop.name, prop.major, prop.minor,
                prop.multiProcessorCount, prop.l2CacheSize / 1e6);
}

// A 64 -> 32 bit mixing hash (splitmix64 finaliser) for device-side random inputs: every element
// of every rotated copy gets its own value without a random-number state.
__host__ __device__ __forceinline__ std::uint32_t mix_hash(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return static_cast<std::uint32_t>(x >> 32);
}

// The start of a benchmark's main(): print --help, report a command-line error, or open the
// device. Returns -1 to go on (prop filled in), otherwise the exit status main() should return.
inline int start_main(const char* program, const char* usage, bool help, const std::string& usage_error,
                      long long device, cudaDeviceProp* prop) {
  if (help) {
    std::fputs(usage, stdout);
    return kExitOk;
  }
  if (!usage_error.empty()) {
    std::fprintf(stderr, "%s: %s\n(see --help)\n", program, usage_error.c_str());
    return kExitUsage;
  }
  const int opened = open_device(program, device, prop);
  return opened == kExitOk ? -1 : opened;
}

// Spins until the host sets *go, or about a second passes (a host-side failure cannot hang the GPU).
// static: each benchmark binary is one translation unit with its own copy.
static __global__ void hold_stream(const volatile int* go) {
  const long long start = clock64();
  while (*go == 0 && clock64() - start < 2000000000ll) {
  }
}

class BatchTimer {
 public:
  BatchTimer() = default;
  BatchTimer(const BatchTimer&) = delete;
  BatchTimer& operator=(const BatchTimer&) = delete;
  ~BatchTimer() {
    if (go_ != nullptr) cudaFreeHost(const_cast<int*>(go_));
  }

  // Median per-call milliseconds of `call(i)` (returns "" or an error) over `repeats` samples of
  // `batch` back-to-back calls on `stream`, after `warmup` calls; i counts every call made.
  template <typename Call>
  std::string median_ms(cudaStream_t stream, long long warmup, long long repeats, long long batch, Call&& call,
                        double* out) {
    if (go_ == nullptr) {
      void* flag = nullptr;
      const cudaError_t e = cudaHostAlloc(&flag, sizeof(int), cudaHostAllocMapped);
      if (e != cudaSuccess) return std::string("cudaHostAlloc: ") + cudaGetErrorString(e);
      go_ = static_cast<volatile int*>(flag);
    }
    long long i = 0;
    for (long long w = 0; w < warmup; ++w) {
      const std::string err = call(i++);
      if (!err.empty()) return err;
    }
    cudaEvent_t start, stop;
    if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
      return "cudaEventCreate failed";
    }
    std::vector<double> samples;
    std::string err;
    for (long long s = 0; s < repeats && err.empty(); ++s) {
      *go_ = 0;
      hold_stream<<<1, 1, 0, stream>>>(go_);
      cudaEventRecord(start, stream);
      for (long long b = 0; b < batch && err.empty(); ++b) err = call(i++);
      cudaEventRecord(stop, stream);
      *go_ = 1;
      float ms = 0;
      const cudaError_t e = cudaEventSynchronize(stop);
      if (err.empty() && e != cudaSuccess) err = std::string("cudaEventSynchronize: ") + cudaGetErrorString(e);
      if (err.empty()) cudaEventElapsedTime(&ms, start, stop);
      samples.push_back(ms / batch);
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (!err.empty()) return err;
    std::nth_element(samples.begin(), samples.begin() + samples.size() / 2, samples.end());
    *out = samples[samples.size() / 2];
    return "";
  }

 private:
  volatile int* go_ = nullptr;  // mapped pinned flag read by hold_stream
};

}  // namespace edgespec::bench
