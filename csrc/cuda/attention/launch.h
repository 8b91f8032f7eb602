// Per-(dtype, head dim) launchers of the attention kernels, each explicitly instantiated in its own
// small .cu file (fwd_<dtype>_hd<D>.cu, bwd_<dtype>_hd<D>.cu, simt_<dtype>.cu) so that builds
// parallelise; flash_attn.cu turns the run-time dtype and head dim into one of them.
#pragma once
#include <cuda_runtime_api.h>

#include "common/attention.h"
#include "common/dtypes.h"
#include "cuda/attention/flash_attn.h"

namespace exaone_ext::cuda::attn {

// Tensor cores: T in {bf16, f16}, D in {64, 80, 96, 128}.
template <typename T, int D>
void launch_fwd_mma(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream);
template <typename T, int D>
void launch_bwd_mma(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream);

// CUDA cores: T in {float, bf16, f16}; kPer = ceil(head_dim / 32) rounded up to 4 or 8.
template <typename T, int kPer>
void launch_fwd_simt(const AttnParams& p, const FwdSplit& sp, cudaStream_t stream);
template <typename T, int kPer>
void launch_bwd_simt(const AttnBwdParams& bp, const BwdScratch& sc, cudaStream_t stream);

#define EXAONE_ATTN_EXTERN_MMA(T, D)                                                                      \
  extern template void launch_fwd_mma<T, D>(const AttnParams&, const FwdSplit&, cudaStream_t);            \
  extern template void launch_bwd_mma<T, D>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
#define EXAONE_ATTN_EXTERN_SIMT(T, P)                                                                     \
  extern template void launch_fwd_simt<T, P>(const AttnParams&, const FwdSplit&, cudaStream_t);           \
  extern template void launch_bwd_simt<T, P>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);

}  // namespace exaone_ext::cuda::attn
