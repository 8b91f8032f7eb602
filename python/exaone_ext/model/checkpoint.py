"""Hugging Face-layout checkpoints: load (memory-mapped, meta-device model filled tensor by tensor),
atomic sharded save, conversion between EXAONE and Llama tensor names, and a header-only summary.

A checkpoint directory holds config.json, optionally generation_config.json, and either
model.safetensors or shards model-0000K-of-0000N.safetensors with model.safetensors.index.json."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, ExaoneConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unexpected or misshapen tensors, a corrupt file."""


# ---- tensor naming: EXAONE <-> Llama ----
_GLOBAL_NAMES = {  # EXAONE name -> Llama name
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # per-layer suffix, EXAONE -> Llama
    "ln_1.weight": "input_layernorm.weight",
    "attn.attention.q_proj.weight": "self_attn.q_proj.weight",
    "attn.attention.k_proj.weight": "self_attn.k_proj.weight",
    "attn.attention.v_proj.weight": "self_attn.v_proj.weight",
    "attn.attention.out_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_fc_0.weight": "mlp.gate_proj.weight",
    "mlp.c_fc_1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES_REV = {v: k for k, v in _GLOBAL_NAMES.items()}
_LAYER_NAMES_REV = {v: k for k, v in _LAYER_NAMES.items()}
_EXAONE_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_LLAMA_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# buffers some older exports saved; they are recomputed, never loaded
_IGNORED = re.compile(r".*\.inv_freq$")


def rename_tensor(name: str, whole: dict[str, str], layer: re.Pattern, parts: dict[str, str],
                  layer_format: str) -> str | None:
    """name through one naming scheme's tables: `whole` for names outside the layers, else `layer`
    (groups: layer index, the part after it) with the part mapped by `parts` into
    layer_format.format(index, mapped part); None when neither applies."""
    if name in whole:
        return whole[name]
    m = layer.fullmatch(name)
    if m and m.group(2) in parts:
        return layer_format.format(m.group(1), parts[m.group(2)])
    return None


def exaone_to_llama_name(name: str) -> str:
    """'transformer.h.3.mlp.c_fc_0.weight' -> 'model.layers.3.mlp.gate_proj.weight'. KeyError if unknown."""
    out = rename_tensor(name, _GLOBAL_NAMES, _EXAONE_LAYER, _LAYER_NAMES, "model.layers.{}.{}")
    if out is not None:
        return out
    base, suffix = _quantized_base(name)
    if base is not None:
        return exaone_to_llama_name(base).removesuffix(".weight") + suffix
    raise KeyError(f"not an EXAONE tensor name: {name!r}")


def llama_to_exaone_name(name: str) -> str:
    """'model.layers.3.self_attn.o_proj.weight' -> 'transformer.h.3.attn.attention.out_proj.weight'."""
    out = rename_tensor(name, _GLOBAL_NAMES_REV, _LLAMA_LAYER, _LAYER_NAMES_REV, "transformer.h.{}.{}")
    if out is not None:
        return out
    base, suffix = _quantized_base(name)
    if base is not None:
        return llama_to_exaone_name(base).removesuffix(".weight") + suffix
    raise KeyError(f"not a Llama tensor name: {name!r}")


# a quantized projection stores these in place of its weight (model/quant.py, AWQ checkpoints)
_QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros")


def _quantized_base(name: str) -> tuple[str | None, str]:
    """'x.q_proj.qweight' -> ('x.q_proj.weight', '.qweight'); (None, '') for other names."""
    for suffix in _QUANT_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix) + ".weight", suffix
    return None, ""


def detect_naming(names: Iterable[str], default: str = "exaone") -> str:
    """'exaone' or 'llama' from the tensor names; CheckpointError when they mix the two."""
    names = list(names)
    exaone = any(n.startswith("transformer.") for n in names)
    llama = any(n.startswith("model.") for n in names)
    if exaone and llama:
        raise CheckpointError("checkpoint mixes EXAONE ('transformer.*') and Llama ('model.*') tensor names")
    return "exaone" if exaone else "llama" if llama else default


_TO_EXAONE = {"exaone": lambda n: n, "llama": llama_to_exaone_name}
_FROM_EXAONE = {"exaone": lambda n: n, "llama": exaone_to_llama_name}

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---- reading ----
@dataclass
class _Entry:
    file: str          # path of the safetensors file holding the tensor
    key: str           # name as stored in the file
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _open(file: str, device: str = "cpu"):
    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file, corrupt or truncated ({e})") from None


def _weight_files(path: str) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory and the index's weight map (None without one)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError(f"'weight_map' must map tensor names to file names, got {weight_map!r:.80}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{index} lists shard {name!r}, which is missing from {path}")
        return [os.path.join(path, f) for f in files], weight_map
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _scan(path: str) -> tuple[ExaoneConfig, str, dict[str, _Entry]]:
    """Read config.json and every safetensors header (no tensor data). Returns the config, the naming
    and {EXAONE name: entry}; raises CheckpointError for unknown, duplicated or misindexed tensors."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = ExaoneConfig.from_pretrained(path, allow_llama=True)
    files, weight_map = _weight_files(path)
    stored: list[_Entry] = []
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if _IGNORED.fullmatch(key):
                    continue
                if weight_map is not None and weight_map.get(key) != os.path.basename(file):
                    raise CheckpointError(f"{file}: tensor {key!r} is not where {INDEX_FILE} says "
                                          f"({weight_map.get(key)!r})")
                sl = f.get_slice(key)
                dtype = _DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
                stored.append(_Entry(file, key, tuple(sl.get_shape()), dtype))
    if weight_map is not None:
        present = {e.key for e in stored}
        for key, shard in weight_map.items():
            if key not in present and not _IGNORED.fullmatch(key):
                raise CheckpointError(f"{INDEX_FILE} maps tensor {key!r} to {shard}, which does not contain it")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
        config_type = json.load(f).get("model_type")
    naming = detect_naming((e.key for e in stored), default="llama" if config_type == "llama" else "exaone")
    entries: dict[str, _Entry] = {}
    for e in stored:
        try:
            name = _TO_EXAONE[naming](e.key)
        except KeyError:
            raise CheckpointError(f"{e.file}: unexpected tensor {e.key!r} (not part of an EXAONE/Llama "
                                  f"{naming} checkpoint)") from None
        if name in entries:
            raise CheckpointError(f"{e.file}: tensor {e.key!r} also stored in {entries[name].file}")
        entries[name] = e
    return config, naming, entries


def _validate(config: ExaoneConfig, entries: dict[str, _Entry], expected: dict[str, tuple[tuple, bool]]) -> None:
    """Every expected tensor present with its shape, nothing else (a tied head may be stored).
    expected: {name: (shape, is_float)}; a float tensor must be stored in a float type, a tensor a
    module declares with another dtype (quantized weights) is taken as stored."""
    for name, (shape, is_float) in expected.items():
        if name not in entries:
            raise CheckpointError(f"missing tensor {name!r} (expected shape {list(shape)}) in the checkpoint")
        e = entries[name]
        if e.shape != tuple(shape):
            raise CheckpointError(f"{e.file}: tensor {e.key!r} has shape {list(e.shape)}, the config "
                                  f"needs {list(shape)}")
        if is_float and not e.dtype.is_floating_point:
            raise CheckpointError(f"{e.file}: tensor {e.key!r} has dtype {e.dtype}, expected a float type "
                                  f"(the model's {name!r} is a float tensor)")
    for name, e in entries.items():
        if name in expected:
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            if e.shape != (config.vocab_size, config.hidden_size):
                raise CheckpointError(f"{e.file}: tensor {e.key!r} has shape {list(e.shape)}, expected "
                                      f"{[config.vocab_size, config.hidden_size]}")
            continue
        raise CheckpointError(f"{e.file}: unexpected tensor {e.key!r} (not a parameter of this config's model: "
                              f"num_layers={config.num_layers}, tie_word_embeddings={config.tie_word_embeddings})")


def _config_shapes(config: ExaoneConfig) -> dict[str, tuple[tuple, bool]]:
    return {n: (shape, True) for n, shape in config.parameter_shapes().items()}


def _declared_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the model's modules declare (their state-dict entries); a shared tensor (the
    tied head) under its first name only."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


class _Progress:
    """progress=True: a bar on stderr; a callable: called as fn(done_bytes, total_bytes, name)."""

    def __init__(self, progress, total: int, label: str):
        self.fn = progress if callable(progress) else (self._bar if progress else None)
        self.total, self.done, self.label, self.last, self.start = total, 0, label, 0.0, time.monotonic()

    def _bar(self, done, total, name):
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self.start, 1e-9) / 1e9
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%} {done / 1e9:.2f}/{total / 1e9:.2f} GB "
                         f"{rate:.2f} GB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def update(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.fn is not None:
            self.fn(self.done, self.total, name)


def read_config(path) -> ExaoneConfig:
    """The ExaoneConfig of a checkpoint directory (EXAONE or Llama config.json)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    return ExaoneConfig.from_pretrained(path, allow_llama=True)


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor, requires_grad: bool) -> None:
    """Put `t` in place of the parameter or buffer `name` of `model` (built on the meta device)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(t, requires_grad=requires_grad)
    else:
        module._buffers[attr] = t


def load_model(model: nn.Module, path, dtype=None, device=None, progress=False):
    """Fill `model` (built by the caller from the checkpoint's config, typically on the meta
    device) with the checkpoint's tensors: every tensor its modules declare in their state dict,
    so a module that stores its weight another way (quantized, with scales) receives its own.
    Float tensors are cast to `dtype` when given; others keep the stored dtype.
    See ExaoneForCausalLM.from_pretrained."""
    path = os.fspath(path)
    config, naming, entries = _scan(path)
    declared = _declared_tensors(model)
    _validate(config, entries, {n: (tuple(t.shape), t.is_floating_point()) for n, t in declared.items()})
    device = torch.device("cpu" if device is None else device)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"from_pretrained: dtype must be a floating type, got {dtype}")
    bar = _Progress(progress, sum(entries[n].nbytes for n in declared), f"loading {os.path.basename(path)}")
    by_file: dict[str, list[str]] = {}
    for name in declared:
        by_file.setdefault(entries[name].file, []).append(name)
    open_device = str(device) if device.type in ("cpu", "cuda") else "cpu"
    for file, names in by_file.items():
        with _open(file, open_device) as f:
            for name in names:
                e = entries[name]
                try:
                    t = f.get_tensor(e.key)
                except (SafetensorError, OSError, RuntimeError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {e.key!r} ({err})") from None
                cast = dtype if dtype is not None and declared[name].is_floating_point() else t.dtype
                t = t.to(device=device, dtype=cast)
                _set_tensor(model, name, t, declared[name].requires_grad and t.is_floating_point())
                bar.update(e.nbytes, e.key)
    if config.tie_word_embeddings and "weight" in model.lm_head._parameters:  # not a quantized head
        model.lm_head.weight = model.transformer.wte.weight
        if "lm_head.weight" in entries:  # a tied checkpoint that stores its head anyway: must equal wte
            e = entries["lm_head.weight"]
            with _open(e.file) as f:
                head = f.get_tensor(e.key)
            if not torch.equal(head.to(model.lm_head.weight), model.lm_head.weight.cpu().to(head.device)):
                raise CheckpointError(f"{e.file}: config ties the embeddings but tensor {e.key!r} differs from "
                                      f"the embedding")
    if device.type == "cpu":
        model.hugepage_weights()
    model.init_rope(device)
    gen = os.path.join(path, GENERATION_CONFIG_FILE)
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            model.generation_config = json.load(f)
    model.loaded_naming = naming
    return model.eval()


# ---- writing ----
def parse_size(size: int | str) -> int:
    """5000000, '5GB' (10^9), '2GiB' (2^30), '500MB', '64KiB' -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '2GiB', got {size!r}")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if scale is None:
        raise ValueError(f"max_shard_size: unknown unit in {size!r}")
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _is_checkpoint_file(name: str) -> bool:
    return (name in (CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE)
            or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name) is not None)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(path, config_dict: dict, generation_config: dict | None,
                     tensors: list[tuple[str, int, Callable[[], torch.Tensor]]], max_shard_size="5GB",
                     extra_files: Iterable[str] = (), progress=False) -> None:
    """Write a checkpoint directory atomically. `tensors`: (name, nbytes, load) in file order; `load()`
    returns the tensor when its shard is written (so a conversion holds one shard at a time).
    `extra_files`: files copied beside the weights (tokenizer files...).

    Everything goes into a temporary directory beside `path`; it then replaces `path` by renames.
    Files already in `path` that are not part of a checkpoint (tokenizer, README, ...) are kept."""
    path = os.path.abspath(os.fspath(path))
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, int, Callable]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[1] > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    parent, base = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save target {path!r} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    bar = _Progress(progress, sum(t[1] for t in tensors), f"saving {base}")
    try:
        weight_map, total = {}, 0
        for shard, fname in zip(shards, names):
            data = {}
            for name, nbytes, load in shard:
                t = load()
                data[name] = t.detach().to("cpu").contiguous()
                weight_map[name] = fname
                total += nbytes
            save_file(data, os.path.join(tmp, fname), metadata={"format": "pt"})
            _fsync_file(os.path.join(tmp, fname))
            for name, nbytes, _ in shard:
                bar.update(nbytes, name)
            del data
        for src in extra_files:
            shutil.copy2(src, os.path.join(tmp, os.path.basename(src)))
        if generation_config is not None:
            _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE), generation_config)
        if n > 1:
            _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(os.path.join(tmp, CONFIG_FILE), config_dict)  # last: a directory without it is not loadable
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: str, path: str) -> None:
    """Move the finished temporary directory into place, keeping path's non-checkpoint files."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    for entry in os.listdir(path):
        src, dst = os.path.join(path, entry), os.path.join(tmp, entry)
        if _is_checkpoint_file(entry) or os.path.exists(dst):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                shutil.copy2(src, dst, follow_symlinks=False)
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:12]}")
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _generation_config(config: ExaoneConfig, existing: dict | None) -> dict:
    if existing is not None:
        return existing
    return {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(config, k) is not None}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_model(model, path, max_shard_size="5GB", naming="exaone", progress=False,
               extra_files: Iterable[str] = ()) -> None:
    """See ExaoneForCausalLM.save_pretrained. `extra_files` (tokenizer files...) are copied in with
    the weights, inside the same atomic write."""
    if naming not in _FROM_EXAONE:
        raise ValueError(f"save_pretrained: naming must be 'exaone' or 'llama', got {naming!r}")
    rename = _FROM_EXAONE[naming]
    params = list(_declared_tensors(model).items())  # a tied head is the embedding: stored once, as wte
    for name, p in params:
        if p.device.type == "meta":
            raise ValueError(f"save_pretrained: tensor {name!r} is on the meta device (no data to save)")
    config = model.config
    config_dict = config.to_llama_dict() if naming == "llama" else config.to_dict()
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) == 1:
        config_dict["torch_dtype"] = _dtype_name(dtypes.pop())
    tensors = [(rename(n), p.numel() * p.element_size(), (lambda p=p: p)) for n, p in params]
    write_checkpoint(path, config_dict, _generation_config(config, model.generation_config), tensors,
                     max_shard_size=max_shard_size, extra_files=extra_files, progress=progress)


def convert_checkpoint(src, dst, to: str = "llama", max_shard_size="5GB", progress=False) -> str:
    """Rewrite the checkpoint `src` into `dst` with `to` ('llama' or 'exaone') tensor names and config
    keys, one shard in memory at a time; the other files of `src` (tokenizer...) are copied.
    Returns the naming `src` had. Tensors are copied bit for bit."""
    if to not in _FROM_EXAONE:
        raise ValueError(f"convert_checkpoint: 'to' must be 'exaone' or 'llama', got {to!r}")
    src = os.fspath(src)
    if os.path.abspath(src) == os.path.abspath(os.fspath(dst)):
        raise ValueError("convert_checkpoint: src and dst must be different directories")
    config, naming, entries = _scan(src)
    _validate(config, entries, _config_shapes(config))
    rename = _FROM_EXAONE[to]
    handles: dict[str, object] = {}

    def loader(e: _Entry):
        def load():
            if e.file not in handles:
                handles.clear()  # entries are in file order: keep one file open at a time
                handles[e.file] = _open(e.file)
            return handles[e.file].get_tensor(e.key)
        return load

    order = sorted(entries.items(), key=lambda kv: (kv[1].file, _param_order(kv[0])))
    tensors = [(rename(name), e.nbytes, loader(e)) for name, e in order]
    config_dict = config.to_llama_dict() if to == "llama" else config.to_dict()
    extra = [os.path.join(src, f) for f in sorted(os.listdir(src))
             if os.path.isfile(os.path.join(src, f)) and not _is_checkpoint_file(f)]
    gen_file = os.path.join(src, GENERATION_CONFIG_FILE)
    gen = None
    if os.path.isfile(gen_file):
        with open(gen_file, encoding="utf-8") as f:
            gen = json.load(f)
    write_checkpoint(dst, config_dict, gen, tensors, max_shard_size=max_shard_size, extra_files=extra,
                     progress=progress)
    return naming


def _param_order(name: str) -> tuple:
    base, suffix = _quantized_base(name)   # a quantized projection's tensors in its weight's place
    m = _EXAONE_LAYER.fullmatch(base or name)
    if m:
        return (1, int(m.group(1)), list(_LAYER_NAMES).index(m.group(2)), _QUANT_SUFFIXES.index(suffix) if suffix else 0)
    return (0 if name == "transformer.wte.weight" else 2, 0, name, 0)


def checkpoint_info(path) -> dict:
    """What a checkpoint holds, from its config and safetensors headers (no tensor data read):
    naming, config, quantization (config.json's quantization_config, or None), tensors (name, shape,
    dtype, file), parameter count, dtypes, bytes of the weights and of a one-row KV cache at full
    context (in the weights' main float dtype)."""
    from .modeling import ExaoneForCausalLM
    from .quant import prepare_for_checkpoint
    path = os.fspath(path)
    config, naming, entries = _scan(path)
    # the tensors the model declares for this config, quantized projections included
    with torch.device("meta"):
        model = ExaoneForCausalLM(config)
    prepare_for_checkpoint(model, None)
    _validate(config, entries, {n: (tuple(t.shape), t.is_floating_point())
                                for n, t in _declared_tensors(model).items()})
    counted = {n: e for n, e in entries.items() if not (n == "lm_head.weight" and config.tie_word_embeddings)}
    dtypes: dict[str, int] = {}
    for e in counted.values():
        numel = e.nbytes // e.dtype.itemsize
        dtypes[_dtype_name(e.dtype)] = dtypes.get(_dtype_name(e.dtype), 0) + numel
    floats = {d: n for d, n in dtypes.items() if getattr(torch, d).is_floating_point}
    main = max(floats or dtypes, key=(floats or dtypes).get)   # of the float tensors (the KV cache's dtype)
    elem = getattr(torch, main).itemsize
    quant = config.extra.get("quantization_config")
    files, _ = _weight_files(path)
    return {
        "path": os.path.abspath(path),
        "naming": naming,
        "config": config.to_dict(),
        # logical parameters (a quantized projection counts in x out, not its stored bytes)
        "num_parameters": config.num_parameters if quant else sum(e.nbytes // e.dtype.itemsize for e in counted.values()),
        "quantization": quant or None,
        "dtypes": dtypes,
        "files": [os.path.basename(f) for f in files],
        "file_bytes": sum(os.path.getsize(f) for f in files),
        "weight_bytes": sum(e.nbytes for e in counted.values()),
        "kv_cache_dtype": main,
        "kv_cache_bytes_per_token": config.kv_cache_bytes(1, 1, elem),
        "kv_cache_bytes": config.kv_cache_bytes(1, config.max_position_embeddings, elem),
        "tied_word_embeddings": config.tie_word_embeddings,
        "tensors": [{"name": e.key, "shape": list(e.shape), "dtype": _dtype_name(e.dtype),
                     "file": os.path.basename(e.file)} for _, e in sorted(entries.items(),
                                                                         key=lambda kv: _param_order(kv[0]))],
    }


__all__ = [
    "CheckpointError", "ConfigError", "checkpoint_info", "convert_checkpoint", "detect_naming",
    "exaone_to_llama_name", "llama_to_exaone_name", "load_model", "parse_size", "read_config", "save_model", "write_checkpoint",
]
