"""The exaone-ext flags and chat commands test_cli.py does not reach, Ctrl-C and a closed pipe, and a
smoke run of the demo (the README's main job). Subprocesses on the tiny checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import exaone_ext
from exaone_ext.generation import GenerationConfig, generate
from exaone_ext.model import ExaoneForCausalLM
from exaone_ext.testing import write_tiny_checkpoint
from exaone_ext.tokenizer import ExaoneTokenizer
from test_cli import run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli_flags") / "tiny", seed=2)


@pytest.fixture(scope="module")
def api(ckpt):
    return ExaoneForCausalLM.from_pretrained(ckpt), ExaoneTokenizer.from_pretrained(ckpt)


def _generate(*flags, stdin=None):
    return run("generate", *flags, stdin=stdin)


def test_version_prints_the_build():
    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(json.dumps(exaone_ext.build_info()))


def test_info_tensors_lists_every_layer(ckpt, api):
    model, _ = api
    short, full = run("info", str(ckpt)), run("info", str(ckpt), "--tensors")
    assert short.returncode == full.returncode == 0, full.stderr
    assert "transformer.h.1." not in short.stdout and "transformer.h.1.attn.attention.q_proj.weight" in full.stdout
    listed = [line for line in full.stdout.splitlines() if line.startswith("  transformer.")]
    assert len(listed) == len(model.state_dict()) - (1 if model.config.tie_word_embeddings else 0) or \
        len(listed) == len(list(model.parameters()))


@pytest.mark.slow
def test_greedy_sample_stop_and_no_progress(ckpt, api):
    model, tok = api
    base = ("--model", str(ckpt), "--prompt", "The capital of Korea is", "--raw", "--max-new-tokens", "16",
            "--no-progress")
    full = generate(model, tok, "The capital of Korea is", GenerationConfig(max_new_tokens=16))
    # --greedy wins over a sampling flag; --no-progress leaves stderr empty
    greedy = _generate(*base, "--greedy", "--temperature", "0.7")
    assert greedy.returncode == 0 and greedy.stderr == "", greedy.stderr
    assert greedy.stdout == full.text + "\n"
    # --sample with a seed: the API's sampled result
    sampled = _generate(*base, "--sample", "--seed", "3")
    expected = generate(model, tok, "The capital of Korea is", GenerationConfig(max_new_tokens=16, do_sample=True,
                                                                                 seed=3))
    assert sampled.returncode == 0 and sampled.stdout == expected.text + "\n"
    # --stop: the text is cut before the stop string
    text = full.text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip() and text[i:i + 2] not in text[:i])
    cut = _generate(*base, "--stop", stop)
    assert cut.returncode == 0 and cut.stdout == text[:text.index(stop)] + "\n"


@pytest.mark.slow
def test_dtype_flag(ckpt, api):
    _, tok = api
    proc = _generate("--model", str(ckpt), "--prompt", "Hello", "--raw", "--max-new-tokens", "6", "--dtype", "bf16",
                     "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "(torch.bfloat16)" in proc.stderr
    model16 = ExaoneForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert proc.stdout == generate(model16, tok, "Hello", GenerationConfig(max_new_tokens=6)).text + "\n"


@pytest.mark.slow
def test_defaults_from_generation_config_json(ckpt, api, tmp_path):
    """The checkpoint's generation_config.json sets the defaults (keys this package lacks ignored);
    flags win over it."""
    model, tok = api
    d = tmp_path / "with_defaults"
    shutil.copytree(ckpt, d)
    (d / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "do_sample": True, "seed": 11,
                                                          "top_k": 5, "transformers_version": "5.0"}))
    proc = _generate("--model", str(d), "--prompt", "Hello", "--raw")
    assert proc.returncode == 0, proc.stderr
    expected = generate(model, tok, "Hello", GenerationConfig(max_new_tokens=3, do_sample=True, seed=11, top_k=5))
    assert proc.stdout == expected.text + "\n"
    proc = _generate("--model", str(d), "--prompt", "Hello", "--raw", "--max-new-tokens", "5", "--greedy")
    assert proc.stdout == generate(model, tok, "Hello", GenerationConfig(max_new_tokens=5)).text + "\n"


def test_chat_help_and_quit(ckpt):
    proc = run("chat", "--model", str(ckpt), "--max-new-tokens", "4", stdin="/help\nHello\n/quit\nNever answered\n")
    assert proc.returncode == 0, proc.stderr
    assert "/reset: forget the conversation" in proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # one reply: to "Hello"; nothing after /quit


@pytest.mark.slow
def test_chat_message_longer_than_the_context(ckpt, api):
    _, tok = api
    long = " ".join(["안녕하세요 EXAONE"] * 400)
    assert len(tok.encode(long)) > 512
    proc = run("chat", "--model", str(ckpt), "--max-new-tokens", "4", stdin=long + "\nHello\n")
    assert proc.returncode == 0, proc.stderr
    assert "use /reset to start over" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # the chat went on and answered "Hello"


def test_ctrl_c_exits_130(ckpt):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    # the child gets Ctrl-C's default disposition: a test run from a background job inherits SIGINT
    # ignored, and Python then leaves it ignored (no KeyboardInterrupt to test)
    proc = subprocess.Popen([sys.executable, "-m", "exaone_ext.cli", "chat", "--model", str(ckpt), "--stats"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stderr.readline()  # "[loaded ...]": the model is loaded, the chat waits for a line
        assert line.startswith("[loaded"), line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_broken_pipe_is_quiet(ckpt):
    """Output piped into a reader that goes away (`| head -c 1`): exit 0, nothing on stderr."""
    cmd = (f"{sys.executable} -m exaone_ext.cli generate --model {ckpt} --prompt Hello --raw --stream "
           f"--max-new-tokens 60 2>err.txt | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ckpt, timeout=600)
    err = (ckpt / "err.txt").read_text()
    (ckpt / "err.txt").unlink()
    assert proc.stdout.strip() == "0", (proc.stdout, err)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.slow
def test_demo_runs():
    proc = subprocess.run([sys.executable, "-m", "exaone_ext.demo", "--tokens", "64", "--repeats", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("exaone_ext ") and "KV-cache decode vs full recomputation" in proc.stdout
    assert "assistant:" in proc.stdout and "retrieval_long" in proc.stdout
    assert "\ufffd" not in proc.stdout


def test_no_cuda_graphs_flag():
    """--no-cuda-graphs reaches generate / chat (GenerationConfig.cuda_graphs) and serve (the
    Engine's setting); without it graphs stay on (they only act on a GPU)."""
    from exaone_ext import cli

    parser = cli.build_parser()
    for command in (["generate", "--prompt", "x"], ["chat"]):
        off = parser.parse_args([*command, "--model", "m", "--no-cuda-graphs"])
        on = parser.parse_args([*command, "--model", "m"])
        assert cli.generation_config(off, GenerationConfig()).cuda_graphs is False
        assert cli.generation_config(on, GenerationConfig()).cuda_graphs is True
    assert parser.parse_args(["serve", "--model", "m", "--no-cuda-graphs"]).cuda_graphs is False
    assert parser.parse_args(["serve", "--model", "m"]).cuda_graphs is True


def test_serve_prefill_chunk_size_flag(capsys):
    pytest.importorskip("uvicorn")  # serve checks its extra first
    from exaone_ext import cli

    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--model", "m"]).prefill_chunk_size is None
    assert parser.parse_args(["serve", "--model", "m", "--prefill-chunk-size", "512"]).prefill_chunk_size == 512
    assert cli.main(["serve", "--model", "m", "--prefill-chunk-size", "0"]) != 0
    assert "--prefill-chunk-size: expected a positive integer, got 0" in capsys.readouterr().err
