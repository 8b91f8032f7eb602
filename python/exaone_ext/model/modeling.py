"""The EXAONE 3.5 decoder in one file.

    h   = x + out_proj(attention(rope(q_proj(rms_norm(x))), rope(k_proj(...)), v_proj(...)))
    out = h + c_proj(silu(c_fc_0(rms_norm(h))) * c_fc_1(rms_norm(h)))
    logits = lm_head(rms_norm(out of the last block))

Module names follow EXAONE's checkpoint tensor names (transformer.h.{i}.attn.attention.q_proj, ...), so
the state dict is the checkpoint. Every hot op goes through `exaone_ext.ops` (compiled kernels) or,
with `use_kernels=False`, through the same-named plain-PyTorch functions of `exaone_ext.ops.reference`.

Each Block is a self-contained module (`Block.forward(h, ctx) -> h` reads only its own weights), so
`torch.distributed.fsdp.fully_shard(block)` and per-block activation checkpointing apply as usual;
what a forward shares between blocks travels in a ForwardContext.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .. import ops as _kernel_ops
from ..ops import reference as _reference_ops
from ..ops.attention import attention_head_dim_supported
from . import decode_layers
from .config import ExaoneConfig
from .kv_cache import KVCache, LayerKVCache
from .layers import Linear, linear_group

_OP_NAMES = ("decode_layers", "linear", "linear_cat", "linear_int8_cat", "linear_int4_cat", "rms_norm", "add_rms_norm", "rope_cos_sin", "apply_rope", "swiglu", "flash_attn",
             "flash_attn_varlen", "flash_attn_with_kvcache")
_ATTENTION_OPS = ("flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache")


def _resolve_ops(use_kernels: bool, kernel_attention: bool) -> SimpleNamespace:
    def pick(name):
        kernel = use_kernels and (kernel_attention or name not in _ATTENTION_OPS)
        return getattr(_kernel_ops if kernel else _reference_ops, name)
    return SimpleNamespace(**{name: pick(name) for name in _OP_NAMES})


_OPS = {(k, a): _resolve_ops(k, a) for k in (False, True) for a in (False, True)}
_KERNEL_OPS = _OPS[(True, True)]


def ops_for(use_kernels: bool, head_dim: int | None = None) -> SimpleNamespace:
    """The op functions the model calls: the kernels (`exaone_ext.ops`) or the references. A head
    dim the attention kernels are not built for runs the attention references and every other op
    on its kernel."""
    return _OPS[(bool(use_kernels), head_dim is None or attention_head_dim_supported(head_dim))]


@dataclass
class ForwardContext:
    """What one forward shares with every block.

    position_ids int64 [b, s]; cos / sin: the RoPE tables [max_position, head_dim // 2] float32.
    cu_seqlens int32 [n_docs + 1] and max_seqlen (host int): packed documents, or None.
    kv_cache: the cache this forward appends to, or None; cache_seqlens_max: its host bound (tokens
    in the fullest row before this forward). packed_slots: with packed documents and a cache,
    (rows, positions) int64 [total]: where each token's keys and values go. position_ids_max: the
    largest position when the model derived the positions itself (host int; lets apply_rope skip
    its device read-back on a GPU), None for positions the caller gave.

    decode_rows: with packed documents and a cache, the first decode_rows tokens are one new token
    each for cache rows 0..decode_rows-1, which already hold tokens (a decode step), and cache_seqlens_max
    bounds those rows. continued: the rows after them that hold tokens and are continued by a longer
    document (a prompt prefilled in chunks), as (row, first token, tokens, tokens the row holds).
    cu_seqlens, max_seqlen and packed_slots then describe only the documents after all of those,
    which fill the empty rows that follow."""

    ops: SimpleNamespace
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    kv_cache: KVCache | None = None
    cache_seqlens_max: int | None = None
    packed_slots: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids_max: int | None = None
    decode_rows: int = 0
    continued: tuple[tuple[int, int, int, int], ...] = ()

    def layer_cache(self, layer_idx: int) -> LayerKVCache | None:
        return None if self.kv_cache is None else self.kv_cache.layers[layer_idx]


class RMSNorm(nn.Module):
    """EXAONE's RMSNorm over the last dim; `add_norm` fuses the residual add before it."""

    def __init__(self, hidden_size: int, eps: float, use_kernels: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_kernels = use_kernels

    def _ops(self):
        return _kernel_ops if self.use_kernels else _reference_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> rms_norm(x) * weight, in x's dtype."""
        return self._ops().rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x + residual, y = self(h) in one pass. Returns (y, h)."""
        return self._ops().add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query attention: num_attention_heads query heads share num_key_value_heads k/v heads."""

    def __init__(self, config: ExaoneConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = Linear(d, self.num_heads * hd)
        self.k_proj = Linear(d, self.num_kv_heads * hd)
        self.v_proj = Linear(d, self.num_kv_heads * hd)
        self.out_proj = Linear(self.num_heads * hd, d)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: LayerKVCache | None) -> torch.Tensor:
        """x [b, s, d] (normed) -> [b, s, d]."""
        ops = ctx.ops
        b, s, _ = x.shape
        # the three projections in one call (one pass over their weights at decode); q, k, v are views
        nq = self.num_heads * self.head_dim
        hq, hk = self.num_heads, self.num_kv_heads
        qkv = linear_group(x, [self.q_proj, self.k_proj, self.v_proj], ops)                    # [b, s, nq + 2 nk]
        # [b, s, hq, hd], [b, s, hk, hd] twice (two tensor ops rather than six: this runs every layer, every step)
        q, k, v = qkv.view(b, s, hq + 2 * hk, self.head_dim).split((hq, hk, hk), dim=2)
        q, k = ops.apply_rope(q, k, ctx.cos, ctx.sin, ctx.position_ids, position_ids_max=ctx.position_ids_max)
        if ctx.cu_seqlens is not None:
            # packed documents (b == 1): tokens of different documents never see each other; with a
            # cache, document i's keys and values land in its empty row at positions 0..len_i - 1
            n = m = ctx.decode_rows
            parts = []
            if n:
                # a decode step in the same pass: token i continues cache row i
                past = LayerKVCache(cache.k[:n], cache.v[:n])
                parts.append(past.append(q[0, :n, None], k[0, :n, None], v[0, :n, None], ctx.kv_cache.seqlens[:n],
                                         ctx.cache_seqlens_max, ops.flash_attn_with_kvcache)[:, 0])  # [n, hq, hd]
            for row, first, length, held in ctx.continued:
                # a chunk of a prompt continuing its row: attends to the row's cache and to itself
                past = LayerKVCache(cache.k[row:row + 1], cache.v[row:row + 1])
                stop = first + length
                parts.append(past.append(q[:, first:stop], k[:, first:stop], v[:, first:stop],
                                         ctx.kv_cache.seqlens[row:row + 1], held, ops.flash_attn_with_kvcache)[0])
                m = stop
            if s > m or not parts:
                parts.append(ops.flash_attn_varlen(q[0, m:], k[0, m:], v[0, m:], ctx.cu_seqlens, ctx.cu_seqlens,
                                                   ctx.max_seqlen, ctx.max_seqlen, causal=True))  # [total - m, hq, hd]
                if cache is not None:
                    cache.write_packed(k[0, m:], v[0, m:], *ctx.packed_slots)
            out = (parts[0] if len(parts) == 1 else torch.cat(parts))[None]        # [1, total, hq, hd]
        elif cache is not None:
            # k, v are written into the cache at each row's offset, then attended with the past
            out = cache.append(q, k, v, ctx.kv_cache.seqlens, ctx.cache_seqlens_max, ops.flash_attn_with_kvcache)
        else:
            out = ops.flash_attn(q, k, v, causal=True)                                       # [b, s, hq, hd]
        return self.out_proj(out.reshape(b, s, nq))


class AttentionBlock(nn.Module):
    # EXAONE's checkpoints nest the projections one level deeper: attn.attention.q_proj
    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.attention = Attention(config)


class MLP(nn.Module):
    """SwiGLU: c_proj(silu(c_fc_0(x)) * c_fc_1(x))."""

    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.c_fc_0 = Linear(config.hidden_size, config.intermediate_size)  # gate
        self.c_fc_1 = Linear(config.hidden_size, config.intermediate_size)  # up
        self.c_proj = Linear(config.intermediate_size, config.hidden_size)  # down

    def forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        gate_up = linear_group(x, [self.c_fc_0, self.c_fc_1], ops)          # [..., 2 * intermediate]
        return self.c_proj(ops.swiglu(gate_up))


class Block(nn.Module):
    """One decoder layer on the residual stream: h + attn(ln_1(h)), then + mlp(ln_2(.)); the
    second residual add is fused with ln_2."""

    def __init__(self, config: ExaoneConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = AttentionBlock(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """h [b, s, d] residual stream -> the stream after this layer."""
        a = self.attn.attention(self.ln_1(h), ctx, ctx.layer_cache(self.layer_idx))
        y, h = self.ln_2.add_norm(a, h)
        return h + self.mlp(y, ctx.ops)


class Transformer(nn.Module):
    def __init__(self, config: ExaoneConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class ExaoneForCausalLM(nn.Module):
    """EXAONE 3.5 causal language model.

    forward(input_ids [b, s]) -> float32 logits [b, s, vocab]. Build with random weights from a config
    (`ExaoneForCausalLM(ExaoneConfig.preset("2.4b"))`, or under `torch.device("meta")` for shapes only)
    or load a checkpoint with `ExaoneForCausalLM.from_pretrained(path)`. `use_kernels` (switchable
    at any time) chooses the compiled ops or their plain-PyTorch references for every layer.
    """

    # A forward against a KV cache on the CPU (no packed documents) runs every block in one call of
    # ops.decode_layers when the blocks are the model's own (no hook, nothing replaced or patched) and
    # nothing records gradients: the same kernels in the same order without Python between them
    # (model/decode_layers.py). False: always through the Python blocks.
    cpu_fused_layers: bool = True

    def __init__(self, config: ExaoneConfig, use_kernels: bool = True):
        super().__init__()
        self.config = config
        self.generation_config: dict | None = None
        self.transformer = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.use_kernels = use_kernels
        self.init_rope()

    @property
    def use_kernels(self) -> bool:
        return self._use_kernels

    @use_kernels.setter
    def use_kernels(self, value: bool) -> None:
        self._use_kernels = bool(value)
        for m in self.modules():  # every layer that picks its own op (Linear, RMSNorm, replacements)
            if m is not self and hasattr(m, "use_kernels"):
                m.use_kernels = self._use_kernels

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the RoPE tables [max_position_embeddings, head_dim // 2] float32 (angles in float64)
        on `device` (default: where the tables are). Done at construction and by every move or
        cast of the model (.to, .cuda, .to_empty...), never inside forward."""
        c = self.config
        device = self.rope_cos.device if device is None else device
        cos, sin = ops_for(self.use_kernels).rope_cos_sin(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                                           c.rope_scaling, device)
        self.rope_cos, self.rope_sin = cos, sin

    def _apply(self, fn, recurse: bool = True):
        # A move or cast (.to(bfloat16), .cuda(), .to_empty()) would turn the float32 tables into
        # the weights' dtype or uninitialised memory: rebuild them where they now are.
        super()._apply(fn, recurse)
        self.init_rope()
        return self

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
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                kv_cache: KVCache | None = None, num_logits_to_keep: int = 0,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids int64 [b, s]. Returns float32 logits [b, s, vocab] ([b, keep, vocab] for the last
        `num_logits_to_keep` positions when it is > 0), or with return_hidden the final normed
        hidden states [b, s, hidden] (after ln_f, in the model's dtype; same selection) for a
        caller that applies `lm_head.weight` itself (a fused linear + cross-entropy).

        position_ids [b, s]: default 0..s-1, or each row's cache length onward with a kv_cache.
        cu_seqlens int32 [n_docs + 1]: packed documents in input_ids [1, total] (or [total]), attended
        separately, positions restarting at 0 per document unless given (derived on the device);
        num_logits_to_keep then counts per document: [n_docs, keep, ...] of each document's last
        positions. max_seqlen: the longest document, if the caller knows it; otherwise cu_seqlens
        is read back to the host (a synchronisation on a GPU), as it is to check it whenever a
        cache or num_logits_to_keep needs the lengths, or it lies in CPU memory.
        kv_cache: the new tokens are appended to each row's cache and attend to everything before
        them; the cache's seqlens advance by s. With cu_seqlens too, document i goes into row i:
        into empty rows (packed prefill), or continuing rows that already hold tokens, those rows
        coming first: one token each (a decode step) or more (the next chunk of a prompt). New
        prompts, chunks of long ones and a decode step of the running rows go through one pass (one
        read of the weights for all of them).
        """
        c = self.config
        ops = ops_for(self.use_kernels, c.head_dim)
        if kv_cache is not None and len(kv_cache.layers) != c.num_layers:
            raise ValueError(f"ExaoneForCausalLM: kv_cache has {len(kv_cache.layers)} layers, the model {c.num_layers}")
        doc_lengths = packed_slots = cache_max = None
        pos_max = None  # the largest position, when derived here (known on the host)
        # with packed input and a cache: rows continued by one token, and rows continued by more
        decode_rows, continued, ctx_cu = 0, (), cu_seqlens
        if cu_seqlens is not None:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]                               # [total] -> [1, total]
            if input_ids.dim() != 2 or input_ids.shape[0] != 1:
                raise ValueError(f"ExaoneForCausalLM: with cu_seqlens, input_ids must be [1, total] or [total], "
                                 f"got {tuple(input_ids.shape)}")
            need_host = kv_cache is not None or num_logits_to_keep > 0 or max_seqlen is None
            max_seqlen, doc_ids, doc_positions, doc_lengths = _packed_layout(cu_seqlens, input_ids.shape[1],
                                                                             max_seqlen, need_host)
            derived = position_ids is None
            if derived:
                position_ids = doc_positions[None]
                pos_max = max_seqlen - 1
            if num_logits_to_keep > 0 and min(doc_lengths) < num_logits_to_keep:
                raise ValueError(f"ExaoneForCausalLM: num_logits_to_keep = {num_logits_to_keep} needs every packed "
                                 f"document to hold as many tokens, got lengths {doc_lengths}")
            if kv_cache is not None:
                if kv_cache.batch_size != len(doc_lengths):
                    raise ValueError(f"ExaoneForCausalLM: kv_cache has batch_size {kv_cache.batch_size}, cu_seqlens "
                                     f"holds {len(doc_lengths)} documents (one cache row per document)")
                held = kv_cache.host_seqlens.tolist()
                held_rows = next((i for i, n in enumerate(held) if n == 0), len(held))  # rows continued
                if any(held[held_rows:]):
                    raise ValueError(f"ExaoneForCausalLM: packed input (cu_seqlens) with a kv_cache fills empty rows, "
                                     f"and continues rows that hold tokens, those rows first; the rows hold {held} "
                                     f"tokens, the documents are {doc_lengths} tokens long")
                if kv_cache.dtype != self.transformer.ln_f.weight.dtype:
                    raise TypeError(f"ExaoneForCausalLM: kv_cache holds {kv_cache.dtype}, the model computes in "
                                    f"{self.transformer.ln_f.weight.dtype}")
                max_seqlen = max(doc_lengths[held_rows:], default=0)  # of the documents prefilled
                if max([max_seqlen] + [held[i] + doc_lengths[i] for i in range(held_rows)]) > kv_cache.max_seq_len:
                    raise ValueError(f"KVCache: appending documents of {doc_lengths} tokens to rows holding {held} "
                                     f"would exceed max_seq_len {kv_cache.max_seq_len}")
                packed_slots = (doc_ids, doc_positions)  # token t goes to row doc_ids[t], position doc_positions[t]
                if held_rows:
                    # rows continued one token each (a decode step), then those continued by more
                    decode_rows = next((i for i in range(held_rows) if doc_lengths[i] != 1), held_rows)
                    starts = list(itertools.accumulate(doc_lengths[:held_rows], initial=0))
                    continued = tuple((i, starts[i], doc_lengths[i], held[i]) for i in range(decode_rows, held_rows)
                                      if doc_lengths[i])
                    cache_max = max(held[:decode_rows], default=0)
                    m = starts[-1]
                    # the continuing tokens go through the rows' attention; the prefilled documents are
                    # described alone
                    packed_slots = (doc_ids[m:], doc_positions[m:])
                    ctx_cu = cu_seqlens[held_rows:] - m
                    if derived:
                        # each row's tokens go on from the tokens it holds (none in the empty rows)
                        position_ids = (doc_positions + kv_cache.seqlens.long()[doc_ids])[None]
                        pos_max = max([max_seqlen - 1] + [held[i] + doc_lengths[i] - 1 for i in range(held_rows)])
        elif input_ids.dim() != 2:
            raise ValueError(f"ExaoneForCausalLM: input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ExaoneForCausalLM: input_ids must be int64 or int32, got {input_ids.dtype}")
        if kv_cache is not None and packed_slots is None:
            if kv_cache.batch_size != b:
                raise ValueError(f"ExaoneForCausalLM: kv_cache has batch_size {kv_cache.batch_size}, "
                                 f"input_ids has {b} rows")
            # the bound from host memory: the attention op need not read the lengths back
            cache_max = kv_cache.check_room(s)
            if position_ids is None:
                position_ids = kv_cache.seqlens[:, None].long() + torch.arange(s, device=input_ids.device)  # [b, s]
                pos_max = cache_max + s - 1
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)                        # [b, s]
            pos_max = s - 1
        position_ids = position_ids.long()
        if tuple(position_ids.shape) != (b, s):
            raise ValueError(f"ExaoneForCausalLM: position_ids must be [{b}, {s}], got {tuple(position_ids.shape)}")

        if pos_max is not None and not 0 <= pos_max < c.max_position_embeddings:
            pos_max = None  # empty input, or positions past the table: let apply_rope check them and say so
        ctx = ForwardContext(ops, self.rope_cos, self.rope_sin, position_ids, ctx_cu, max_seqlen, kv_cache,
                             cache_max, packed_slots, pos_max, decode_rows, continued)
        h = self.transformer.wte(input_ids)                                                            # [b, s, d]
        if (kv_cache is not None and packed_slots is None and self.cpu_fused_layers and ops is _KERNEL_OPS
                and decode_layers.in_plain_eager_mode(h) and (plan := decode_layers.plan_for(self)).usable()):
            # on the CPU, every block in one call of the same kernels (model/decode_layers.py)
            h = decode_layers.run(plan, h, ctx, ops)
        else:
            for block in self.transformer.h:
                h = block(h, ctx)
        if kv_cache is not None:
            kv_cache.advance(doc_lengths if packed_slots is not None else s)
        if num_logits_to_keep > 0 and cu_seqlens is not None:
            ends = cu_seqlens[1:].long()                                                               # [n_docs]
            idx = ends[:, None] - torch.arange(num_logits_to_keep, 0, -1, device=ends.device)          # [n_docs, keep]
            h = h[0][idx]                                                                              # [n_docs, keep, d]
        elif num_logits_to_keep > 0:
            h = h[:, -num_logits_to_keep:]                                                             # [b, keep, d]
        y = self.transformer.ln_f(h)
        if return_hidden:
            return y
        return self.lm_head(y).float()                                                                 # [b, s, V]

    # ---- checkpoints ----
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, progress=False,
                        use_kernels: bool = True) -> "ExaoneForCausalLM":
        """Load a Hugging Face-layout checkpoint directory (EXAONE or Llama tensor names, detected),
        or a GGUF file (see from_gguf). Tensors keep the dtype stored in the file unless `dtype` is
        given; `progress` is True for a bar on stderr or a callable(done_bytes, total_bytes, tensor_name)."""
        from .checkpoint import load_model, read_config
        from .gguf import is_gguf_path
        from .quant import finish_checkpoint, prepare_for_checkpoint
        if is_gguf_path(path):
            return cls.from_gguf(path, dtype=dtype, device=device, progress=progress, use_kernels=use_kernels)
        config = read_config(path)
        with torch.device("meta"):
            model = cls(config, use_kernels=use_kernels)
        prepare_for_checkpoint(model, dtype)   # quantized projections, from config.json's quantization_config
        model = load_model(model, path, dtype=dtype, device=device, progress=progress)
        finish_checkpoint(model)
        return model

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, progress=False,
                  use_kernels: bool = True) -> "ExaoneForCausalLM":
        """Load a GGUF file of llama.cpp's "exaone" or "llama" architecture. Q4_0 block projections
        become int4 QuantLinear modules (group_size 32, zero point 8), bit for bit; every other
        tensor (F32 / F16 / BF16, Q8_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) a dense weight in `dtype`
        (default: the token embedding's type, bfloat16 when it is quantized). See
        exaone_ext.model.gguf."""
        from .gguf import load_gguf
        return load_gguf(path, dtype=dtype, device=device, progress=progress, use_kernels=use_kernels)

    def quantize(self, fmt: str = "int8", group_size: int = 128, head: str | None = "int8") -> "ExaoneForCausalLM":
        """Replaces every block projection by a quantized one, in place: "int8" (per output channel)
        or "int4" (groups of group_size inputs with zero points), and the head by one in `head`'s
        format ("int8" by default, "int4", or None to keep it as it is). In a tied model (2.4B) the
        embedding is the head: the token lookup then reads the quantized head's rows, and the float
        matrix is freed. save_pretrained then writes a quantized checkpoint. Returns self."""
        from .quant import quantize_model
        return quantize_model(self, fmt, group_size, head)

    def quantize_head(self, fmt: str = "int8") -> "ExaoneForCausalLM":
        """Quantizes the float head of a model whose block projections are already quantized (an AWQ
        checkpoint or a GGUF file's Q4_0 projections, which keep the head in float; a checkpoint
        saved with head=None), in place: "int8" or "int4". Returns self."""
        from .quant import quantize_head
        return quantize_head(self, fmt)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                        naming: str = "exaone", progress=False) -> None:
        """Write config.json, generation_config.json and (sharded) safetensors with an index,
        atomically: the directory appears complete or not at all."""
        from .checkpoint import save_model
        save_model(self, path, max_shard_size=max_shard_size, naming=naming, progress=progress)


def _packed_layout(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None, need_host: bool):
    """Checks cu_seqlens and derives each token's document and position within it, on the device.
    Returns (max_seqlen, doc_ids [total], positions [total], host lengths or None). The lengths are
    read back (and everything checked) only when `need_host` or cu_seqlens is in CPU memory."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("ExaoneForCausalLM: cu_seqlens must be a 1-D int32 tensor [n_docs + 1]")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"ExaoneForCausalLM: cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise TypeError(f"ExaoneForCausalLM: max_seqlen must be a non-negative int or None, got {max_seqlen!r}")
    lengths = None
    if need_host or cu_seqlens.is_cpu:
        host = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(host, host[1:])]
        if host[0] != 0 or host[-1] != total or min(lengths) < 0:
            raise ValueError(f"ExaoneForCausalLM: cu_seqlens must rise from 0 to {total} (the token count), "
                             f"got {host}")
        if max_seqlen is None:
            max_seqlen = max(lengths)
        elif max_seqlen < max(lengths):
            raise ValueError(f"ExaoneForCausalLM: max_seqlen = {max_seqlen} is below the longest document "
                             f"({max(lengths)} tokens)")
    dev = cu_seqlens.device
    token = torch.arange(total, dtype=torch.int32, device=dev)                                     # [total]
    doc_ids = torch.searchsorted(cu_seqlens[1:], token, right=True)                                # [total] int64
    positions = (token - cu_seqlens[doc_ids]).long()                                               # [total]
    return max_seqlen, doc_ids, positions, lengths
