"""The `exaone-ext` command.

    exaone-ext generate --model DIR --prompt "Explain KV caches." [--stream] [--raw] [sampling flags]
    exaone-ext chat --model DIR [--system "You are ..."]           (/reset, /exit; works with piped input)
    exaone-ext convert --from exaone --to llama SRC DST
    exaone-ext convert --from gguf --to exaone FILE.gguf DST
    exaone-ext info DIR [--json] [--tensors]

--model (and info's PATH) takes a checkpoint directory or a GGUF file.
    exaone-ext serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch N] [--api-key KEY]
                     [--quant int8|int4] [--quant-head int8|int4|float]
    exaone-ext decontaminate --train FILE... --test FILE... --test-fields question,answer --out DIR
    exaone-ext niah --model DIR --out DIR [--lengths 1024,4096] [--depths 0,50,100] [--languages en,ko]
                    [--task code|secret-colour|TASK.json] [--filler LANG=FILE]

Each subcommand is a thin layer over exaone_ext.model, exaone_ext.tokenizer and
exaone_ext.generation. A user error prints one line on stderr and exits with status 1
(EXAONE_EXT_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
EXIT_USER_ERROR = 1
DEFAULT_MAX_NEW_TOKENS = 512


class UserError(Exception):
    """A problem with what the user asked for, reported in one line."""


# ---------------------------------------------------------------------------- arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="checkpoint directory (Hugging Face layout) or GGUF file")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="weight dtype (default auto: as stored on CPU, bfloat16 on GPU)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a loading progress bar (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--stats", action="store_true", help="print prefill / decode tokens per second on stderr")
    _add_runtime_args(p)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """How a loaded model runs: shared by generate / chat / niah (_add_model_args) and serve."""
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="quantize the block projections after loading (int8 per channel, int4 in groups of 128; "
                        "the head in int8)")
    p.add_argument("--quant-head", default=None, choices=["int8", "int4", "float"],
                   help="the head's format with --quant (default int8; float keeps it); without --quant, int8 / int4 "
                        "quantizes the float head of a quantized checkpoint (AWQ, GGUF)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, launch every decode step op by op (default: replayed as CUDA graphs)")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false",
                   help="on the CPU, hand freed memory back to the system at once (default: the process keeps it "
                        "for reuse, so large tensors do not page-fault in again every prefill)")


def _keep_memory_on_cpu(args, device) -> None:
    if device.type == "cpu" and args.keep_freed_memory:
        from .memory import keep_freed_memory
        keep_freed_memory()


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the checkpoint's generation_config.json, else greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help=f"default {DEFAULT_MAX_NEW_TOKENS}")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="do_sample", action="store_false", default=None, help="argmax decoding")
    mode.add_argument("--sample", dest="do_sample", action="store_true",
                      help="sample (implied by --temperature/--top-k/--top-p/--min-p)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    g.add_argument("--min-p", type=float, default=None, help="0.0 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1.0 = off")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable); [|endofturn|] always stops")
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exaone-ext", description="EXAONE 3.5 models: generate, chat, "
                                     "convert and inspect checkpoints.")
    parser.add_argument("--version", action="store_true", help="print the version and build information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="continue one prompt", description="Generate a reply to one prompt.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=True,
                     help="wrap the prompt in EXAONE's chat format as a user turn (default)")
    fmt.add_argument("--raw", dest="chat", action="store_false", help="use the prompt text as is")
    p.add_argument("--system", default=None, help="system prompt (chat format only)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_sampling_args(p)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with the model. Commands: /reset (forget the conversation), /exit. "
                                   "Reads one user turn per line; works with piped input.")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(p)

    p = sub.add_parser("convert", help="rewrite a checkpoint with EXAONE or Llama tensor names, or a GGUF file "
                                       "as a checkpoint",
                       description="Convert a checkpoint between EXAONE and Llama naming (bit-exact tensors; "
                                   "tokenizer and other files are copied), or a GGUF file (--from gguf) into a "
                                   "checkpoint directory with its tokenizer (Q4_0 projections as int4, other "
                                   "tensors dense).")
    p.add_argument("--from", dest="src_naming", required=True, choices=["exaone", "llama", "gguf"])
    p.add_argument("--to", dest="dst_naming", required=True, choices=["exaone", "llama"])
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 2GiB, 500MB (default 5GB)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="--from gguf: dtype of the dense weights (default auto: the token embedding's type, "
                        "bfloat16 when it is quantized)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")

    p = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (int8 or int4 weights)",
                       description="Quantize every block projection and the head of a checkpoint (round to "
                                   "nearest: int8 per output channel, or int4 in groups with zero points) and save "
                                   "it with its tokenizer; load it like any checkpoint.")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4])
    p.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale and zero point (default 128)")
    p.add_argument("--head", default="int8", choices=["int8", "int4", "float"],
                   help="the output head's format (default int8; float keeps it as stored; in a tied model the "
                        "token lookup then reads the quantized head's rows)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")

    p = sub.add_parser("info", help="shapes, parameter count, dtypes and memory of a checkpoint",
                       description="Summarise a checkpoint directory or GGUF file from its headers (no weights "
                                   "are read).")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the full summary as JSON")
    p.add_argument("--tensors", action="store_true", help="list every tensor")

    p = sub.add_parser("train", help="pre-train, SFT, DPO or SimPO from a TOML recipe",
                       description="Train with a recipe (see README, Train). Many processes: "
                                   "torchrun --nproc-per-node N -m exaone_ext.cli train ...")
    p.add_argument("objective", choices=["pretrain", "sft", "dpo", "simpo"])
    p.add_argument("--config", required=True, metavar="FILE", help="the recipe (TOML)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve the model over HTTP: /v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /metrics (needs the 'serve' extra: fastapi, uvicorn).")
    p.add_argument("--model", required=True, metavar="PATH",
                   help="checkpoint directory (Hugging Face layout) or GGUF file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="weight dtype (default auto: as stored on CPU, bfloat16 on GPU)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="sequences decoded together (default 8)")
    p.add_argument("--max-waiting", type=int, default=None, metavar="N",
                   help="requests queued beyond the batch before 503 (default 4 x --max-batch)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="KV-cache length per row (default: the model's context)")
    p.add_argument("--api-key", default=os.environ.get("EXAONE_EXT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $EXAONE_EXT_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: DIR's name)")
    _add_runtime_args(p)
    p.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                   help="prompt tokens per pass (default 8192): a longer prompt is prefilled N tokens per decode "
                        "step, so running requests keep streaming while it fills")
    p = sub.add_parser("decontaminate", help="remove training examples that overlap benchmark test sets",
                       description="Substring-overlap decontamination: windows of WINDOW alphanumeric characters "
                                   "(lower-cased, Unicode-aware) of the test examples form a pool; a training "
                                   "example with a window in it is removed. Writes the clean training files, "
                                   "removed.jsonl and report.json into --out.")
    p.add_argument("--train", nargs="+", required=True, metavar="FILE",
                   help="training files: JSONL (.jsonl/.json/.ndjson) or text")
    p.add_argument("--train-field", default="text", help="JSONL field holding a training example (default text)")
    p.add_argument("--train-format", default="auto", choices=["auto", "jsonl", "text"])
    p.add_argument("--text-unit", default="line", choices=["line", "paragraph"],
                   help="text files: one example per line (default) or per blank-line separated paragraph")
    p.add_argument("--test", nargs="+", required=True, metavar="FILE",
                   help="benchmark test sets, JSONL; NAME=FILE names the benchmark (default: the file stem)")
    p.add_argument("--test-fields", default="text", metavar="A,B",
                   help="comma-separated JSONL fields whose text counts, joined per example (default text)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--mode", default="sampled", choices=["sampled", "exhaustive"],
                   help="check SAMPLES windows per example (default) or every window")
    p.add_argument("--window", type=int, default=50, help="window length in normalised characters (default 50)")
    p.add_argument("--samples", type=int, default=10, help="windows per training example in sampled mode (default 10)")
    p.add_argument("--threads", type=int, default=None, help="default: the CPUs this process may use")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("niah", help="needle-in-a-haystack long-context evaluation",
                       description="Plants a needle at each depth of haystacks of each context length and asks "
                                   "for it (the default task: a 7-digit code in English and Korean filler, asked "
                                   "through the chat format), scoring exact matches. Results are saved after every "
                                   "cell (results.csv/json in --out; a rerun resumes), and drawn to heatmap.png.")
    _add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (results, heat map)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", metavar="N,N",
                   help="context lengths in tokens: prompt + answer budget (default 1K..32K; 4K or 4k allowed)")
    p.add_argument("--depths", default="0,10,20,30,40,50,60,70,80,90,100", metavar="P,P",
                   help="needle depths in percent of the haystack")
    p.add_argument("--languages", default=None, help="some of the task's languages (default: all; en,ko)")
    p.add_argument("--task", default="code", metavar="NAME|FILE.json",
                   help="what is planted and asked: code (default: a 7-digit vault code, chat format), "
                        "secret-colour (the demo model's raw-text task), or a JSON file of NiahTask fields")
    p.add_argument("--filler", action="append", default=[], metavar="LANG=FILE",
                   help="filler sentences for LANG from a UTF-8 text file (repeat for each language; "
                        "replaces the task's filler)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer budget (default 32)")
    p.add_argument("--prefill-chunk-size", type=int, default=2048, help="prefill this many tokens at a time")
    p.add_argument("--seed", type=int, default=0, help="filler text and needles")
    return parser


# ---------------------------------------------------------------------------- helpers
def _progress_enabled(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def _resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device: {name!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available in this torch build or on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: {name!r} is not supported (expected cpu, cuda or cuda:N)")
    return device


def _cpu():
    import torch
    return torch.device("cpu")


def _resolve_dtype(name: str, device):
    import torch

    resolved = DTYPES[name]
    if resolved is None:
        return torch.bfloat16 if device.type == "cuda" else None  # None: as stored in the files
    return getattr(torch, resolved)


def load(args):
    """(model, tokenizer, base GenerationConfig) from --model / --device / --dtype / --progress."""
    import time

    from .generation import GenerationConfig
    from .model import ExaoneForCausalLM
    from .tokenizer import ExaoneTokenizer

    path = args.model
    _check_model_path(path)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    _keep_memory_on_cpu(args, device)
    tokenizer = ExaoneTokenizer.from_pretrained(path)
    start = time.perf_counter()
    model = ExaoneForCausalLM.from_pretrained(path, dtype=dtype, device=device,
                                              progress=_progress_enabled(args.progress))
    if args.stats:
        print(f"[loaded {model.num_parameters:,} parameters ({next(model.parameters()).dtype}) on {device} in "
              f"{time.perf_counter() - start:.2f}s]", file=sys.stderr)
    if getattr(args, "quant", None) or getattr(args, "quant_head", None):
        from .model.quant import quantize_on_load
        try:
            quantize_on_load(model, args.quant, args.quant_head, "--quant")
        except ValueError as e:
            raise UserError(f"{'--quant' if args.quant else '--quant-head'}: {e}") from None
    base = GenerationConfig.from_pretrained(path, defaults={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS})
    return model, tokenizer, base


def _check_model_path(path: str) -> None:
    """A checkpoint directory or a GGUF file (whose reader says what is wrong with a missing or
    damaged one)."""
    from .model.gguf import GGUF_MAGIC, is_gguf_path

    if os.path.isdir(path) or is_gguf_path(path):
        return
    if os.path.isfile(path):
        raise UserError(f"--model: {path!r} is a file but not a GGUF file (it does not start with {GGUF_MAGIC!r}); "
                        f"expected a checkpoint directory or a GGUF file")
    raise UserError(f"--model: {path!r} is not a directory (a checkpoint) or a GGUF file")


def generation_config(args, base):
    """The checkpoint's defaults overridden by the flags that were given."""
    changes = {}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.stop:
        changes["stop_strings"] = list(args.stop)
    if not getattr(args, "cuda_graphs", True):
        changes["cuda_graphs"] = False
    if args.do_sample is not None:
        changes["do_sample"] = args.do_sample
    elif any(k in changes for k in ("temperature", "top_k", "top_p", "min_p")):
        changes["do_sample"] = True
    try:
        return base.replace(**changes)
    except (ValueError, TypeError) as e:
        flag = str(e).split(":")[0].replace("GenerationConfig.", "--").replace("_", "-")
        raise UserError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None


def _print_stats(result) -> None:
    print(f"[{result.prompt_tokens} prompt + {len(result.tokens)} new tokens, stop: {result.stop_reason}; "
          f"{result.stats}]", file=sys.stderr)


# ---------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from .generation import generate, stream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system is not None and not args.chat:
        raise UserError("--system: only applies to the chat format (drop --raw)")
    model, tokenizer, base = load(args)
    config = generation_config(args, base)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        prompt = messages + [{"role": "user", "content": prompt}]
    out = sys.stdout
    if args.stream:
        s = stream(model, tokenizer, prompt, config)
        for piece in s:
            out.write(piece)
            out.flush()
        result = s.result
        out.write("\n")
    else:
        result = generate(model, tokenizer, prompt, config)
        out.write(result.text + "\n")
    out.flush()
    if args.stats:
        _print_stats(result)
    return 0


def _read_turns(interactive: bool):
    """User lines from stdin: with a prompt on a terminal, plain lines when piped."""
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
        yield line


def cmd_chat(args) -> int:
    from .generation import stream, trim_history

    model, tokenizer, base = load(args)
    config = generation_config(args, base)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset forgets the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    out = sys.stdout
    for line in _read_turns(interactive):
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            print("[conversation reset]", file=sys.stderr)
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            print("/reset: forget the conversation (keeps the system prompt); /exit: quit", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        # the oldest turns give way so that the prompt leaves room for a full reply
        context = model.config.max_position_embeddings
        history, dropped = trim_history(tokenizer, history, max(1, context - config.max_new_tokens))
        if dropped:
            print(f"[dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to stay within the "
                  f"{context}-token context]", file=sys.stderr)
        try:
            s = stream(model, tokenizer, history, config)
            for piece in s:
                out.write(piece)
                out.flush()
        except ValueError as e:  # e.g. one message longer than the whole context: keep chatting
            history.pop()
            print(f"exaone-ext: {e} (use /reset to start over)", file=sys.stderr)
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": s.result.text})
        if args.stats:
            _print_stats(s.result)
    return 0


def cmd_convert(args) -> int:
    from .model import checkpoint_info, convert_checkpoint
    from .model.gguf import convert_gguf

    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UserError("convert: SRC and DST must be different directories")
    if os.path.exists(os.path.join(args.dst, "config.json")):
        raise UserError(f"convert: {args.dst!r} already holds a checkpoint (remove it or choose another DST)")
    if args.src_naming == "gguf":
        if os.path.isdir(args.src):
            raise UserError(f"convert: --from gguf needs a GGUF file as SRC, {args.src!r} is a directory")
        convert_gguf(args.src, args.dst, naming=args.dst_naming, dtype=_resolve_dtype(args.dtype, _cpu()),
                     max_shard_size=args.max_shard_size, progress=_progress_enabled(args.progress))
        print(f"wrote {args.dst} ({args.dst_naming} names, from GGUF)", file=sys.stderr)
        return 0
    if args.dtype != "auto":
        raise UserError("convert: --dtype applies to --from gguf only (a checkpoint is converted bit for bit)")
    naming = checkpoint_info(args.src)["naming"]
    if naming != args.src_naming:
        raise UserError(f"convert: {args.src!r} has {naming} tensor names, not {args.src_naming} (--from)")
    convert_checkpoint(args.src, args.dst, to=args.dst_naming, max_shard_size=args.max_shard_size,
                       progress=_progress_enabled(args.progress))
    print(f"wrote {args.dst} ({args.dst_naming} names)", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    import shutil

    from .model import ExaoneForCausalLM
    from .model.checkpoint import _is_checkpoint_file

    if not os.path.isdir(args.src):
        raise UserError(f"quantize: SRC {args.src!r} is not a directory")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UserError("quantize: SRC and DST must be different directories")
    if os.path.exists(args.dst):
        raise UserError(f"quantize: {args.dst!r} already exists (remove it or choose another DST)")
    model = ExaoneForCausalLM.from_pretrained(args.src, progress=_progress_enabled(args.progress))
    try:
        model.quantize("int8" if args.bits == 8 else "int4", group_size=args.group_size,
                       head=None if args.head == "float" else args.head)
    except ValueError as e:
        raise UserError(f"quantize: {e}") from None
    # written beside DST with the tokenizer and other files, then renamed: DST appears whole or not at all
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.dst)), f".{os.path.basename(args.dst)}.quantize-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, progress=_progress_enabled(args.progress))
    for name in os.listdir(args.src):
        src = os.path.join(args.src, name)
        if os.path.isfile(src) and not _is_checkpoint_file(name) and not os.path.exists(os.path.join(tmp, name)):
            shutil.copy2(src, os.path.join(tmp, name))
    os.rename(tmp, args.dst)
    print(f"wrote {args.dst} (int{args.bits}, head {args.head})", file=sys.stderr)
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _describe_quant(qc: dict, tied: bool = False) -> str:
    """config.json's quantization_config in words (tied: the config ties the embedding to the head)."""
    method, bits, group = qc.get("quant_method"), qc.get("bits"), qc.get("group_size", qc.get("q_group_size"))
    if method == "awq":
        what = f"AWQ int4, groups of {group} (GEMM layout; int4 with zero points once loaded)"
    elif bits == 8:
        what = "int8 block projections, one scale per output channel"
    else:
        what = f"int{bits} block projections, groups of {group} inputs with zero points"
    kept = qc.get("modules_to_not_convert")
    if method == "exaone_ext" and qc.get("head_bits"):
        head = f"head int{qc['head_bits']}" + (" (the tied embedding reads its rows)" if tied else
                                                ", embedding as stored")
    else:
        head = "embedding and head as stored"
    return what + (f"; {len(kept)} projection(s) kept unquantized" if kept else "") + "; " + head


def cmd_info(args) -> int:
    from .model import checkpoint_info
    from .model.gguf import gguf_info

    info = gguf_info(args.path) if os.path.isfile(args.path) or args.path.lower().endswith(".gguf") \
        else checkpoint_info(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    layers = c.get("num_layers", c.get("num_hidden_layers"))
    lines = [
        f"checkpoint   {info['path']}  ({info['naming']} tensor names, {len(info['files'])} file(s), "
        f"{_gib(info['file_bytes'])})",
        f"shape        {layers} layers, hidden {c['hidden_size']}, heads {c['num_attention_heads']} "
        f"(kv {c['num_key_value_heads']}), head_dim {c['head_dim']}, mlp {c['intermediate_size']}, "
        f"vocab {c['vocab_size']}, context {c['max_position_embeddings']}, "
        f"{'tied' if info['tied_word_embeddings'] else 'untied'} head",
        f"parameters   {info['num_parameters']:,}",
        *([f"quantized    {_describe_quant(info['quantization'], info['tied_word_embeddings'])}"]
          if info.get("quantization") else []),
        "dtypes       " + ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items()),
        f"weights      {_gib(info['weight_bytes'])} in memory as stored; "
        f"{_gib(info['num_parameters'] * 2)} in bfloat16",
        f"kv cache     {info['kv_cache_bytes_per_token'] / 1024:.1f} KiB per token ({info['kv_cache_dtype']}); "
        f"{_gib(info['kv_cache_bytes'])} for one full {c['max_position_embeddings']}-token context",
        f"memory       about {_gib(info['weight_bytes'] + info['kv_cache_bytes'])} to run one sequence at full "
        f"context as stored (weights + kv cache)",
    ]
    print("\n".join(lines))
    tensors = info["tensors"]
    if not args.tensors:  # one layer stands for all
        tensors = [t for t in tensors if re.search(r"\.(\d+)\.", t["name"]) is None
                   or re.search(r"\.(\d+)\.", t["name"]).group(1) == "0"]
        print(f"tensors      (layer 0 shown; every layer alike; --tensors lists all {len(info['tensors'])})")
    else:
        print("tensors")
    width = max((len(t["name"]) for t in tensors), default=0)
    for t in tensors:
        print(f"  {t['name']:<{width}}  {str(t['shape']):<16} {t['dtype']:<9} {t['file']}")
    return 0


def cmd_train(args) -> int:
    import torch.distributed as dist

    from .training import Trainer, load_config
    final = Trainer(load_config(args.config), args.objective).train(resume=args.resume)
    if dist.is_available() and dist.is_initialized():  # under torchrun: the Trainer joined the group
        # every rank past its last collective, then the group torn down while the interpreter is whole
        # (left to exit, the backend's threads can abort the process: "terminate called without an
        # active exception"); not on an error, where another rank may never reach the barrier
        dist.barrier()
        dist.destroy_process_group()
    print(final)
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .serve import create_app
    except ImportError as e:
        raise UserError(f"serve: needs the 'serve' extra ({e.name} is missing): pip install 'exaone-ext[serve]'") from None
    for flag, value in (("--max-batch", args.max_batch), ("--port", args.port),
                        ("--prefill-chunk-size", 1 if args.prefill_chunk_size is None else args.prefill_chunk_size)):
        if value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise UserError(f"--max-waiting: expected an integer >= 0, got {args.max_waiting}")
    _check_model_path(args.model)
    device = _resolve_device(args.device)
    _keep_memory_on_cpu(args, device)
    app = create_app(args.model, model_name=args.served_model_name, api_key=args.api_key or None,
                     max_batch=args.max_batch, max_waiting=args.max_waiting, device=device,
                     dtype=_resolve_dtype(args.dtype, device), max_seq_len=args.max_seq_len, quant=args.quant,
                     cuda_graphs=args.cuda_graphs, prefill_chunk_size=args.prefill_chunk_size,
                     quant_head=args.quant_head)
    print(f"serving {app.state.model_name!r}{' (' + args.quant + ')' if args.quant else ''} on http://{args.host}:{args.port}/v1 "
          f"({args.max_batch} rows{', API key required' if args.api_key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _csv_list(text: str, flag: str, convert):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag}: expected a comma-separated list, got {text!r}")
    try:
        return [convert(t) for t in items]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of {convert.__name__} values") from None


def cmd_decontaminate(args) -> int:
    from .data.decontaminate import decontaminate, format_report

    tests = {}
    for item in args.test:
        name, _, path = item.rpartition("=") if "=" in item and not os.path.exists(item) else ("", "", item)
        name = name or os.path.splitext(os.path.basename(path))[0]
        if name in tests:
            raise UserError(f"--test: two test sets named {name!r} (use NAME=FILE)")
        tests[name] = path
    report = decontaminate(args.train, tests, args.out, test_fields=_csv_list(args.test_fields, "--test-fields", str),
                           train_field=args.train_field, train_format=args.train_format, text_unit=args.text_unit,
                           window=args.window, samples=args.samples, mode=args.mode, threads=args.threads,
                           progress=_progress_enabled(args.progress))
    print(format_report(report))
    print(f"wrote {args.out}/ (clean files, removed.jsonl, report.json)", file=sys.stderr)
    return 0


def _tokens(text: str) -> int:
    t = text.lower()
    return int(t[:-1]) * 1024 if t.endswith("k") else int(t)


_tokens.__name__ = "token count"


def cmd_niah(args) -> int:
    from .eval.niah import NiahConfig, get_task, run_niah, summary_table

    task = get_task(args.task)
    languages = None if args.languages is None else _csv_list(args.languages, "--languages", str)
    if args.filler:
        files = {}
        for item in args.filler:
            lang, sep, path = item.partition("=")
            if not sep or not lang or not path:
                raise ValueError(f"--filler: expected LANG=FILE, got {item!r}")
            files[lang] = path
        missing = [lang for lang in (languages or task.languages) if lang not in files]
        if missing:
            raise ValueError(f"--filler: no file for {', '.join(missing)}; give one per language evaluated "
                             f"(task {task.name!r} has {', '.join(task.languages)}; --languages chooses)")
        task = task.with_filler_files(files)
    config = NiahConfig(lengths=_csv_list(args.lengths, "--lengths", _tokens),
                        depths=_csv_list(args.depths, "--depths", float),
                        languages=languages, max_new_tokens=args.max_new_tokens,
                        prefill_chunk_size=args.prefill_chunk_size, seed=args.seed, task=task)
    model, tokenizer, _ = load(args)
    cells = run_niah(model, tokenizer, config, args.out, progress=_progress_enabled(args.progress),
                     model_name=os.path.basename(os.path.normpath(args.model)))
    print(summary_table(cells))
    print(f"wrote {args.out}/results.csv, results.json, heatmap.png", file=sys.stderr)
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "info": cmd_info,
            "train": cmd_train, "serve": cmd_serve, "decontaminate": cmd_decontaminate, "niah": cmd_niah,
            "quantize": cmd_quantize}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import build_info
        print(json.dumps(build_info()))
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # noqa: BLE001  (one line for the user; the traceback on request)
        if os.environ.get("EXAONE_EXT_DEBUG"):
            raise
        message = str(e) or type(e).__name__
        if not isinstance(e, (UserError, ValueError, TypeError, OSError, KeyError)):
            message = f"{type(e).__name__}: {message}"
        print(f"exaone-ext: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
