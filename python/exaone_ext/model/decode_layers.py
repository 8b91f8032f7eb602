"""The CPU's one-call path through the decoder layers of a forward against a KV cache.

A decode step of a small model on a CPU spends much of its time between kernels: some twelve op
calls a layer, each through the Python wrapper, nn.Module's call and the dispatcher. When the
blocks are the model's own (Block, Attention, MLP, RMSNorm, Linear or QuantLinear projections, no
hooks, nothing replaced or patched), ExaoneForCausalLM.forward hands all of them to one
exaone_ext.ops.decode_layers call, which runs the same kernels in the same order in C++ (bit for
bit the same results). Anything else (a replaced projection, a hook, a patched forward, autocast,
gradients, torch.compile, a tensor subclass or mode) takes the Python blocks as always.

LayersPlan gathers what the op needs from the blocks once and checks on every call that it still
holds (some two thousand dict lookups and identity comparisons, in C: about 10 us for the 2.4B
model); a changed model (quantize(), a moved or cast model, a replaced module) is planned again.
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.nn.modules import module as _nn_module

from .. import _C
from .layers import Linear
from .quant import QuantLinear

_modeling = None


def _forwards():
    """The methods the one-call path stands in for: a class-level patch of any of them (to log, to
    change the computation) sends forward back to the Python blocks."""
    global _modeling
    if _modeling is None:
        from . import modeling as _modeling
    m = _modeling
    return (m.Block.forward, m.Attention.forward, m.MLP.forward, m.RMSNorm.forward, m.RMSNorm.add_norm,
            Linear.forward, QuantLinear.forward, QuantLinear.grouped)


class LayersPlan:
    """What exaone_ext.ops.decode_layers needs from a model's blocks.

    `reason` is None when the blocks can run in one call, else why not (in words). `current()` says
    whether the blocks are still the ones planned (the same module objects of the same types);
    `usable()` whether they may run in one call now (no hook, kernels on, no patched forward)."""

    def __init__(self, model):
        from .modeling import MLP, Attention, AttentionBlock, Block, RMSNorm
        self._originals = _forwards()
        self.reason: str | None = None
        # every module the path stands in for, with where it hangs (parent._modules, name)
        self._parents, self._names, self._mods = [], [], []

        def track(parent, name):
            m = parent._modules.get(name)
            self._parents.append(parent._modules)
            self._names.append(name)
            self._mods.append(m)
            return m

        def refuse(why):
            if self.reason is None:
                self.reason = why

        self._weight_dicts, self._weight_keys = [], []   # each weight read from (dict, key) per call
        self._ln_dicts, self._kernel_dicts = [], []
        self.layout: list[int] = []
        self.layer_idx: list[int] = []
        c = model.config
        self.num_heads, self.num_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.softmax_scale = 1.0 / math.sqrt(c.head_dim)
        dtype = model.transformer.ln_f.weight.dtype
        blocks = track(model.transformer, "h")
        for i in range(len(blocks)):
            block = track(blocks, str(i))
            if type(block) is not Block:
                refuse(f"block {i} is a {type(block).__name__}")
                continue
            self.layer_idx.append(block.layer_idx)
            ln_1, ln_2 = track(block, "ln_1"), track(block, "ln_2")
            attn = track(block, "attn")
            mlp = track(block, "mlp")
            if type(attn) is not AttentionBlock or type(mlp) is not MLP:
                refuse(f"block {i}'s attn / mlp is a {type(attn).__name__} / {type(mlp).__name__}")
                continue
            attention = track(attn, "attention")
            if type(attention) is not Attention:
                refuse(f"block {i}'s attention is a {type(attention).__name__}")
                continue
            for ln in (ln_1, ln_2):
                if type(ln) is not RMSNorm:
                    refuse(f"block {i}'s norm is a {type(ln).__name__}")
                    continue
                self._ln_dicts.append(ln.__dict__)
                self._kernel_dicts.append(ln.__dict__)
                self._weight_dicts.append(ln._parameters)
                self._weight_keys.append("weight")
            groups = ([track(attention, n) for n in ("q_proj", "k_proj", "v_proj")], [track(attention, "out_proj")],
                      [track(mlp, n) for n in ("c_fc_0", "c_fc_1")], [track(mlp, "c_proj")])
            for group in groups:
                why = self._add_group(group, dtype)
                if why:
                    refuse(f"block {i}: {why}")
        self._types = [type(m) for m in self._mods]
        self._weights = self._read_weights()
        self._hook_dicts = [d for m in self._mods if m is not None
                            for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._mod_dicts = [m.__dict__ for m in self._mods if m is not None]
        if len(self.layer_idx) != c.num_layers and self.reason is None:
            self.reason = f"{len(self.layer_idx)} blocks for {c.num_layers} layers"

    def _add_group(self, modules, dtype) -> str | None:
        """Appends one projection group's layout entry and weight places; returns why it cannot
        run in one call, or None."""
        first = modules[0]
        if all(type(m) is Linear for m in modules):
            self.layout += [0, len(modules), 0]
            for m in modules:
                self._kernel_dicts.append(m.__dict__)
                self._weight_dicts.append(m._parameters)
                self._weight_keys.append("weight")
            return None
        if not all(type(m) is QuantLinear for m in modules):
            return f"projections of types {sorted({type(m).__name__ for m in modules})}"
        bits, group = first.bits, first.group_size
        if any(m.bits != bits or (bits == 4 and m.group_size != group) for m in modules):
            return "quantized projections of different formats in one group"
        for m in modules:
            if m._buffers["scales"].dtype not in (dtype, torch.float32):
                return f"scales in {m._buffers['scales'].dtype} for a {dtype} model"
        self.layout += [bits, len(modules), group if bits == 4 else 0]   # kind: 8 / 4, as the op takes it
        names = ("qweight", "scales") if bits == 8 else ("qweight", "scales", "qzeros")
        for name in names:
            for m in modules:
                self._weight_dicts.append(m._buffers)
                self._weight_keys.append(name)
        self._kernel_dicts.extend(m.__dict__ for m in modules)
        return None

    def current(self) -> bool:
        """The same module objects hang in the same places, with the same types."""
        return _C._same_entries(self._parents, self._names, self._mods) and _C._same_types(self._mods, self._types)

    def usable(self) -> bool:
        """Nothing asks for the Python blocks now: no forward hook or pre-hook (the modules' or
        global), every kernel switch on, no forward patched on a class or an instance."""
        return (self.reason is None and _C._all_empty(self._hook_dicts)
                and not _nn_module._global_forward_hooks and not _nn_module._global_forward_pre_hooks
                and _C._all_true(self._kernel_dicts, "use_kernels")
                and _C._none_holds(self._mod_dicts, "forward")
                and all(a is b for a, b in zip(_forwards(), self._originals)))

    def _read_weights(self) -> list[torch.Tensor]:
        return [d[k] for d, k in zip(self._weight_dicts, self._weight_keys)]

    def weights(self) -> list[torch.Tensor]:
        """The weights as they are now: the list read last time while every one still hangs where it
        was read (a weight replaced in its module, by a move or a cast, is read again)."""
        if not _C._same_entries(self._weight_dicts, self._weight_keys, self._weights):
            self._weights = self._read_weights()
        return self._weights

    def eps(self) -> list[float]:
        return [float(d["eps"]) for d in self._ln_dicts]


# model -> its plan; kept beside the model (not in it: a copy or a pickle of the model carries none)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_for(model) -> LayersPlan:
    """The model's plan, made again when its blocks changed."""
    plan = _PLANS.get(model)
    if plan is None or not plan.current():
        plan = _PLANS[model] = LayersPlan(model)
    return plan


def in_plain_eager_mode(h: torch.Tensor) -> bool:
    """The conditions under which a forward may leave the Python blocks: a plain CPU tensor, no
    gradient recorded, not compiling, no autocast, no torch function or dispatch mode."""
    return (type(h) is torch.Tensor and h.is_cpu and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0)


def run(plan: LayersPlan, h: torch.Tensor, ctx, ops) -> torch.Tensor:
    """h after every block, through ops.decode_layers (ctx: the forward's ForwardContext)."""
    cache = ctx.kv_cache
    layers = cache.layers
    k_caches = [layers[i].k for i in plan.layer_idx]
    v_caches = [layers[i].v for i in plan.layer_idx]
    return ops.decode_layers(h, plan.weights(), plan.layout, plan.eps(), k_caches, v_caches, cache.seqlens,
                             ctx.cache_seqlens_max, ctx.cos, ctx.sin, ctx.position_ids, ctx.position_ids_max,
                             plan.num_heads, plan.num_kv_heads, plan.softmax_scale)


__all__ = ["LayersPlan", "plan_for", "in_plain_eager_mode", "run"]
