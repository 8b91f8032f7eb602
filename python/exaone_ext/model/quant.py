"""Quantized projections for ExaoneForCausalLM: int8 (per output channel) and int4 (groups of
128 with zero points), and AWQ checkpoints as published.

    model.quantize("int8")            # every block's projections, and the head in int8 (head=...);
                                      # a tied embedding becomes a lookup into the quantized head
    model.save_pretrained(DIR)        # qweight / scales / qzeros tensors + config.json quantization_config
    ExaoneForCausalLM.from_pretrained(DIR)   # builds the quantized modules from quantization_config

A QuantLinear has the forward(x) contract of layers.Linear, so the model file does not change.
Formats: exaone_ext.ops.reference.quant. AWQ checkpoints (quant_method "awq", GEMM layout) load
through AWQLinear, which holds AWQ's tensors as stored and is converted into QuantLinear (int4)
once the checkpoint is read. GGUF files' Q4_0 projections (model/gguf.py) are this int4 format with
group_size 32 and zero point 8."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops as _kernel_ops
from ..ops import reference as _reference_ops
from .awq import awq_to_int4
from .layers import Linear

FORMATS = {"int8": 8, "int4": 4}
QUANT_METHOD = "exaone_ext"


class QuantLinear(nn.Module):
    """y = x @ W.T with W stored quantized. Buffers: `qweight` (int8 [out, in], or uint8 [out, in / 2]
    for int4), `scales` ([out], or [out, in / group_size]) in the model's dtype, and for int4
    `qzeros` (uint8 [out, in / group_size])."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 use_kernels: bool = True, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear: bits must be 8 or 4, got {bits!r}")
        if bits == 4 and (in_features % group_size or group_size % 32):
            raise ValueError(f"QuantLinear: int4 needs in_features ({in_features}) a multiple of group_size "
                             f"({group_size}), itself a multiple of 32")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.use_kernels = use_kernels
        dtype = dtype or torch.get_default_dtype()
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("qzeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))

    @classmethod
    def from_linear(cls, linear: Linear, bits: int, group_size: int = 128) -> "QuantLinear":
        """Round-to-nearest quantisation of a Linear's weight; scales in the weight's dtype."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, linear.use_kernels, device="meta",
                dtype=w.dtype)
        if bits == 8:
            q, s = _reference_ops.quantize_int8(w)
            m.qweight, m.scales = q, s.to(w.dtype)
        else:
            q, s, z = _reference_ops.quantize_int4(w, group_size)
            m.qweight, m.scales, m.qzeros = q, s.to(w.dtype), z
        return m

    # The buffers are read from _buffers directly on the per-call path: nn.Module's attribute lookup
    # of a buffer (its __getattr__ fallback) costs about a microsecond each, and a decode step makes
    # some 12 of these lookups a layer.
    def _scales_for(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._buffers["scales"]
        return scales if scales.dtype == x.dtype or scales.dtype == torch.float32 else scales.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype."""
        ops = _kernel_ops if self.use_kernels else _reference_ops
        b = self._buffers
        if self.bits == 8:
            return ops.linear_int8(x, b["qweight"], self._scales_for(x))
        return ops.linear_int4(x, b["qweight"], self._scales_for(x), b["qzeros"], self.group_size)

    @staticmethod
    def grouped(x: torch.Tensor, modules: list[nn.Module], ops) -> torch.Tensor | None:
        """Several QuantLinear of the same input in one call (layers.linear_group): the outputs
        concatenated, through linear_int8_cat / linear_int4_cat (one pass over x, the weights streamed
        together). None when the modules differ in kind, bits or group size."""
        first = modules[0]
        bits, group = first.bits, first.group_size
        for m in modules:
            if type(m) is not QuantLinear or m.bits != bits or (bits == 4 and m.group_size != group):
                return None
        qweights = [m._buffers["qweight"] for m in modules]
        scales = [m._scales_for(x) for m in modules]
        if bits == 8:
            return ops.linear_int8_cat(x, qweights, scales)
        return ops.linear_int4_cat(x, qweights, scales, [m._buffers["qzeros"] for m in modules], group)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in dtype."""
        if self.bits == 8:
            return _reference_ops.dequantize_int8(self.qweight, self.scales, dtype)
        return _reference_ops.dequantize_int4(self.qweight, self.scales, self.qzeros, self.group_size, dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


class QuantEmbedding(nn.Module):
    """The token lookup of a tied model whose head is quantized: rows of the head's quantized
    matrix, dequantised into the scales' dtype (the model's). The head is one matrix, as the tie
    says: it is held (and saved) once, by the head; this module has no tensors of its own."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "head", head)   # a reference, not a submodule: no second state-dict entry
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (int) [...] -> [..., embedding_dim] in the head's scales dtype."""
        h = self.head
        rows = ids.reshape(-1)
        # index_select, as nn.Embedding: an id outside [0, num_embeddings) raises (plain indexing
        # would take a negative id from the end)
        pick = lambda t: torch.index_select(t, 0, rows)  # noqa: E731
        if h.bits == 8:
            w = _reference_ops.dequantize_int8(pick(h.qweight), pick(h.scales), h.scales.dtype)
        else:
            w = _reference_ops.dequantize_int4(pick(h.qweight), pick(h.scales), pick(h.qzeros), h.group_size,
                                               h.scales.dtype)
        return w.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of lm_head (int{self.head.bits})"


class AWQLinear(nn.Module):
    """AWQ's tensors of one projection as stored (qweight int32 [in, out / 8], qzeros int32
    [in / g, out / 8], scales [in / g, out]); to_quant_linear() gives the int4 QuantLinear."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if out_features % 8 or in_features % group_size:
            raise ValueError(f"AWQLinear: out_features ({out_features}) must be a multiple of 8 and in_features "
                             f"({in_features}) of group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=dtype or torch.float16, device=device))

    def to_quant_linear(self, dtype: torch.dtype, use_kernels: bool = True) -> QuantLinear:
        q, s, z = awq_to_int4(self.qweight, self.qzeros, self.scales, self.group_size, scale_dtype=dtype)
        m = QuantLinear(self.in_features, self.out_features, 4, self.group_size, use_kernels, device="meta",
                        dtype=dtype)
        m.qweight, m.scales, m.qzeros = q, s, z
        return m

    def forward(self, x):
        raise RuntimeError("AWQLinear holds a checkpoint's tensors while loading; convert it with to_quant_linear()")


def projections(model: nn.Module):
    """(parent module, attribute name, module) of every block projection (not the embedding or head)."""
    for block in model.transformer.h:
        attn = block.attn.attention
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield attn, name, getattr(attn, name)
        for name in ("c_fc_0", "c_fc_1", "c_proj"):
            yield block.mlp, name, getattr(block.mlp, name)


HEAD_FORMATS = {"int8": 8, "int4": 4, None: None, "none": None}


def quantize_model(model: nn.Module, fmt: str, group_size: int = 128, head: str | None = "int8") -> nn.Module:
    """Replaces every block projection of `model` by a QuantLinear ('int8' or 'int4'), and the head
    by one in `head`'s format ('int8', 'int4', or None to keep it as it is), in place; records the
    formats in model.config.extra['quantization_config'] (written by save_pretrained). A tied
    model's embedding is its head: once the head is quantized, the token lookup reads its rows
    (QuantEmbedding) and the float matrix is gone."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize: format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if head not in HEAD_FORMATS:
        raise ValueError(f"quantize: head must be 'int8', 'int4' or None (kept as it is), got {head!r}")
    if model.config.extra.get("quantization_config"):
        raise ValueError(f"quantize: the model is already quantized "
                         f"({model.config.extra['quantization_config']})")
    bits, head_bits = FORMATS[fmt], HEAD_FORMATS[head]
    if (bits == 4 or head_bits == 4) and (group_size <= 0 or group_size % 32):
        raise ValueError(f"quantize: group_size must be a positive multiple of 32, got {group_size!r}")
    # (parent, attribute, module, bits): everything checked before anything is replaced
    todo = [(parent, name, lin, bits) for parent, name, lin in projections(model)]
    if head_bits:
        todo.append((model, "lm_head", model.lm_head, head_bits))
    for parent, name, lin, b in todo:
        if type(lin) is not Linear:
            raise TypeError(f"quantize: {name} is a {type(lin).__name__}, expected a Linear")
        if b == 4 and lin.in_features % group_size:
            raise ValueError(f"quantize: int4 needs {name}'s in_features ({lin.in_features}) to be a multiple of "
                             f"group_size ({group_size})")
    for parent, name, lin, b in todo:
        setattr(parent, name, QuantLinear.from_linear(lin, b, group_size))
    if head_bits:
        _tie_quantized_head(model)
    model.config.extra["quantization_config"] = quantization_config(bits, group_size, head_bits)
    hugepage_buffers(model)
    return model


def quantize_head(model: nn.Module, fmt: str = "int8") -> nn.Module:
    """Quantizes the float head of a model whose block projections are already quantized (an AWQ
    checkpoint, a GGUF file's Q4_0 projections, a checkpoint saved with head=None), in place: 'int8'
    (per output channel) or 'int4' (groups of the checkpoint's group_size). A tied embedding becomes
    the lookup into the quantized head, as in quantize_model. Recorded as head_bits."""
    qc = model.config.extra.get("quantization_config")
    if fmt not in FORMATS:
        raise ValueError(f"quantize_head: format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if not qc:
        raise ValueError("quantize_head: the model's projections are not quantized; use "
                         "quantize(fmt, head=...) for the projections and the head together")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quantize_head: quantization_config {qc} is not this package's format")
    if type(model.lm_head) is not Linear:
        raise ValueError(f"quantize_head: the head is already quantized ({model.lm_head.extra_repr()})")
    bits, group = FORMATS[fmt], int(qc.get("group_size", 128))
    head = model.lm_head
    if bits == 4 and head.in_features % group:
        raise ValueError(f"quantize_head: int4 needs lm_head's in_features ({head.in_features}) to be a multiple "
                         f"of the checkpoint's group_size ({group})")
    model.lm_head = QuantLinear.from_linear(head, bits, group)
    _tie_quantized_head(model)
    qc = dict(qc, head_bits=bits)
    if bits == 4:
        qc.setdefault("group_size", group)
        qc.setdefault("zero_point", True)
    model.config.extra["quantization_config"] = qc
    hugepage_buffers(model, modules=[model.lm_head])   # the projections were placed when they were loaded
    return model


QUANT_HEAD_CHOICES = ("int8", "int4", "float")


def quantize_on_load(model: nn.Module, quant: str | None, quant_head: str | None, what: str = "quant") -> None:
    """The command line's --quant / --quant-head on a loaded model: with `quant`, quantize(quant,
    head=quant_head, default int8; "float" keeps the head); without it, quant_head "int8" / "int4"
    quantizes the float head of an already-quantized checkpoint (quantize_head). ValueError for a
    quant_head out of range (prefixed with `what`) or a model that cannot take the formats."""
    if quant_head not in (None, *QUANT_HEAD_CHOICES):
        raise ValueError(f"{what}: quant_head must be one of {QUANT_HEAD_CHOICES} or None, got {quant_head!r}")
    if quant is not None:
        quantize_model(model, quant, head=None if quant_head == "float" else (quant_head or "int8"))
    elif quant_head in ("int8", "int4"):
        quantize_head(model, quant_head)


def quantization_config(bits: int, group_size: int = 128, head_bits: int | None = None) -> dict:
    """config.json's quantization_config: `bits` for the block projections, `head_bits` for the
    head (absent: the head is stored in float, as in checkpoints written before heads were quantized)."""
    cfg = {"quant_method": QUANT_METHOD, "bits": bits}
    if bits == 4 or head_bits == 4:
        cfg.update(group_size=group_size, zero_point=True)
    if head_bits:
        cfg["head_bits"] = head_bits
    return cfg


def quantized_head_bits(qc: dict | None) -> int | None:
    """The head's bits recorded in a quantization_config (None: a float head). ValueError for values
    this package cannot build."""
    if not qc or qc.get("quant_method") != QUANT_METHOD or qc.get("head_bits") is None:
        return None
    if qc["head_bits"] not in (4, 8):
        raise ValueError(f"from_pretrained: quantization_config head_bits must be 8 or 4, got {qc['head_bits']!r}")
    return qc["head_bits"]


def prepare_for_checkpoint(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Before loading: replaces the projections of a model built on the meta device by the modules
    the checkpoint's quantization_config stores (QuantLinear or AWQLinear); nothing when none.
    Projections named in its modules_to_not_convert (full module names) stay Linear."""
    qc = model.config.extra.get("quantization_config")
    if not qc:
        return
    method, bits = qc.get("quant_method"), qc.get("bits")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == QUANT_METHOD and bits in (4, 8):
        make = lambda lin: QuantLinear(lin.in_features, lin.out_features, bits, group, lin.use_kernels,  # noqa: E731
                                       device="meta", dtype=dtype or torch.bfloat16)
    elif method == "awq" and bits == 4 and qc.get("version", "gemm").lower() == "gemm" and qc.get("zero_point", True):
        make = lambda lin: AWQLinear(lin.in_features, lin.out_features, group, device="meta")  # noqa: E731
    else:
        raise ValueError(f"from_pretrained: unsupported quantization_config {qc} (supported: quant_method "
                         f"'{QUANT_METHOD}' with bits 8 or 4, and 'awq' with bits 4, version 'gemm', zero_point)")
    # modules stored unquantized (a GGUF file with some projections in other types)
    keep = set(qc.get("modules_to_not_convert") or ()) if method == QUANT_METHOD else set()
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, lin in list(projections(model)):
        if names[id(lin)] not in keep:
            setattr(parent, name, make(lin))
    head_bits = quantized_head_bits(qc)
    if head_bits:
        head = model.lm_head
        model.lm_head = QuantLinear(head.in_features, head.out_features, head_bits, group, head.use_kernels,
                                    device="meta", dtype=dtype or torch.bfloat16)
        _tie_quantized_head(model)


def _tie_quantized_head(model: nn.Module) -> None:
    """A tied model's embedding becomes the lookup into its quantized head (one matrix, stored once)."""
    if model.config.tie_word_embeddings:
        model.transformer.wte = QuantEmbedding(model.lm_head)


def finish_checkpoint(model: nn.Module) -> None:
    """After loading: AWQ projections converted into int4 QuantLinear modules (scales in the model's
    float dtype), and the config marked as this package's int4 format so that a save writes it."""
    converted = False
    dtype = model.transformer.ln_f.weight.dtype
    for parent, name, m in list(projections(model)):
        if isinstance(m, AWQLinear):
            setattr(parent, name, m.to_quant_linear(dtype, model.use_kernels))
            converted = True
    if converted:
        group = int(model.config.extra["quantization_config"].get("group_size", 128))
        model.config.extra["quantization_config"] = quantization_config(4, group)
    if model.config.extra.get("quantization_config"):
        hugepage_buffers(model)


def hugepage_buffers(model: nn.Module, min_bytes: int = 2 << 20, modules=None) -> int:
    """As ExaoneForCausalLM.hugepage_weights, for the quantized weights (buffers, not parameters) of
    `modules` (QuantLinear; default every projection and the head): their weights, scales and zero
    points are copied, in the order a decode step reads them, into ONE buffer whose start is 2 MiB
    aligned and which Linux backs with transparent huge pages (advised before the copies touch it;
    each tensor a view of it, 64 bytes aligned). A buffer per tensor would leave the pieces of each
    outside whole 2 MiB pages in 4 KiB pages (all of a 0.8 MiB int4 k_proj, 1.3 of a 3.3 MiB q_proj),
    and a one-row int8 / int4 product reads 8-17% slower from 4 KiB pages (2560 -> 2560 / 7168 on a
    2-core Zen 2). One tensor is copied at a time and its old storage freed, so the peak is the
    quantized model plus its largest tensor. Returns the bytes placed (0: nothing to place, fewer
    than `min_bytes`, EXAONE_EXT_HUGEPAGES=0, or the OS declines)."""
    import os

    from .. import _C
    if os.environ.get("EXAONE_EXT_HUGEPAGES", "1") == "0":
        return 0
    if modules is None:
        modules = [m for _, _, m in projections(model)] + [model.lm_head]
    items = [(m, name, m._buffers[name]) for m in modules
             if isinstance(m, QuantLinear) and m.qweight.device.type == "cpu"
             for name in ("qweight", "scales", "qzeros") if m._buffers.get(name) is not None]
    huge, line = 2 << 20, 64
    sizes = [-(-t.nbytes // line) * line for _, _, t in items]
    total = sum(sizes)
    if total < min_bytes:
        return 0
    raw = torch.empty(total + huge, dtype=torch.uint8)
    start = -raw.data_ptr() % huge
    if not _C._advise_hugepages(raw.data_ptr() + start, total):
        return 0
    pos = start
    for (m, name, t), size in zip(items, sizes):
        view = raw[pos:pos + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        m._buffers[name] = view
        pos += size
    return total
