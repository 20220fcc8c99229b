// The tensor-core InfLLM-v2 score kernels (csrc/kernels/sparse_scores_mma.cuh) with their S = Q.CK^T
// product on Hopper's wgmma (sparse_scores_sm90.h). The kernel's block is one warpgroup (4 warps,
// 64 packed rows), so one m64n64 wgmma per k16 step computes what its 32 mma.sync did per tile;
// Q and the kernel tiles move to the 128-byte-swizzled layout that wgmma descriptors read
// (gmma_desc.h). The accumulators come back in the layout the passes already read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/sm90/arch.cuh"
#include "kernels/sm90/qk_product.cuh"
#include "kernels/sm90/sparse_scores_sm90.h"
#include "kernels/sparse_attention.cuh"

namespace edgespec {
namespace sparse_detail {

template <typename T, int kHeadDim>
struct WgmmaScoreProduct {
  static constexpr int kAlign = static_cast<int>(kGmmaSwizzleAtomBytes);
  static constexpr bool kPerWarp = false;  // one product per warpgroup: no tree paths (the host refuses them)
  __device__ static int offset(int row, int chunk) { return static_cast<int>(sw128_offset(kMmaRows, row, 8 * chunk)); }
  // The cp.async writes, before the async proxy (wgmma) reads them.
  __device__ static void landed() {
#if EDGESPEC_SM90_ENABLED
    fence_proxy_async();
#endif
  }
  __device__ void load_q(const unsigned char*, int, int) {}  // wgmma reads Q from shared memory

  __device__ void product(float (&s)[kMmaKernels / 8][4], const unsigned char* q_tile, const unsigned char* ck_tile,
                          int) {
#if EDGESPEC_SM90_ENABLED
    float acc[32] = {};  // overwritten by the first step (accumulate = 0)
    qk_product_64x64<T, kHeadDim>(acc, smem_address(q_tile), smem_address(ck_tile));
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i / 4][i % 4] = acc[i];
#else
    (void)s, (void)q_tile, (void)ck_tile;
#endif
  }
};
static_assert(kMmaThreads == 128 && kMmaRows == 64 && kMmaKernels == 64, "one warpgroup, one m64n64 product per tile");

}  // namespace sparse_detail

template <typename T, int kHeadDim>
Status launch_sparse_scores_sm90(const SparseScoreParams<T>& p, cudaStream_t stream) {
  if (p.tokens == 0) return Status::success();
  EDGESPEC_RETURN_IF_ERROR(check_sm90_device("sparse scores (sm90)"));
  return sparse_detail::launch_scores_mma<T, kHeadDim, sparse_detail::WgmmaScoreProduct<T, kHeadDim>>(p, stream);
}

template Status launch_sparse_scores_sm90<__nv_bfloat16, 64>(const SparseScoreParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_sparse_scores_sm90<__nv_bfloat16, 128>(const SparseScoreParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_sparse_scores_sm90<__half, 64>(const SparseScoreParams<__half>&, cudaStream_t);
template Status launch_sparse_scores_sm90<__half, 128>(const SparseScoreParams<__half>&, cudaStream_t);

}  // namespace edgespec
