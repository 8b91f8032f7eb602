// Forward attention on tensor cores: fp16, head dim 96.
#include "cuda/attention/fwd_mma.cuh"
#include "cuda/attention/launch.h"

namespace exaone_ext::cuda::attn {
template void launch_fwd_mma<f16, 96>(const AttnParams&, const FwdSplit&, cudaStream_t);
}  // namespace exaone_ext::cuda::attn
