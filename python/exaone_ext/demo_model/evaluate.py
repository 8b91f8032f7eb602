"""What the demo recipe measures after each stage (all greedy, all on the synthetic world).

facts_sft       a fact question about an SFT person answered with the right value (either language)
facts_heldout   the same for held-out people: known from pre-training biographies only
language        replies in the language of the question (fact questions, both kinds of people)
pref_accuracy   held-out preference pairs whose chosen reply (the language asked) has a higher
                log-probability than the rejected one (the other language)
retrieval_short / retrieval_long
                the secret colour found again in about 100 / about 900 tokens of text
"""
from __future__ import annotations

from pathlib import Path

import torch

from .world import World, is_korean

__all__ = ["measure", "fact_answers", "table", "RETRIEVAL_SHORT", "RETRIEVAL_LONG"]

RETRIEVAL_SHORT, RETRIEVAL_LONG = 8, 72   # filler sentences (about 100 and 900 tokens)
RETRIEVAL_CASES = 32
_BATCH = 48


def _load(path):
    from ..model import ExaoneForCausalLM
    from ..tokenizer import ExaoneTokenizer
    return ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ExaoneTokenizer.from_pretrained(path)


def _generate(model, tok, prompts: list, max_new_tokens: int) -> list[str]:
    from ..generation import GenerationConfig, generate
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    out = []
    for i in range(0, len(prompts), _BATCH):
        out += [r.text for r in generate(model, tok, prompts[i:i + _BATCH], cfg)]
    return out


def fact_answers(model, tok, questions: list[dict]) -> list[str]:
    return _generate(model, tok, [[{"role": "user", "content": q["question"]}] for q in questions], 24)


def _facts(model, tok, world: World) -> dict:
    out, language, total = {}, 0, 0
    for name, people in (("facts_sft", world.sft_people), ("facts_heldout", world.heldout_people)):
        questions = world.fact_questions(people)
        replies = fact_answers(model, tok, questions)
        right = 0
        for q, r in zip(questions, replies):
            right += any(v in r for v in q["values"])
            language += is_korean(r) == (q["lang"] == "ko")
        out[name] = right / len(questions)
        total += len(questions)
    out["language"] = language / total
    return out


def _retrieval(model, tok, world: World, kinds: tuple[str, ...]) -> dict:
    out = {}
    for name, sentences in (("retrieval_short", RETRIEVAL_SHORT), ("retrieval_long", RETRIEVAL_LONG)):
        if name not in kinds:
            continue
        cases = world.retrieval_cases(RETRIEVAL_CASES, seed=100 + sentences, filler_sentences=sentences)
        replies = _generate(model, tok, [c["prompt"] for c in cases], 6)
        out[name] = sum(r.strip().startswith(c["answer"]) for c, r in zip(cases, replies)) / len(cases)
    return out


@torch.no_grad()
def _preference(model, tok, world: World) -> dict:
    from ..data.chat import encode_preference
    from ..data.packing import collate
    from ..data.streams import preference_rows
    from ..training.objectives import document_logps, token_logps
    pairs = [encode_preference(tok, p, f"pair {i}") for i, p in enumerate(world.preference_pairs(world.heldout_people, small_talk=False))]
    wins = 0
    for i in range(0, len(pairs), 32):
        batch = collate(preference_rows(list(enumerate(pairs[i:i + 32]))))
        logps, _ = document_logps(token_logps(model, batch), batch)
        wins += int((logps[0::2] > logps[1::2]).sum())
    return {"pref_accuracy": wins / len(pairs)}


def measure(path: str | Path, world: World, what: tuple[str, ...]) -> dict:
    """The numbers of the checkpoint at `path`: what = some of "facts", "preference", "retrieval_short",
    "retrieval_long" ("retrieval": both)."""
    model, tok = _load(path)
    out = {}
    kinds = ("retrieval_short", "retrieval_long") if "retrieval" in what else what
    if any(k.startswith("retrieval") for k in kinds):
        out.update(_retrieval(model, tok, world, kinds))
    if "facts" in what:
        out.update(_facts(model, tok, world))
    if "preference" in what:
        out.update(_preference(model, tok, world))
    return out


def table(results: dict) -> str:
    """The recipe numbers as a text table (stages as columns)."""
    stages = list(results["stages"])
    keys = ["facts_sft", "facts_heldout", "language", "pref_accuracy", "retrieval_short", "retrieval_long"]
    lines = ["measure".ljust(17) + "".join(s.rjust(9) for s in stages)]
    for k in keys:
        cells = [results["stages"][s].get(k) for s in stages]
        if all(c is None for c in cells):
            continue
        lines.append(k.ljust(17) + "".join(("-" if c is None else f"{c:.2f}").rjust(9) for c in cells))
    return "\n".join(lines)
