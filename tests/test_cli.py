"""The exaone-ext command, run as a subprocess on a tiny checkpoint written by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exaone_ext.generation import GenerationConfig, generate
from exaone_ext.model import ExaoneForCausalLM
from exaone_ext.testing import write_tiny_checkpoint
from exaone_ext.tokenizer import ExaoneTokenizer


def run(*args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EXAONE_EXT_DEBUG"}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run([sys.executable, "-m", "exaone_ext.cli", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=cwd, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exaone-ext: error:") and match in lines[0], proc.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", seed=1)


@pytest.fixture(scope="module")
def api(ckpt):
    return ExaoneForCausalLM.from_pretrained(ckpt), ExaoneTokenizer.from_pretrained(ckpt)


def test_info(ckpt, api):
    model, _ = api
    proc = run("info", str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert f"parameters   {model.num_parameters:,}" in proc.stdout
    assert "transformer.h.0.attn.attention.k_proj.weight" in proc.stdout and "[128, 128]" in proc.stdout
    assert "float32" in proc.stdout and "kv cache" in proc.stdout
    info = json.loads(run("info", str(ckpt), "--json").stdout)
    assert info["num_parameters"] == model.num_parameters and info["naming"] == "exaone"
    assert len(info["tensors"]) == len(list(model.parameters()))


def test_generate_matches_api(ckpt, api):
    model, tok = api
    cfg = GenerationConfig(max_new_tokens=12)
    raw = run("generate", "--model", str(ckpt), "--prompt", "The capital of Korea is", "--raw",
              "--max-new-tokens", "12", "--stats", "--progress")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == generate(model, tok, "The capital of Korea is", cfg).text + "\n"
    assert "tok/s" in raw.stderr
    assert "loading tiny" in raw.stderr and "100.0%" in raw.stderr  # the bar, asked for although not a TTY
    chat = run("generate", "--model", str(ckpt), "--prompt", "안녕하세요", "--system", "You are EXAONE",
               "--max-new-tokens", "12", "--stream")
    expected = generate(model, tok, [{"role": "system", "content": "You are EXAONE"},
                                     {"role": "user", "content": "안녕하세요"}], cfg).text
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == expected + "\n"


def test_generate_sampling_flags_and_stdin(ckpt, api):
    model, tok = api
    args = ["generate", "--model", str(ckpt), "--prompt", "-", "--raw", "--max-new-tokens", "10",
            "--temperature", "1.3", "--top-k", "50", "--top-p", "0.95", "--min-p", "0.01",
            "--repetition-penalty", "1.2", "--seed", "5"]
    a = run(*args, stdin="Hello there")
    assert a.returncode == 0, a.stderr
    cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, min_p=0.01,
                           repetition_penalty=1.2, seed=5)
    assert a.stdout == generate(model, tok, "Hello there", cfg).text + "\n"
    assert run(*args, stdin="Hello there").stdout == a.stdout


def test_chat_piped(ckpt, api):
    model, tok = api
    cfg = GenerationConfig(max_new_tokens=6)
    sys_msg = [{"role": "system", "content": "Be brief."}]
    proc = run("chat", "--model", str(ckpt), "--system", "Be brief.", "--max-new-tokens", "6",
               stdin="hello\nhow are you?\n/reset\n안녕\n/exit\nnot read\n")
    assert proc.returncode == 0, proc.stderr
    r1 = generate(model, tok, sys_msg + [{"role": "user", "content": "hello"}], cfg).text
    turn2 = sys_msg + [{"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                       {"role": "user", "content": "how are you?"}]
    r2 = generate(model, tok, turn2, cfg).text
    r3 = generate(model, tok, sys_msg + [{"role": "user", "content": "안녕"}], cfg).text  # after /reset
    assert proc.stdout == f"{r1}\n{r2}\n{r3}\n"
    assert "reset" in proc.stderr


def test_chat_drops_oldest_turns_beyond_the_context(ckpt, api):
    # the tiny checkpoint has a 512-token context: long turns push the first ones out
    model, tok = api
    from exaone_ext.generation import trim_history
    long_line = " ".join(["Seoul is the capital of Korea."] * 25)
    lines = [f"{i} {long_line}" for i in range(4)]
    proc = run("chat", "--model", str(ckpt), "--max-new-tokens", "8", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "oldest message" in proc.stderr
    replies = proc.stdout.split("\n")[:-1]
    assert len(replies) == 4  # every turn answered
    # the same conversation through the API: trimmed the same way, same replies
    cfg = GenerationConfig(max_new_tokens=8)
    history = []
    for line, reply in zip(lines, replies):
        history, _ = trim_history(tok, history + [{"role": "user", "content": line}], 512 - 8)
        assert generate(model, tok, history, cfg).text == reply
        history.append({"role": "assistant", "content": reply})
    assert len(history) < 2 * len(lines)


def test_convert_round_trip(ckpt, tmp_path):
    llama, back = tmp_path / "llama", tmp_path / "back"
    proc = run("convert", "--from", "exaone", "--to", "llama", str(ckpt), str(llama), "--max-shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr
    assert (llama / "model.safetensors.index.json").is_file() and (llama / "tokenizer.json").is_file()
    assert json.loads((llama / "config.json").read_text())["model_type"] == "llama"
    assert run("convert", "--from", "llama", "--to", "exaone", str(llama), str(back)).returncode == 0

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(ckpt), tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.embed_tokens.weight" in tensors(llama)
    assert_one_line_error(run("convert", "--from", "llama", "--to", "exaone", str(ckpt), str(tmp_path / "x")),
                          "has exaone tensor names")
    assert_one_line_error(run("convert", "--from", "exaone", "--to", "llama", str(ckpt), str(llama)),
                          "already holds a checkpoint")


def test_user_errors_are_one_line(ckpt, tmp_path):
    assert_one_line_error(run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x"), "not a directory")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 80
    assert_one_line_error(run("generate", "--model", str(ckpt), "--prompt", long_prompt, "--raw"),
                          "longer than the model's context")


@pytest.mark.parametrize("argv, match", [
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--top-p", "3"], "--top-p"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--raw", "--system", "s"], "--system"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--device", "tpu:0"], "--device"),
    (["info", "{tmp}"], "config.json"),
    (["convert", "--from", "exaone", "--to", "llama", "{ckpt}", "{ckpt}"], "different directories"),
])
def test_user_errors_in_process(ckpt, tmp_path, capsys, argv, match):
    from exaone_ext.cli import main

    argv = [a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("exaone-ext: error:") and match in err[0], err


def test_usage_errors():
    usage = run("generate", "--prompt", "x")  # argparse: usage line, status 2
    assert usage.returncode == 2 and "--model" in usage.stderr


def test_help_and_console_script():
    proc = run("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("generate", "chat", "convert", "info"))
    script = Path(sys.executable).parent / "exaone-ext"
    if script.exists():
        out = subprocess.run([str(script), "info", "--help"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "PATH" in out.stdout
