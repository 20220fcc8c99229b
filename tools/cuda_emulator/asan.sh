#!/usr/bin/env bash
# The emulated kernel tests under AddressSanitizer: the emulator built with CUEMU_SANITIZE=address
# (build.py) and the test process started with libasan preloaded, so a kernel's global-memory read
# or write past the end of a tensor's allocation (torch's CPU tensors are plain heap blocks with
# ASan red zones around them) ends the run with a report naming the kernel's source line. This
# is the check the emulator alone cannot make: it bounds-checks shared memory, not global memory.
#
#   bash tools/cuda_emulator/asan.sh [pytest arguments]   (default: every kernel test module)
#
# Slower than the plain emulator (ASan, and ucontext fiber switches): about 20 minutes for all
# modules on 2 cores. Exit status: pytest's, or 1 when ASan reported anything.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
CXX=${CXX:-g++}
libasan=$("$CXX" -print-file-name=libasan.so)
# libstdc++ is preloaded too: Python does not link it, and ASan must resolve __cxa_throw at
# start-up to intercept the exceptions torch throws.
libstdcxx=$("$CXX" -print-file-name=libstdc++.so)
if [[ ! -f $libasan || ! -f $libstdcxx ]]; then
  echo "asan.sh: $CXX has no libasan.so / libstdc++.so to preload" >&2
  exit 2
fi
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
export CUEMU_SANITIZE=address EDGESPEC_REQUIRE_EMULATOR=1
export EDGESPEC_EMULATOR_BUILD=${EDGESPEC_EMULATOR_BUILD:-$PWD/build/cuda-emulator-asan}
export PYTHONPATH=python:tests${PYTHONPATH:+:$PYTHONPATH}
# Built first, without the preload: the compiler must not run with ASan injected.
python3 tools/cuda_emulator/build.py >/dev/null || exit 2
args=("$@")
if [[ ${#args[@]} == 0 ]]; then
  args=(tests/test_cuda_emulator.py tests/test_attention_kernels.py tests/test_w4a16_kernels.py
        tests/test_sparse_kernels.py tests/test_blockffn_kernels.py tests/test_blockffn_w4a16_kernels.py
        tests/test_ops_kernels.py tests/test_emulated_model.py)
fi
ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1:log_path=$reports/asan \
  LD_PRELOAD="$libasan $libstdcxx" python3 -m pytest -q -p no:cacheprovider -m "emulated and not gpu" "${args[@]}"
rc=$?
found=0
for f in "$reports"/asan.*; do
  [[ -e $f ]] || continue
  if grep -q "ERROR: AddressSanitizer" "$f"; then cat "$f" >&2; found=1; fi
done
if [[ $found == 1 ]]; then
  echo "asan.sh: AddressSanitizer reported an error (above)" >&2
  exit 1
fi
exit "$rc"
