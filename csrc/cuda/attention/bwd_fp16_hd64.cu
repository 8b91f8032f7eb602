// Backward attention on tensor cores: fp16, head dim 64.
#include "cuda/attention/bwd_mma.cuh"
#include "cuda/attention/launch.h"

namespace exaone_ext::cuda::attn {
template void launch_bwd_mma<f16, 64>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
}  // namespace exaone_ext::cuda::attn
