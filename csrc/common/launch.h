// Host-side launch-shape helpers shared by the row-parallel kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "common/checks.h"
#include "common/status.h"

namespace edgespec {

// CUDA grid limits: grid.x up to 2^31 - 1 blocks, grid.y and grid.z up to 65535.
constexpr std::int64_t kMaxGridX = 0x7fffffff;
constexpr std::int64_t kMaxGridY = 65535;

// Grid (rows, ceil(items_per_row / threads)) for kernels where a row (token) is split into
// `threads`-wide chunks of work items: rows go in grid.x, which has the large limit, so long
// prefills fit; a row's chunks go in grid.y.
inline Status row_chunk_grid(std::int64_t rows, std::int64_t items_per_row, int threads, const char* op,
                             dim3* grid) {
  const std::int64_t chunks = (items_per_row + threads - 1) / threads;
  EDGESPEC_RETURN_IF_ERROR(check_fits(rows, kMaxGridX, (std::string(op) + ": number of rows").c_str()));
  EDGESPEC_RETURN_IF_ERROR(
      check_fits(chunks, kMaxGridY, (std::string(op) + ": work items per row / " + std::to_string(threads)).c_str()));
  *grid = dim3(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  return Status::success();
}

// kUnsupported (rather than a failed launch) when one block of `op` needs more dynamic shared
// memory than the current GPU lets a kernel opt in to; `why` says what makes it grow.
inline Status check_smem_optin(std::int64_t bytes, const std::string& op, const std::string& why) {
  int device = 0, optin = 0;
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaGetDevice(&device), op + ": cudaGetDevice"));
  EDGESPEC_RETURN_IF_ERROR(
      Status::from_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                        op + ": reading the GPU's shared memory limit"));
  if (bytes > optin) {
    return Status::unsupported(op + ": this call needs " + std::to_string(bytes) +
                               " bytes of shared memory per block, the GPU allows " + std::to_string(optin) + " (" +
                               why + ")");
  }
  return Status::success();
}

}  // namespace edgespec
