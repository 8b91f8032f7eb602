"""The compiled kernels run end to end: the tiny checkpoint used by the generation, streaming, chat
and CLI tests has a head dim the attention kernels are built for, and every forward generate()
makes (packed prefill, chunked prefill, decode, decode after keep_rows) dispatches the kernels,
not the plain-PyTorch references; with the kernels switched off the same tokens come out."""
from __future__ import annotations

import pytest
import torch

from exaone_ext import ExaoneForCausalLM, ExaoneTokenizer, GenerationConfig, generate, stream
from exaone_ext.model import ExaoneConfig
from exaone_ext.ops.attention import ATTENTION_HEAD_DIMS
from exaone_ext.testing import tiny_config_dict, write_tiny_checkpoint
from conftest import record_kernel_ops

# the exaone_ext ops of one decoder forward besides attention (op names as registered)
DENSE_OPS = {"linear", "linear_cat", "rms_norm", "add_rms_norm", "swiglu_fused", "apply_rope"}
ATTENTION_OP = {"packed prefill": "flash_attn_varlen_fwd", "prefill": "flash_attn_kvcache",
                "chunked prefill": "flash_attn_kvcache", "decode": "flash_attn_kvcache",
                "decode after keep_rows": "flash_attn_kvcache"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a short context, so that a prompt can reach its end cheaply
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, max_position_embeddings=128)
    return ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ExaoneTokenizer.from_pretrained(path)


def test_tiny_checkpoint_head_dim_has_attention_kernels():
    config = ExaoneConfig.from_dict(tiny_config_dict(1024, 3, 1, 0))
    assert config.head_dim in ATTENTION_HEAD_DIMS


class _Forwards:
    """Wraps model.forward: records, per call, what kind of forward it was and the ops it ran."""

    def __init__(self, model):
        self.model, self.calls, self._forward = model, [], model.forward

    def __enter__(self):
        def forward(input_ids, *args, **kwargs):
            cache = kwargs.get("kv_cache")
            if kwargs.get("cu_seqlens") is not None:
                kind = "packed prefill"
            elif input_ids.shape[-1] == 1 and cache is not None:
                kind = "decode" if cache.batch_size == self.batch else "decode after keep_rows"
            elif cache is not None and int(cache.seqlens.max()) > 0:
                kind = "chunked prefill"
            else:
                kind = "prefill"
            with record_kernel_ops() as seen:
                out = self._forward(input_ids, *args, **kwargs)
            self.calls.append((kind, set(seen)))
            return out
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


@torch.no_grad()
def test_generate_runs_the_kernels_on_every_path(tiny):
    model, tok = tiny
    # two short prompts packed into one forward; a long one alone, prefilled in chunks of 32 and
    # near the context's end, so that it stops first and keep_rows drops its cache row
    context = model.config.max_position_embeddings
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13 + i % 50 for i in range(context - 7)]]
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    with _Forwards(model) as rec:
        rec.batch = len(prompts)
        results = generate(model, tok, prompts, config, prefill_chunk_size=32)
    kinds = {kind for kind, _ in rec.calls}
    assert kinds == {"packed prefill", "prefill", "chunked prefill", "decode", "decode after keep_rows"}, kinds
    for kind, seen in rec.calls:
        assert seen == DENSE_OPS | {ATTENTION_OP[kind]}, (kind, seen)
    assert [len(r.tokens) for r in results] == [12, 12, 8]

    model.use_kernels = False
    try:
        with record_kernel_ops() as seen:
            expected = generate(model, tok, prompts, config, prefill_chunk_size=32)
    finally:
        model.use_kernels = True
    assert seen == set()
    assert [r.tokens for r in results] == [r.tokens for r in expected]


@torch.no_grad()
def test_stream_runs_the_kernels(tiny):
    model, tok = tiny
    with _Forwards(model) as rec:
        rec.batch = 1
        text = "".join(stream(model, tok, "Hello, how are you?", GenerationConfig(max_new_tokens=6, stop_token_ids=[])))
    assert text
    assert rec.calls and all(seen == DENSE_OPS | {"flash_attn_kvcache"} for _, seen in rec.calls), rec.calls
