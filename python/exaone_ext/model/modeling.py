"""The EXAONE 3.5 decoder in one file.

    h   = x + out_proj(attention(rope(q_proj(rms_norm(x))), rope(k_proj(...)), v_proj(...)))
    out = h + c_proj(silu(c_fc_0(rms_norm(h))) * c_fc_1(rms_norm(h)))
    logits = lm_head(rms_norm(out of the last block))

Module names follow EXAONE's checkpoint tensor names (transformer.h.{i}.attn.attention.q_proj, ...), so
the state dict is the checkpoint. Every hot op goes through `exaone_ext.ops` (compiled kernels) or,
with `use_kernels=False`, through the same-named plain-PyTorch functions of `exaone_ext.ops.reference`.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from torch import nn

from .. import ops as _kernel_ops
from ..ops import reference as _reference_ops
from ..ops.attention import ATTENTION_HEAD_DIMS
from .config import ExaoneConfig
from .kv_cache import KVCache

_OP_NAMES = ("linear", "linear_cat", "rms_norm", "add_rms_norm", "rope_cos_sin", "apply_rope", "swiglu", "flash_attn",
             "flash_attn_varlen", "flash_attn_with_kvcache")


_ATTENTION_OPS = ("flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache")


def _resolve_ops(use_kernels: bool, kernel_attention: bool) -> SimpleNamespace:
    def pick(name):
        kernel = use_kernels and (kernel_attention or name not in _ATTENTION_OPS)
        return getattr(_kernel_ops if kernel else _reference_ops, name)
    return SimpleNamespace(**{name: pick(name) for name in _OP_NAMES})


_OPS = {(k, a): _resolve_ops(k, a) for k in (False, True) for a in (False, True)}


def ops_for(use_kernels: bool, head_dim: int | None = None) -> SimpleNamespace:
    """The op functions the model calls: the kernels (`exaone_ext.ops`) or the references. A head
    dim the attention kernels are not built for (they cover ATTENTION_HEAD_DIMS) runs the attention
    references and every other op on its kernel."""
    return _OPS[(bool(use_kernels), head_dim is None or head_dim in ATTENTION_HEAD_DIMS)]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps


class Attention(nn.Module):
    """Grouped-query attention: num_attention_heads query heads share num_key_value_heads k/v heads."""

    def __init__(self, config: ExaoneConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def forward(self, x, ops, cos, sin, position_ids, cu_seqlens, max_seqlen, kv_layer, cache_seqlens,
                cache_max=None):
        b, s, _ = x.shape
        # the three projections in one call (one pass over their weights at decode); q, k, v are views
        nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = ops.linear_cat(x, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # [b, s, nq + 2 nk]
        q = qkv[..., :nq].view(b, s, self.num_heads, self.head_dim)                          # [b, s, hq, hd]
        k = qkv[..., nq:nq + nk].view(b, s, self.num_kv_heads, self.head_dim)                # [b, s, hk, hd]
        v = qkv[..., nq + nk:].view(b, s, self.num_kv_heads, self.head_dim)                  # [b, s, hk, hd]
        q, k = ops.apply_rope(q, k, cos, sin, position_ids)
        if kv_layer is not None and cu_seqlens is not None:
            # packed prefill into empty cache rows: document i attends to itself only, and its keys
            # and values land in row i at positions 0..len_i - 1 (kv_layer[2]: (rows, positions))
            out = ops.flash_attn_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        causal=True)[None]               # [1, total, hq, hd]
            rows, pos = kv_layer[2]
            kv_layer[0].index_put_((rows, pos), k[0])
            kv_layer[1].index_put_((rows, pos), v[0])
        elif kv_layer is not None:
            # k, v are written into the cache at each row's offset, then attended with the past
            out = ops.flash_attn_with_kvcache(q, kv_layer[0], kv_layer[1], cache_seqlens, k, v, causal=True,
                                              cache_seqlens_max=cache_max)
        elif cu_seqlens is not None:
            # packed documents: b == 1, tokens of different documents never see each other
            out = ops.flash_attn_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                        causal=True)[None]               # [1, total, hq, hd]
        else:
            out = ops.flash_attn(q, k, v, causal=True)                   # [b, s, hq, hd]
        return ops.linear(out.reshape(b, s, self.num_heads * self.head_dim), self.out_proj.weight)


class AttentionBlock(nn.Module):
    # EXAONE's checkpoints nest the projections one level deeper: attn.attention.q_proj
    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.attention = Attention(config)


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(c_fc_0(x)) * c_fc_1(x))."""

    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.c_fc_0 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.c_fc_1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x, ops):
        gate_up = ops.linear_cat(x, [self.c_fc_0.weight, self.c_fc_1.weight])  # [..., 2 * intermediate]
        return ops.linear(ops.swiglu(gate_up), self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = AttentionBlock(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)


class Transformer(nn.Module):
    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class ExaoneForCausalLM(nn.Module):
    """EXAONE 3.5 causal language model.

    forward(input_ids [b, s]) -> float32 logits [b, s, vocab]. Build with random weights from a config
    (`ExaoneForCausalLM(ExaoneConfig.preset("2.4b"))`, or under `torch.device("meta")` for shapes only)
    or load a checkpoint with `ExaoneForCausalLM.from_pretrained(path)`. `use_kernels` (an attribute,
    switchable at any time) chooses the compiled ops or their plain-PyTorch references.
    """

    def __init__(self, config: ExaoneConfig, use_kernels: bool = True):
        super().__init__()
        self.config = config
        self.use_kernels = use_kernels
        self.generation_config: dict | None = None
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables [max_position_embeddings, head_dim // 2] float32 (angles in float64)."""
        c = self.config
        device = self.transformer.wte.weight.device if device is None else device
        cos, sin = ops_for(self.use_kernels).rope_cos_sin(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                                           c.rope_scaling, device)
        self.rope_cos, self.rope_sin = cos, sin

    def reset_parameters(self, std: float | None = None) -> None:
        """Random normal weights (std = config.initializer_range), norms at one."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)

    def hugepage_weights(self, min_bytes: int = 2 << 20) -> int:
        """Moves every CPU weight of at least `min_bytes` into a fresh buffer that Linux backs with
        transparent huge pages (advised before the copy touches it); tied weights stay tied. A decode
        step streams each weight once, and 2 MiB pages spare it a TLB miss every 4 KiB (about 8% of
        the read rate on the machines measured). from_pretrained does this for CPU models; set
        EXAONE_EXT_HUGEPAGES=0 to turn it off. Returns the bytes placed in advised memory (0 where
        the OS declines). One weight is copied at a time, so the peak is the largest weight."""
        from .. import _C
        if os.environ.get("EXAONE_EXT_HUGEPAGES", "1") == "0":
            return 0
        moved: dict[tuple, nn.Parameter] = {}  # old (data_ptr, shape, dtype) -> new parameter
        total = 0
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p is None or p.device.type != "cpu" or p.nbytes < min_bytes:
                    continue
                key = (p.data_ptr(), tuple(p.shape), p.dtype)
                if key not in moved:
                    buf = torch.empty(p.shape, dtype=p.dtype)
                    advised = _C._advise_hugepages(buf.data_ptr(), buf.nbytes)
                    if advised == 0:
                        moved[key] = p
                        continue
                    with torch.no_grad():
                        buf.copy_(p)
                    moved[key] = nn.Parameter(buf, requires_grad=p.requires_grad)
                    total += buf.nbytes
                module._parameters[name] = moved[key]
        return total

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                num_logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids int64 [b, s]. Returns float32 logits [b, s, vocab] ([b, keep, vocab] for the last
        `num_logits_to_keep` positions when it is > 0).

        position_ids [b, s]: default 0..s-1, or each row's cache length onward with a kv_cache.
        cu_seqlens int32 [n_docs + 1]: packed documents in input_ids [1, total] (or [total]), attended
        separately, positions restarting at 0 per document unless given; num_logits_to_keep then
        counts per document: logits [n_docs, keep, vocab] of each document's last positions.
        kv_cache: the new tokens are appended to each row's cache and attend to everything before
        them; the cache's seqlens advance by s. With cu_seqlens too (packed prefill), document i
        goes into row i of a cache whose rows are all empty.
        """
        ops = ops_for(self.use_kernels, self.config.head_dim)
        doc_lengths = packed_kv = None
        if kv_cache is not None and len(kv_cache.layers) != self.config.num_layers:
            raise ValueError(f"ExaoneForCausalLM: kv_cache has {len(kv_cache.layers)} layers, "
                             f"the model {self.config.num_layers}")
        if cu_seqlens is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]                               # [total] -> [1, total]
            if input_ids.dim() != 2 or input_ids.shape[0] != 1:
                raise ValueError(f"ExaoneForCausalLM: with cu_seqlens, input_ids must be [1, total] or [total], "
                                 f"got {tuple(input_ids.shape)}")
            cu_seqlens, max_seqlen, doc_ids, doc_positions, doc_lengths = self._check_cu_seqlens(
                cu_seqlens, input_ids.shape[1])
            if position_ids is None:
                position_ids = doc_positions[None]
            if num_logits_to_keep > 0 and min(doc_lengths) < num_logits_to_keep:
                raise ValueError(f"ExaoneForCausalLM: num_logits_to_keep = {num_logits_to_keep} needs every packed "
                                 f"document to hold as many tokens, got lengths {doc_lengths}")
            if kv_cache is not None:
                if kv_cache.batch_size != len(doc_lengths):
                    raise ValueError(f"ExaoneForCausalLM: kv_cache has batch_size {kv_cache.batch_size}, cu_seqlens "
                                     f"holds {len(doc_lengths)} documents (one cache row per document)")
                if kv_cache.longest() != 0:
                    raise ValueError(f"ExaoneForCausalLM: packed input (cu_seqlens) with a kv_cache fills empty rows "
                                     f"only; the rows hold {kv_cache.host_seqlens.tolist()} tokens")
                kv_cache.check_room(max_seqlen)
                if kv_cache.dtype != self.transformer.wte.weight.dtype:
                    raise TypeError(f"ExaoneForCausalLM: kv_cache holds {kv_cache.dtype}, the model computes in "
                                    f"{self.transformer.wte.weight.dtype}")
                packed_kv = (doc_ids, doc_positions)  # token t goes to row doc_ids[t], position doc_positions[t]
        elif input_ids.dim() != 2:
            raise ValueError(f"ExaoneForCausalLM: input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        else:
            max_seqlen = None
        b, s = input_ids.shape
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ExaoneForCausalLM: input_ids must be int64 or int32, got {input_ids.dtype}")

        cache_seqlens = cache_max = None
        if kv_cache is not None and packed_kv is None:
            if kv_cache.batch_size != b:
                raise ValueError(f"ExaoneForCausalLM: kv_cache has batch_size {kv_cache.batch_size}, "
                                 f"input_ids has {b} rows")
            # the bound from host memory: the attention op need not read the lengths back
            cache_max = kv_cache.check_room(s)
            cache_seqlens = kv_cache.seqlens
            if position_ids is None:
                position_ids = cache_seqlens[:, None].long() + torch.arange(s, device=input_ids.device)  # [b, s]
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)                   # [b, s]
        position_ids = position_ids.long()
        if tuple(position_ids.shape) != (b, s):
            raise ValueError(f"ExaoneForCausalLM: position_ids must be [{b}, {s}], got {tuple(position_ids.shape)}")
        if (self.rope_cos.device != input_ids.device or self.rope_cos.dtype != torch.float32  # e.g. after .to(bf16)
                or self.rope_cos.shape[0] != self.config.max_position_embeddings):
            self.init_rope(input_ids.device)

        eps = self.config.layer_norm_epsilon
        blocks = self.transformer.h
        x = self.transformer.wte(input_ids)                                                       # [b, s, d]
        # residual stream h; each norm is fused with the add of the branch before it
        h = x
        y = ops.rms_norm(x, blocks[0].ln_1.weight, eps) if len(blocks) else x
        for i, block in enumerate(blocks):
            kv_layer = kv_cache.layers[i] if kv_cache is not None else None
            if packed_kv is not None:
                kv_layer = (*kv_layer, packed_kv)
            a = block.attn.attention(y, ops, self.rope_cos, self.rope_sin, position_ids, cu_seqlens, max_seqlen,
                                     kv_layer, cache_seqlens, cache_max)
            y, h = ops.add_rms_norm(a, h, block.ln_2.weight, eps)
            m = block.mlp(y, ops)
            next_norm = blocks[i + 1].ln_1.weight if i + 1 < len(blocks) else self.transformer.ln_f.weight
            y, h = ops.add_rms_norm(m, h, next_norm, eps)
        if not len(blocks):
            y = ops.rms_norm(x, self.transformer.ln_f.weight, eps)
        if kv_cache is not None:
            kv_cache.advance(doc_lengths if packed_kv is not None else s)
        if num_logits_to_keep > 0 and doc_lengths is not None:
            ends = cu_seqlens[1:].long()                                                          # [n_docs]
            idx = ends[:, None] - torch.arange(num_logits_to_keep, 0, -1, device=ends.device)     # [n_docs, keep]
            y = y[0][idx]                                                                         # [n_docs, keep, d]
        elif num_logits_to_keep > 0:
            y = y[:, -num_logits_to_keep:]                                                        # [b, keep, d]
        return ops.linear(y, self.lm_head.weight).float()                                        # [b, s, V]

    def _check_cu_seqlens(self, cu_seqlens: torch.Tensor, total: int):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("ExaoneForCausalLM: cu_seqlens must be a 1-D int32 tensor [n_docs + 1]")
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"ExaoneForCausalLM: cu_seqlens must be int32, got {cu_seqlens.dtype}")
        host = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(host, host[1:])]
        if host[0] != 0 or host[-1] != total or min(lengths) < 0:
            raise ValueError(f"ExaoneForCausalLM: cu_seqlens must rise from 0 to {total} (the token count), "
                             f"got {host}")
        dev = cu_seqlens.device
        doc_ids = torch.arange(len(lengths), device=dev).repeat_interleave(torch.tensor(lengths, device=dev),
                                                                           output_size=total)    # [total]
        positions = torch.arange(total, device=dev) - torch.tensor(host[:-1], device=dev)[doc_ids]  # [total]
        return cu_seqlens, max(lengths), doc_ids, positions, lengths

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, progress=False,
                        use_kernels: bool = True) -> "ExaoneForCausalLM":
        """Load a Hugging Face-layout checkpoint directory (EXAONE or Llama tensor names, detected).
        Tensors keep the dtype stored in the file unless `dtype` is given; `progress` is True for a
        bar on stderr or a callable(done_bytes, total_bytes, tensor_name)."""
        from .checkpoint import load_model
        return load_model(cls, path, dtype=dtype, device=device, progress=progress, use_kernels=use_kernels)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        naming: str = "exaone", progress=False) -> None:
        """Write config.json, generation_config.json and (sharded) safetensors with an index,
        atomically: the directory appears complete or not at all."""
        from .checkpoint import save_model
        save_model(self, path, max_shard_size=max_shard_size, naming=naming, progress=progress)
