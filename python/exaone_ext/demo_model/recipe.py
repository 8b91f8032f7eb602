"""The demo model's recipe: the EXAONE 3.5 training recipe at toy scale, run by the package's trainer.

    python -m exaone_ext.demo_model.recipe --out DIR        # (make train-demo) about 15 minutes on 2 cores

1. Data: the synthetic world (world.py) written as JSONL: stage-1 and stage-2 pre-training
   documents, SFT conversations, DPO pairs.
2. A byte-level BPE tokenizer trained on that corpus with `tokenizers` (EXAONE's special tokens and
   chat template), and a freshly initialised tiny EXAONE model (4 layers, hidden 256, GQA 4:2).
3. Stage 1 pre-training at 256 tokens; stage 2 extends the context to 1024 (RoPE base raised,
   documents kept whole) with a replay of stage-1 data; SFT; then DPO against the SFT policy.
   Each stage is a TOML recipe in recipes/ run by exaone_ext.training.Trainer.
4. After every stage the model is measured (evaluate.py) and the table is printed and saved as
   recipe_results.json beside the final weights (stored in bfloat16).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..tokenizer import format_chat
from .world import World, write_jsonl

__all__ = ["RECIPES", "DEFAULT_SIZES", "prepare", "run", "main"]

RECIPES = Path(__file__).resolve().parent / "recipes"
STAGES = ("stage1", "stage2", "sft", "dpo")
MODEL = {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "intermediate_size": 512}
STAGE1_CONTEXT, STAGE1_THETA = 256, 10_000.0
STAGE2_CONTEXT, STAGE2_THETA = 1024, 40_000.0
VOCAB = 2048
# Documents / examples written for each stage (the trainer cycles through a file when it ends).
DEFAULT_SIZES = {"stage1": 24_000, "stage2": 3_000, "sft": 6_000}


def _say(msg: str) -> None:
    print(msg, flush=True)


def write_data(work: Path, world: World, sizes: dict) -> None:
    write_jsonl(work / "stage1.jsonl",
                [{"text": t} for t in world.pretraining_documents(sizes["stage1"], seed=1, secret_sentences=(2, 16))])
    write_jsonl(work / "stage2.jsonl",
                [{"text": t} for t in world.pretraining_documents(sizes["stage2"], seed=2, secret_sentences=(30, 80))])
    write_jsonl(work / "sft.jsonl", world.sft_conversations(sizes["sft"], seed=3, wrong_language=0.6))
    # DPO on the SFT people (whose Korean questions SFT answered in English) and the preference
    # people; the held-out people's pairs measure it
    write_jsonl(work / "dpo.jsonl", world.preference_pairs(world.sft_people + world.pref_people))


def write_init_model(path: Path, corpus: list[str], seed: int) -> Path:
    """Tokenizer trained on `corpus` and a freshly initialised model, as a checkpoint directory."""
    from ..model import ExaoneConfig, ExaoneForCausalLM
    from ..testing import tiny_config_dict, write_tiny_tokenizer
    from ..tokenizer import ExaoneTokenizer

    write_tiny_tokenizer(path, VOCAB, corpus=corpus)
    tok = ExaoneTokenizer.from_pretrained(path)
    config = ExaoneConfig.from_dict(tiny_config_dict(
        tok.vocab_size, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, **MODEL,
        max_position_embeddings=STAGE1_CONTEXT, rope_theta=STAGE1_THETA, rope_scaling=None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExaoneForCausalLM(config)
        model.reset_parameters(std=0.02)
    model.save_pretrained(path)
    return path


def extend_context(src: Path, dst: Path, max_positions: int, rope_theta: float) -> Path:
    """A copy of checkpoint `src` whose config allows `max_positions` with RoPE base `rope_theta`
    (the start of stage 2)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("trainer_state*", "optimizer*"))
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(max_position_embeddings=max_positions, rope_theta=rope_theta)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def prepare(work: Path, seed: int = 0, sizes: dict | None = None, steps: dict | None = None) -> World:
    """Writes the data, the initial checkpoint (work/init) and the stage recipes into `work`.
    `steps` overrides the recipes' [train] steps per stage (the tests run a few steps of each)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    world = World(seed)
    work.mkdir(parents=True, exist_ok=True)
    write_data(work, world, sizes)
    with open(work / "stage1.jsonl", encoding="utf-8") as f:
        corpus = [json.loads(line)["text"] for _, line in zip(range(4000), f)]
    with open(work / "sft.jsonl", encoding="utf-8") as f:
        chats = [json.loads(line) for _, line in zip(range(1000), f)]
    corpus += [format_chat(c["messages"], add_generation_prompt=False) for c in chats]
    write_init_model(work / "init", corpus, seed)
    for stage in STAGES:
        text = (RECIPES / f"{stage}.toml").read_text()
        if steps and stage in steps:
            text = re.sub(r"(?m)^steps = \d+", f"steps = {steps[stage]}", text)
            text = re.sub(r"(?m)^log_every = \d+", "log_every = 1", text)   # a short run logs every step
        (work / f"{stage}.toml").write_text(text)
    return world


def run(work: Path, out: Path | None, seed: int = 0, sizes: dict | None = None, steps: dict | None = None,
        evaluate: bool = True, progress: bool = True) -> dict:
    """The whole recipe in `work`; the final model is copied to `out` (bfloat16) with the measured
    numbers in recipe_results.json. Returns those numbers."""
    from ..training import Trainer, load_config
    from . import evaluate as ev

    t_start = time.perf_counter()
    _say(f"[data] synthetic bilingual world and corpus -> {work}")
    world = prepare(work, seed, sizes, steps)
    results = {"stages": {}, "seconds": {}, "machine": _machine(), "seed": seed}

    def measure(name: str, path: Path, what: tuple) -> None:
        if not evaluate:
            return
        t = time.perf_counter()
        numbers = ev.measure(path, world, what)
        results["stages"].setdefault(name, {}).update(numbers)
        _say(f"[eval] {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in numbers.items())
             + f"  ({time.perf_counter() - t:.0f} s)")

    def train(stage: str, objective: str) -> Path:
        t = time.perf_counter()
        cfg = load_config(work / f"{stage}.toml")
        cfg["train"]._values["progress"] = progress
        _say(f"[{stage}] {objective}: {cfg['train'].steps} steps of {cfg['train'].batch_size} rows"
             + (f" x {cfg['data'].seq_len} tokens" if objective != "dpo" else " (preference pairs)"))
        final = Path(Trainer(cfg, objective=objective).train())
        results["seconds"][stage] = round(time.perf_counter() - t, 1)
        return final

    measure("init", work / "init", ("facts",))
    s1 = train("stage1", "pretrain")
    measure("stage1", s1, ("retrieval_short", "facts"))
    s2_init = extend_context(s1, work / "stage2-init", STAGE2_CONTEXT, STAGE2_THETA)
    measure("stage1", s2_init, ("retrieval_long",))   # the long inputs need the extended context
    s2 = train("stage2", "pretrain")
    measure("stage2", s2, ("retrieval", "facts", "preference"))
    sft = train("sft", "sft")
    measure("sft", sft, ("retrieval", "facts", "preference"))
    dpo = train("dpo", "dpo")
    measure("dpo", dpo, ("retrieval", "facts", "preference"))
    results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    if out is not None:
        save_shipped(dpo, out, results)
        _say(f"[done] {out} in {results['seconds']['total']:.0f} s")
    if evaluate:
        _say(ev.table(results))
    return results


def _machine() -> str:
    import platform
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def save_shipped(src: Path, out: Path, results: dict) -> None:
    """The model of `src` in bfloat16 with its tokenizer and the recipe numbers, written to `out`
    through a temporary directory (a run stopped half-way leaves the previous weights)."""
    from ..model import ExaoneForCausalLM
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-weights-", dir=out.parent))
    try:
        model = ExaoneForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        model.save_pretrained(tmp / "model")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy2(src / name, tmp / "model" / name)
        (tmp / "model" / "recipe_results.json").write_text(json.dumps(results, indent=2) + "\n")
        old = tmp / "old"
        if out.exists():
            out.rename(old)
        try:
            (tmp / "model").rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)   # the previous weights back in place
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="where the final model goes (default: no copy)")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.work is not None:
        run(args.work, args.out, args.seed, progress=not args.no_progress)
        return 0
    with tempfile.TemporaryDirectory(prefix="exaone-demo-recipe-") as d:
        run(Path(d), args.out, args.seed, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
