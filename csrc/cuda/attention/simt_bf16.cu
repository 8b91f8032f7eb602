// Attention on CUDA cores (forward and backward): bf16, head dims up to 128 and up to 256.
#include "cuda/attention/launch.h"
#include "cuda/attention/simt.cuh"

namespace exaone_ext::cuda::attn {
template void launch_fwd_simt<bf16, 4>(const AttnParams&, const FwdSplit&, cudaStream_t);
template void launch_fwd_simt<bf16, 8>(const AttnParams&, const FwdSplit&, cudaStream_t);
template void launch_bwd_simt<bf16, 4>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
template void launch_bwd_simt<bf16, 8>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
}  // namespace exaone_ext::cuda::attn
