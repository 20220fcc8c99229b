// Makes a tensor's device current for the duration of a launch, like torch's device guard.
//
// The runtime launches on the calling thread's current device and a stream belongs to one
// device, so an op on cuda:1 tensors called while cuda:0 is current must switch first. Switching
// costs nothing when the device is already current (the common single-GPU case) and never
// synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include "common/status.h"

namespace edgespec {

class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  Status enter(int device) {
    int current = -1;
    EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaGetDevice(&current), "querying the current device"));
    if (current == device) return Status::success();
    EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaSetDevice(device), "selecting the tensors' device"));
    previous_ = current;
    return Status::success();
  }

  ~DeviceGuard() {
    // Best effort: a destructor cannot report, and failing to restore only changes which device
    // the next runtime call (which sets its own device) starts from.
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

}  // namespace edgespec
