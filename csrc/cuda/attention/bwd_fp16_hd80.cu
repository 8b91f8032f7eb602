// Backward attention on tensor cores: fp16, head dim 80.
#include "cuda/attention/bwd_mma.cuh"
#include "cuda/attention/launch.h"

namespace exaone_ext::cuda::attn {
template void launch_bwd_mma<f16, 80>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
}  // namespace exaone_ext::cuda::attn
