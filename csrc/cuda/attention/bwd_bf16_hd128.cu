// Backward attention on tensor cores: bf16, head dim 128.
#include "cuda/attention/bwd_mma.cuh"
#include "cuda/attention/launch.h"

namespace exaone_ext::cuda::attn {
template void launch_bwd_mma<bf16, 128>(const AttnBwdParams&, const BwdScratch&, cudaStream_t);
}  // namespace exaone_ext::cuda::attn
