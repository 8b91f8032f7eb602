"""ExaoneForCausalLM against Hugging Face transformers' LlamaForCausalLM (the same function under Llama
names), KV-cache decoding, packed documents, the kernel and reference paths, config and presets."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import transformers  # a test dependency that make test installs: its absence must fail, not skip

from exaone_ext.model import (ConfigError, ExaoneConfig, ExaoneForCausalLM, KVCache, convert_checkpoint)
from conftest import CUDA

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# head dim 80 tied (2.4B-like), head dim 128 untied with head_dim != hidden / heads
CONFIGS = {
    "hd80_tied": dict(vocab_size=512, hidden_size=320, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=224, tie_word_embeddings=True, rope_scaling=LLAMA3),
    "hd128_untied": dict(vocab_size=512, hidden_size=192, num_layers=3, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=128, intermediate_size=160, tie_word_embeddings=False, rope_scaling=LLAMA3),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make_model(name: str, dtype=torch.float32, use_kernels=False, std=0.1) -> ExaoneForCausalLM:
    model = ExaoneForCausalLM(ExaoneConfig(**CONFIGS[name]), use_kernels=use_kernels)
    model.reset_parameters(std)
    with torch.no_grad():  # norms away from 1 so their weights matter
        for n, p in model.named_parameters():
            if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(our model, Hugging Face LlamaForCausalLM) with the same float32 weights, the Llama side loaded
    from a checkpoint written by our save_pretrained and renamed by our converter."""
    torch.manual_seed(1234)
    ours = make_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    ours.save_pretrained(d / "exaone")
    convert_checkpoint(d / "exaone", d / "llama", to="llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(d / "llama", dtype=torch.float32).eval()
    return ours, hf


def hf_rope_in_float64(hf):
    """Make the Hugging Face model compute its RoPE angles position * inv_freq in float64 (it uses
    float32), with the inverse frequencies of our float64 reference."""
    from exaone_ext.ops.reference import rope_inv_freq
    rotary = hf.model.rotary_emb
    c = hf.config
    inv64 = rope_inv_freq(c.head_dim, c.rope_parameters["rope_theta"], c.rope_parameters)

    def forward(x, position_ids):
        angles = position_ids[..., None].double() * inv64.to(x.device)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = forward


# ---- parity with transformers ----
@torch.no_grad()
def test_logits_match_transformers_within_8192(pair):
    ours, hf = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 37))
    assert rel_err(ours(ids), hf(ids).logits) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("offset", [8190, 12_000, 30_000])
def test_logits_match_transformers_beyond_8192(pair, offset):
    """Positions past llama3's original 8192 through position_ids offsets. Hugging Face forms the angle
    position * inv_freq in float32, whose rounding (~position * 2^-24 rad, 2e-3 rad at 30000) alone
    moves the logits by ~1e-3 relative; our tables are computed in float64. So: (1) with the Hugging
    Face angles in float64 the two models agree within 1e-4; (2) with our model given the tables
    Hugging Face computes in float32, they agree within 1e-4 too: the whole gap is the angle rounding."""
    import copy
    ours, hf = pair
    s = 29
    ids = torch.randint(0, ours.config.vocab_size, (2, s))
    pos = (torch.arange(s) + offset)[None].expand(2, s)
    ref_default = hf(ids, position_ids=pos).logits
    ours_logits = ours(ids, position_ids=pos)

    hf64 = copy.deepcopy(hf)
    hf_rope_in_float64(hf64)
    assert rel_err(ours_logits, hf64(ids, position_ids=pos).logits) < 1e-4

    ours32 = copy.deepcopy(ours)
    c = ours.config
    positions = torch.arange(c.max_position_embeddings)
    angles32 = positions[:, None].float() * hf.model.rotary_emb.inv_freq.float()  # as Hugging Face forms them
    ours32.rope_cos, ours32.rope_sin = angles32.cos(), angles32.sin()
    assert rel_err(ours32(ids, position_ids=pos), ref_default) < 1e-4


@torch.no_grad()
def test_greedy_32_steps_match_transformers(pair):
    ours, hf = pair
    prompt = torch.randint(0, ours.config.vocab_size, (1, 11))
    expected = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                           attention_mask=torch.ones_like(prompt))[0, 11:]
    cache = KVCache(ours.config, 1, 64, torch.float32)
    logits = ours(prompt, kv_cache=cache, num_logits_to_keep=1)
    got = []
    for _ in range(32):
        tok = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        got.append(tok.item())
        logits = ours(tok, kv_cache=cache)
    assert got == expected.tolist()


# ---- KV cache ----
@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decode_equals_full_recompute(name):
    model = make_model(name)
    V = model.config.vocab_size
    seqs = [torch.randint(0, V, (n,)) for n in (5, 9)]
    cache = KVCache(model.config, 2, 32, torch.float32)
    # rows prefilled separately to different lengths through row views
    for b, seq in enumerate(seqs):
        out = model(seq[None], kv_cache=cache.row(b))
        assert torch.allclose(out, model(seq[None]), rtol=0, atol=1e-5)
    assert cache.seqlens.tolist() == [5, 9]
    for step in range(6):
        new = torch.randint(0, V, (2, 1))
        logits = model(new, kv_cache=cache)  # [2, 1, V]
        for b in range(2):
            seqs[b] = torch.cat([seqs[b], new[b]])
            full = model(seqs[b][None])[:, -1]
            assert rel_err(logits[b], full) < 1e-5, (step, b)
    assert cache.seqlens.tolist() == [11, 15]
    # a multi-token chunk appended to a non-empty cache (chunked prefill)
    chunk = torch.randint(0, V, (2, 4))
    logits = model(chunk, kv_cache=cache)
    for b in range(2):
        full = model(torch.cat([seqs[b], chunk[b]])[None])[:, -4:]
        assert rel_err(logits[b:b + 1], full) < 1e-5


def test_kv_cache_layout_views_and_errors():
    config = ExaoneConfig(**CONFIGS["hd80_tied"])
    cache = KVCache(config, 3, 16, torch.bfloat16)
    assert len(cache.layers) == config.num_layers
    k, v = cache.layers[0]
    assert k.shape == v.shape == (3, 16, config.num_key_value_heads, config.head_dim) and k.dtype == torch.bfloat16
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0, 0, 0]
    row = cache.row(1)
    assert row.batch_size == 1 and row.max_seq_len == 16
    row.layers[0].k.fill_(7)
    row.advance(4)
    assert cache.seqlens.tolist() == [0, 4, 0] and (cache.layers[0].k[1] == 7).all() and (cache.layers[0].k[0] == 0).all()
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0]
    with pytest.raises(IndexError, match="row 3"):
        cache.row(3)
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(config, 1, config.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(config, 0, 8)

    model = make_model("hd80_tied")
    cache = KVCache(model.config, 1, 8, torch.float32)
    model(torch.randint(0, 100, (1, 6)), kv_cache=cache)
    with pytest.raises(ValueError, match="exceed max_seq_len 8"):
        model(torch.randint(0, 100, (1, 3)), kv_cache=cache)
    assert cache.seqlens.tolist() == [6]  # nothing appended by the refused call
    with pytest.raises(ValueError, match="batch_size 1"):
        model(torch.randint(0, 100, (2, 1)), kv_cache=cache)


@torch.no_grad()
def test_kv_cache_host_lengths_follow_the_device_lengths():
    """A GPU cache keeps its lengths twice (device for the kernels, host for the bounds); on the CPU
    they are one tensor. Here the host copy is made separate, as on a GPU, and every way the
    lengths change must keep the two equal, through row views and keep_rows too."""
    model = make_model("hd80_tied", use_kernels=True)
    V = model.config.vocab_size
    cache = KVCache(model.config, 3, 32, torch.float32)
    assert cache.host_seqlens is cache.seqlens  # CPU: one tensor
    cache.host_seqlens = cache.seqlens.clone()
    same = lambda c: c.seqlens.tolist() == c.host_seqlens.tolist()
    seqs = [torch.randint(0, V, (n,)) for n in (4, 9, 6)]
    for b, seq in enumerate(seqs):
        model(seq[None], kv_cache=cache.row(b))
    assert cache.seqlens.tolist() == [4, 9, 6] and same(cache) and cache.longest() == 9
    model(torch.randint(0, V, (3, 1)), kv_cache=cache)
    assert cache.seqlens.tolist() == [5, 10, 7] and same(cache)
    k_before = [k.clone() for k, _ in cache.layers]
    kept = cache.keep_rows([2, 0])  # row 1 finished: rows 2 and 0 move to the front
    assert kept.batch_size == 2 and kept.seqlens.tolist() == [7, 5] and same(kept) and kept.longest() == 7
    for (k, _), kb in zip(kept.layers, k_before):
        assert torch.equal(k[0, :7], kb[2, :7]) and torch.equal(k[1, :5], kb[0, :5])
    model(torch.randint(0, V, (2, 1)), kv_cache=kept)
    assert kept.seqlens.tolist() == [8, 6] and same(kept) and same(cache)
    with pytest.raises(ValueError, match="distinct rows"):
        cache.keep_rows([0, 0])
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0] and same(cache)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="CUDA: no device")
@torch.no_grad()
def test_decode_step_never_synchronises_cuda():
    """A decode step queues its work and returns: no read of device memory by the host (the cache
    lengths are checked against their host copy), so the CPU launches ahead of the GPU."""
    model = make_model("hd128_untied", dtype=torch.bfloat16, use_kernels=True).cuda()
    cache = KVCache(model.config, 2, 64, torch.bfloat16, "cuda")
    model(torch.randint(0, 100, (2, 7), device="cuda"), kv_cache=cache)
    tok = torch.randint(0, 100, (2, 1), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tok = model(tok, kv_cache=cache, num_logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.seqlens.tolist() == cache.host_seqlens.tolist() == [10, 10]


# ---- packed documents ----
@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_cu_seqlens_equals_separate_forwards(name):
    model = make_model(name)
    lengths = [7, 1, 12, 4]
    docs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed = torch.cat(docs)
    out = model(packed[None], cu_seqlens=cu)  # [1, total, V]
    out_1d = model(packed, cu_seqlens=cu)     # [total] accepted too
    assert out.shape == (1, sum(lengths), model.config.vocab_size)
    torch.testing.assert_close(out_1d, out, rtol=0, atol=0)
    for doc, s, e in zip(docs, cu[:-1].tolist(), cu[1:].tolist()):
        assert rel_err(out[:, s:e], model(doc[None])) < 1e-5
    # num_logits_to_keep counts per document: each one's last positions
    keep = model(packed, cu_seqlens=cu, num_logits_to_keep=1)
    assert rel_err(keep, torch.stack([out[0, e - 1:e] for e in cu[1:].tolist()])) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("use_kernels", [False, True])
def test_packed_prefill_into_cache_equals_row_by_row(use_kernels):
    """Packed documents with a kv_cache: document i fills row i; the cache contents, lengths, the
    per-document last logits and the decode steps after it equal prefilling row by row."""
    model = make_model("hd128_untied", use_kernels=use_kernels)
    V = model.config.vocab_size
    lengths = [7, 1, 12, 4]
    docs = [torch.randint(0, V, (n,)) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed_cache = KVCache(model.config, 4, 20, torch.float32)
    last = model(torch.cat(docs), cu_seqlens=cu, kv_cache=packed_cache, num_logits_to_keep=1)  # [4, 1, V]
    assert last.shape == (4, 1, V) and packed_cache.seqlens.tolist() == lengths
    full = model(torch.cat(docs)[None], cu_seqlens=cu)                                        # [1, total, V]
    ends = cu[1:].tolist()
    assert rel_err(last, torch.stack([full[0, e - 1:e] for e in ends])) < 1e-5  # (lm_head on 4 rows or 24)
    rows_cache = KVCache(model.config, 4, 20, torch.float32)
    for b, doc in enumerate(docs):
        one = model(doc[None], kv_cache=rows_cache.row(b), num_logits_to_keep=1)
        assert rel_err(last[b, -1], one[0, -1]) < 1e-5
    for (kp, vp), (kr, vr) in zip(packed_cache.layers, rows_cache.layers):
        for b, n in enumerate(lengths):
            assert rel_err(kp[b, :n], kr[b, :n]) < 1e-5 and rel_err(vp[b, :n], vr[b, :n]) < 1e-5
    step = torch.randint(0, V, (4, 1))
    assert rel_err(model(step, kv_cache=packed_cache), model(step, kv_cache=rows_cache)) < 1e-5
    assert packed_cache.seqlens.tolist() == [n + 1 for n in lengths]


@torch.no_grad()
@pytest.mark.parametrize("use_kernels", [False, True])
def test_decode_rows_and_new_prompts_in_one_packed_pass(use_kernels):
    """Packed input whose first documents are one token each for cache rows that hold tokens (a
    decode step) and whose others fill empty rows (prompts joining it): the logits, the cache and
    what follows equal a decode step and a packed prefill run apart."""
    model = make_model("hd80_tied", use_kernels=use_kernels)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (5, 9, 3)]
    joint, apart = (KVCache(model.config, 5, 24, torch.float32) for _ in range(2))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    for cache in (joint, apart):
        model(torch.cat(prompts), cu_seqlens=cu, kv_cache=cache.rows(0, 3), num_logits_to_keep=1)
    step = torch.randint(0, V, (3,))
    new = [torch.randint(0, V, (n,)) for n in (4, 7)]
    out = model(torch.cat([step] + new), cu_seqlens=torch.tensor([0, 1, 2, 3, 7, 14], dtype=torch.int32),
                kv_cache=joint, num_logits_to_keep=1)                                          # [5, 1, V]
    decoded = model(step[:, None], kv_cache=apart.rows(0, 3), num_logits_to_keep=1)
    prefilled = model(torch.cat(new), cu_seqlens=torch.tensor([0, 4, 11], dtype=torch.int32),
                      kv_cache=apart.rows(3, 5), num_logits_to_keep=1)
    assert out.shape == (5, 1, V)
    assert rel_err(out[:3], decoded) < 1e-5 and rel_err(out[3:], prefilled) < 1e-5
    assert joint.seqlens.tolist() == apart.seqlens.tolist() == [6, 10, 4, 4, 7]
    for (kj, vj), (ka, va) in zip(joint.layers, apart.layers):
        for b, n in enumerate([6, 10, 4, 4, 7]):
            assert rel_err(kj[b, :n], ka[b, :n]) < 1e-5 and rel_err(vj[b, :n], va[b, :n]) < 1e-5
    # without num_logits_to_keep: every token's logits, in input order
    third = KVCache(model.config, 5, 24, torch.float32)
    model(torch.cat(prompts), cu_seqlens=cu, kv_cache=third.rows(0, 3))
    every = model(torch.cat([step] + new), cu_seqlens=torch.tensor([0, 1, 2, 3, 7, 14], dtype=torch.int32),
                  kv_cache=third)                                                               # [1, 14, V]
    assert every.shape == (1, 14, V) and rel_err(every[0, [2, 6, 13]], out[2:, 0]) < 1e-5
    assert rel_err(every[0, 3:7], model(new[0][None])[0]) < 1e-5
    # every row one token: a plain decode step in packed form
    last = torch.randint(0, V, (5,))
    a = model(last, cu_seqlens=torch.arange(6, dtype=torch.int32), kv_cache=joint, num_logits_to_keep=1)
    b = model(last[:, None], kv_cache=apart, num_logits_to_keep=1)
    assert rel_err(a, b) < 1e-5 and joint.seqlens.tolist() == apart.seqlens.tolist()


@torch.no_grad()
@pytest.mark.parametrize("use_kernels", [False, True])
def test_prompt_chunks_continue_rows_in_a_packed_pass(use_kernels):
    """Rows that hold tokens may be continued by more than one token (the next chunk of a long
    prompt) in the packed pass that decodes other rows and prefills new prompts: logits, cache and
    positions equal each row run on its own."""
    model = make_model("hd80_tied", use_kernels=use_kernels)
    V = model.config.vocab_size
    # rows 0 and 2 decode, rows 1 and 3 take their prompts' next 6 and 4 tokens (row 2, one token
    # after a longer document, goes as a continued row of its own), row 4 is a new prompt
    held = [5, 9, 3, 7]
    joint, apart = (KVCache(model.config, 5, 32, torch.float32) for _ in range(2))
    first = [torch.randint(0, V, (n,)) for n in held]
    for cache in (joint, apart):
        cu = torch.tensor([0] + list(itertools.accumulate(held)), dtype=torch.int32)
        model(torch.cat(first), cu_seqlens=cu, kv_cache=cache.rows(0, 4), num_logits_to_keep=1)
    docs = [torch.randint(0, V, (n,)) for n in (1, 6, 1, 4, 5)]
    cu = torch.tensor([0] + list(itertools.accumulate(len(d) for d in docs)), dtype=torch.int32)
    out = model(torch.cat(docs), cu_seqlens=cu, kv_cache=joint, num_logits_to_keep=1)          # [5, 1, V]
    every_joint = KVCache(model.config, 5, 32, torch.float32)
    model(torch.cat(first), cu_seqlens=torch.tensor([0] + list(itertools.accumulate(held)), dtype=torch.int32),
          kv_cache=every_joint.rows(0, 4))
    every = model(torch.cat(docs), cu_seqlens=cu, kv_cache=every_joint)                       # [1, 17, V]
    for b, d in enumerate(docs):
        alone = model(d[None], kv_cache=apart.row(b))                                           # [1, len, V]
        assert rel_err(out[b, 0], alone[0, -1]) < 1e-5, b
        assert rel_err(every[0, int(cu[b]):int(cu[b + 1])], alone[0]) < 1e-5, b
    assert joint.seqlens.tolist() == apart.seqlens.tolist() == every_joint.seqlens.tolist() == [6, 15, 4, 11, 5]
    for (kj, vj), (ka, va) in zip(joint.layers, apart.layers):
        for b, n in enumerate([6, 15, 4, 11, 5]):
            assert rel_err(kj[b, :n], ka[b, :n]) < 1e-5 and rel_err(vj[b, :n], va[b, :n]) < 1e-5
    # only continued rows, no new prompt, and a continued row that gets no token
    nxt = [torch.randint(0, V, (n,)) for n in (3, 0, 2, 1)]
    cu = torch.tensor([0] + list(itertools.accumulate(len(d) for d in nxt)), dtype=torch.int32)
    out = model(torch.cat(nxt), cu_seqlens=cu, kv_cache=joint.rows(0, 4))
    for b, d in enumerate(nxt):
        if len(d):
            alone = model(d[None], kv_cache=apart.row(b))
            assert rel_err(out[0, int(cu[b]):int(cu[b + 1])], alone[0]) < 1e-5, b
    assert joint.seqlens.tolist() == [9, 15, 6, 12, 5]


def test_packed_input_errors():
    model = make_model("hd80_tied")
    ids = torch.randint(0, 100, (1, 10))
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        model(ids, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="rise from 0 to 10"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise from 0 to 10"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[1, total\]"):
        model(torch.randint(0, 100, (2, 5)), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    cu2 = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_cache has batch_size 1, cu_seqlens holds 2 documents"):
        model(ids, cu_seqlens=cu2, kv_cache=KVCache(model.config, 1, 16, torch.float32))
    used = KVCache(model.config, 2, 16, torch.float32)
    used.row(1).advance(3)
    with pytest.raises(ValueError, match=r"those rows first; the rows hold \[0, 3\] tokens, the documents are "
                                         r"\[4, 6\] tokens long"):
        model(ids, cu_seqlens=cu2, kv_cache=used)  # a row holding tokens after an empty one
    used = KVCache(model.config, 2, 16, torch.float32)
    used.row(0).advance(13)
    with pytest.raises(ValueError, match=r"documents of \[4, 6\] tokens to rows holding \[13, 0\] would exceed "
                                         r"max_seq_len 16"):
        model(ids, cu_seqlens=cu2, kv_cache=used)  # four more tokens for a row holding 13
    assert used.seqlens.tolist() == [13, 0]
    used.row(0).advance(2)
    model(ids[:, :2], cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32), kv_cache=used)  # 15 + 1 fits
    with pytest.raises(ValueError, match=r"to rows holding \[16, 1\] would exceed max_seq_len 16"):
        model(ids[:, :2], cu_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32), kv_cache=used)
    with pytest.raises(ValueError, match="exceed max_seq_len 5"):
        model(ids, cu_seqlens=cu2, kv_cache=KVCache(model.config, 2, 5, torch.float32))
    with pytest.raises(TypeError, match="kv_cache holds torch.bfloat16, the model computes in torch.float32"):
        model(ids, cu_seqlens=cu2, kv_cache=KVCache(model.config, 2, 16, torch.bfloat16))
    other = ExaoneConfig(**{**CONFIGS["hd80_tied"], "num_layers": 3})
    with pytest.raises(ValueError, match="kv_cache has 3 layers, the model 2"):
        model(ids, cu_seqlens=cu2, kv_cache=KVCache(other, 2, 16, torch.float32))
    with pytest.raises(ValueError, match=r"num_logits_to_keep = 5 needs every packed document to hold as many "
                                         r"tokens, got lengths \[4, 6\]"):
        model(ids, cu_seqlens=cu2, num_logits_to_keep=5)
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.arange(9)[None])
    with pytest.raises(TypeError, match="input_ids must be int64"):
        model(ids.float())


# ---- the kernel path and the reference path ----
@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_agrees_with_reference_path(name, dtype):
    model = make_model(name, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    model.use_kernels = False
    ref = model(ids)
    model.use_kernels = True
    out = model(ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # bf16: the kernels' float32 accumulation may differ from the references' bf16 steps
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 5e-2)
    if dtype == torch.bfloat16:  # judged against float64 math, the kernel path is no worse than the reference
        model64 = make_model(name, dtype=torch.float64)
        model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        truth = model64(ids)
        assert rel_err(out, truth) <= 2 * rel_err(ref, truth) + 1e-3
    # with a cache too
    cache = KVCache(model.config, 2, 32, dtype)
    model(ids[:, :20], kv_cache=cache)
    step = model(ids[:, 20:], kv_cache=cache)
    assert rel_err(step, out[:, 20:]) < (1e-5 if dtype == torch.float32 else 5e-2)


@torch.no_grad()
def test_num_logits_to_keep_and_dtype():
    model = make_model("hd128_untied", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    full = model(ids)
    last = model(ids, num_logits_to_keep=3)
    assert full.dtype == torch.float32 and last.shape == (2, 3, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -3:], rtol=0, atol=0)
    assert model.rope_cos.dtype == torch.float32  # rebuilt in float32 after .to(bfloat16)


def test_gradients_flow():
    model = make_model("hd80_tied", use_kernels=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# ---- config ----
@pytest.mark.parametrize("preset,count", [("2.4b", 2_405_327_360), ("7.8b", 7_818_448_896), ("32b", 32_003_200_000)])
def test_preset_parameter_counts_exact(preset, count):
    config = ExaoneConfig.preset(preset)
    assert config.num_parameters == count
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.lm_head.weight is model.transformer.wte.weight if config.tie_word_embeddings else True


def test_preset_shapes():
    c = ExaoneConfig.preset("2.4b")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.tie_word_embeddings) == (2560, 30, 32, 8, 80, 7168, True)
    c = ExaoneConfig.preset("32b")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.head_dim, c.tie_word_embeddings) == \
        (5120, 64, 40, 128, False)
    assert c.rope_theta == 1e6 and c.rope_scaling["rope_type"] == "llama3" and c.max_position_embeddings == 32768
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 361, 0)
    with pytest.raises(ValueError, match="unknown preset"):
        ExaoneConfig.preset("3b")


def test_config_from_dict_variants(tmp_path):
    # the keys of a published EXAONE 3.5 config.json, num_layers spelled num_hidden_layers, no head_dim,
    # no tie_word_embeddings (defaults to true), unknown keys kept
    d = {"activation_function": "silu", "architectures": ["ExaoneForCausalLM"], "attention_dropout": 0.0,
         "auto_map": {"AutoConfig": "configuration_exaone.ExaoneConfig"}, "bos_token_id": 1, "embed_dropout": 0.0,
         "eos_token_id": 361, "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
         "layer_norm_epsilon": 1e-5, "max_position_embeddings": 32768, "model_type": "exaone",
         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "pad_token_id": 0,
         "rope_scaling": dict(LLAMA3), "rope_theta": 1000000.0, "torch_dtype": "float32",
         "transformers_version": "4.43.0", "use_cache": True, "vocab_size": 102400}
    c = ExaoneConfig.from_dict(d)
    assert c.num_layers == 32 and c.head_dim == 128 and c.tie_word_embeddings is True
    out = c.to_dict()
    assert out["auto_map"] == d["auto_map"] and out["transformers_version"] == "4.43.0"
    assert out["num_layers"] == 32 and "num_hidden_layers" not in out
    assert ExaoneConfig.from_dict(out) == c
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ExaoneConfig.from_pretrained(tmp_path) == c


def test_config_llama_mapping():
    c = ExaoneConfig(**CONFIGS["hd128_untied"])
    llama = c.to_llama_dict()
    assert llama["model_type"] == "llama" and llama["num_hidden_layers"] == 3 and llama["hidden_act"] == "silu"
    assert llama["rms_norm_eps"] == c.layer_norm_epsilon and llama["tie_word_embeddings"] is False
    assert ExaoneConfig.from_dict(llama, allow_llama=True) == c
    hf = transformers.LlamaConfig(**llama)  # transformers >= 5 rewrites the rope keys as rope_parameters
    back = ExaoneConfig.from_dict(hf.to_dict(), allow_llama=True)
    for k in ("rope_theta", "rope_scaling", "head_dim", "num_layers", "tie_word_embeddings", "layer_norm_epsilon"):
        assert getattr(back, k) == getattr(c, k), k
    # Llama's tie_word_embeddings defaults to false, not EXAONE's true
    del llama["tie_word_embeddings"]
    assert ExaoneConfig.from_dict(llama, allow_llama=True).tie_word_embeddings is False


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'gpt2'.*not an EXAONE"):
        ExaoneConfig.from_dict({"model_type": "gpt2", "hidden_size": 64})
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        ExaoneConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ExaoneConfig(num_attention_heads=6, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(ConfigError, match="activation_function"):
        ExaoneConfig(activation_function="gelu")
    with pytest.raises(ConfigError, match="rope_scaling type"):
        ExaoneConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ExaoneConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ExaoneConfig.from_pretrained(tmp_path)


def test_rope_tables_built_once_as_nonpersistent_buffers():
    model = make_model("hd80_tied")
    c = model.config
    assert model.rope_cos.shape == (c.max_position_embeddings, c.head_dim // 2) and model.rope_cos.dtype == torch.float32
    assert "rope_cos" not in model.state_dict() and "rope_sin" not in model.state_dict()
    table = model.rope_cos
    model(torch.randint(0, 100, (1, 5)))
    assert model.rope_cos is table
    i = 7
    freqs = __import__("exaone_ext").ops.reference.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    assert math.isclose(model.rope_cos[1000, i].item(), math.cos(1000 * freqs[i].item()), abs_tol=1e-7)


@pytest.mark.parametrize("tied", [True, False])
def test_hugepage_weights_keep_values_and_ties(tied):
    config = ExaoneConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = ExaoneForCausalLM(config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        logits = model(ids)
    moved = model.hugepage_weights(min_bytes=1 << 20)  # the 4 MiB embedding (and head) qualify
    big = {n for n, p in before.items() if p.nbytes >= 1 << 20}
    assert big
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    if moved:  # Linux with transparent huge pages available
        assert moved == sum(before[n].nbytes for n in big if not (tied and n == "lm_head.weight"))
    with torch.no_grad():
        assert torch.equal(model(ids), logits)


def test_training_step_under_bf16_autocast():
    # torch.autocast(bf16) as the trainer's precision = "bf16" uses it: the kernels get one dtype
    # (projections, attention and the fused loss cast as F.linear / SDPA are; the float32 residual
    # stream meets a projection's bf16 output in add_rms_norm, promoted), the loss stays near the
    # float32 one, and the float32 parameters get float32 gradients
    from exaone_ext import ops
    from exaone_ext.data import Row, collate
    from exaone_ext.training import token_nll_sum
    config = ExaoneConfig(vocab_size=256, hidden_size=128, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=64, intermediate_size=192, max_position_embeddings=256)
    model = ExaoneForCausalLM(config)
    model.reset_parameters()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = collate([Row(r.tolist(), r[1:].tolist() + [-100], [17, 23]) for r in tokens])
    loss32 = token_nll_sum(model, batch)
    grads32 = torch.autograd.grad(loss32, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_nll_sum(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.dtype == torch.float32 and abs(loss.item() - loss32.item()) < 0.01 * abs(loss32.item())
    for g, g32 in zip(grads, grads32):
        assert g.dtype == torch.float32
        assert (g - g32).norm() <= 0.05 * g32.norm() + 1e-6
    # the ops themselves: as F.linear under autocast
    x, w = torch.randn(5, 64), torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x, w).dtype == torch.nn.functional.linear(x, w).dtype == torch.bfloat16
        assert ops.linear_cat(x, [w, w[:8]]).dtype == torch.bfloat16
        q = torch.randn(1, 9, 2, 64)
        assert ops.flash_attn(q, q[:, :, :1], q[:, :, :1]).dtype == torch.bfloat16
        y, h = ops.add_rms_norm(torch.randn(3, 64).bfloat16(), torch.randn(3, 64), torch.ones(64))
        assert h.dtype == torch.float32
    with pytest.raises(TypeError, match="add_rms_norm"):  # outside autocast a mixed pair is still an error
        ops.add_rms_norm(torch.randn(3, 64).bfloat16(), torch.randn(3, 64), torch.ones(64))
