"""Tiny but real EXAONE-style checkpoints for tests and examples (no downloads).

    from exaone_ext.testing import write_tiny_tokenizer, write_tiny_checkpoint
    write_tiny_tokenizer(dir)                 # tokenizer.json (byte-level BPE), tokenizer_config.json, ...
    write_tiny_checkpoint(dir, seed=0)        # the same plus config.json and random weights

The tokenizer is a byte-level BPE trained with Hugging Face `tokenizers` on a small English and
Korean corpus, with EXAONE's special tokens ([PAD], [BOS], [UNK], [|endofturn|]) and chat
template. Its ids differ from real EXAONE's (eos is not 361) on purpose: code must read them from
the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tokenizer import EXAONE_CHAT_TEMPLATE

__all__ = ["TINY_CORPUS", "TINY_SPECIAL_TOKENS", "build_tiny_tokenizer", "write_tiny_tokenizer",
           "tiny_config_dict", "write_tiny_checkpoint"]

TINY_SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[UNK]", "[|endofturn|]"]

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "EXAONE is a bilingual language model that speaks English and Korean.",
    "You are EXAONE model from LG AI Research, a helpful assistant.",
    "What is the capital of Korea? The capital of Korea is Seoul.",
    "Large language models predict the next token from the tokens before it.",
    "A key-value cache keeps the keys and values of earlier tokens so that decoding is fast.",
    "Sampling with temperature, top-k, top-p and min-p controls how random the answer is.",
    "Hello, how are you today? I am fine, thank you. And you?",
    "The weather is nice today, so let us go for a walk in the park.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 32768.",
    "안녕하세요. 저는 LG AI 연구원에서 만든 EXAONE 모델입니다.",
    "한국의 수도는 서울입니다. 서울은 큰 도시입니다.",
    "오늘 날씨가 좋아서 공원에 산책하러 갑니다.",
    "대규모 언어 모델은 앞의 토큰으로부터 다음 토큰을 예측합니다.",
    "감사합니다. 좋은 하루 보내세요!",
    "한국어와 영어를 모두 잘 하는 모델을 만들고 싶습니다.",
    "질문이 있으면 언제든지 물어보세요.",
    "사과, 바나나, 포도, 딸기는 맛있는 과일입니다.",
    "[|system|][|endofturn|]\n[|user|]Hello!\n[|assistant|]Hi! How can I help you?[|endofturn|]\n",
    "[|system|]You are a helpful assistant.[|endofturn|]\n[|user|]안녕?\n[|assistant|]안녕하세요![|endofturn|]\n",
]


def build_tiny_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None, split_digits: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `corpus` (default TINY_CORPUS);
    `split_digits`: every digit its own token (as LLaMA's and many other tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 256 + len(TINY_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size: must be an int >= {256 + len(TINY_SPECIAL_TOKENS)} "
                         f"(the byte alphabet plus special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # A small corpus is repeated so that frequent pairs (including within Korean syllables) get merged.
    corpus = corpus or TINY_CORPUS
    tok.train_from_iterator(corpus * 8 if len(corpus) < 1000 else corpus, trainer=trainer)
    return tok


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 1024,
                         chat_template: str | None = EXAONE_CHAT_TEMPLATE, corpus: list[str] | None = None,
                         split_digits: bool = False) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path` (the BPE
    trained on `corpus`, default TINY_CORPUS)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(vocab_size, corpus, split_digits)
    tok.save(str(path / "tokenizer.json"))
    special = {"bos_token": "[BOS]", "eos_token": "[|endofturn|]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1000000000000000019884624838656, **special}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return path


def tiny_config_dict(vocab_size: int, eos_token_id: int, bos_token_id: int, pad_token_id: int, **overrides) -> dict:
    """config.json contents of a tiny EXAONE model (2 layers, hidden 128, GQA 4:2, head dim 64: a head
    dim the attention kernels are built for, so that everything run on it runs the kernels)."""
    config = {
        "architectures": ["ExaoneForCausalLM"], "model_type": "exaone", "vocab_size": vocab_size,
        "hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "intermediate_size": 256, "activation_function": "silu", "layer_norm_epsilon": 1e-5,
        "max_position_embeddings": 512, "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128},
        "tie_word_embeddings": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id, "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def tiny_model(tokenizer_path: str | os.PathLike, seed: int = 0, init_std: float = 0.1, **config_overrides):
    """A tiny random ExaoneForCausalLM (eval mode) for the tokenizer in tokenizer_path (its vocabulary
    and special ids), config keys overridable; the same for the same seed, whatever the global RNG."""
    import torch

    from .model import ExaoneConfig, ExaoneForCausalLM
    from .tokenizer import ExaoneTokenizer

    tok = ExaoneTokenizer.from_pretrained(tokenizer_path)
    config = ExaoneConfig.from_dict(tiny_config_dict(tok.vocab_size, tok.eos_token_id, tok.bos_token_id,
                                                     tok.pad_token_id, **config_overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExaoneForCausalLM(config)
        # Wider than the usual 0.02 so that a random model's next-token choices are far from ties.
        model.reset_parameters(std=init_std)
    return model.eval()


def write_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, vocab_size: int = 1024, init_std: float = 0.1,
                          **config_overrides) -> Path:
    """A complete tiny checkpoint directory: the tiny tokenizer, config.json and random weights
    saved by `ExaoneForCausalLM.save_pretrained` (config keys can be overridden)."""
    path = write_tiny_tokenizer(path, vocab_size)
    tiny_model(path, seed, init_std, **config_overrides).save_pretrained(path)
    return path
