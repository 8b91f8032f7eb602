"""exaone_ext.training: overfitting, exact resume, atomic checkpoints, multi-process equality, recipes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from exaone_ext.training import ConfigError, Trainer, latest_checkpoint, load_config

PRETRAIN_DOCS = ["The capital of Korea is Seoul.", "한국의 수도는 서울입니다.", "The quick brown fox jumps over the lazy dog."]


pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tmp_path, ckpt, data: dict, train: dict, preference: dict | None = None, name="recipe.toml") -> str:
    def table(d):
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
    text = f"[model]\npath = {json.dumps(str(ckpt))}\n\n[data]\n{table(data)}\n[train]\n{table(train)}"
    if preference:
        text += f"\n[preference]\n{table(preference)}"
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _pretrain_data(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in PRETRAIN_DOCS), encoding="utf-8")
    return {"files": [str(f)], "seq_len": 32}


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


# keep_freed_memory off: it is process-wide, and these trainers run inside the test session
# (test_keep_freed_memory checks it in processes of its own)
BASE = {"micro_batch": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "progress": False, "plot": False,
        "grad_clip": 1.0, "keep_freed_memory": False}


def test_overfit_pretrain(tmp_path, ckpt):
    cfg = _recipe(tmp_path, ckpt, _pretrain_data(tmp_path), {**BASE, "out_dir": "run", "steps": 40, "plot": True})
    final = Trainer(load_config(cfg), "pretrain").train()
    losses = _losses(tmp_path / "run")
    assert losses[0] > 4.0 and losses[-1] < 0.3, losses
    assert os.path.isfile(os.path.join(final, "model.safetensors")) and os.path.isfile(tmp_path / "run" / "loss.png")
    assert os.path.isfile(os.path.join(final, "tokenizer.json"))


def test_overfit_pretrain_bf16_on_cpu(tmp_path, ckpt):
    # precision = "bf16": torch.autocast on the CPU too (the ops take its dtype as F.linear does)
    cfg = _recipe(tmp_path, ckpt, _pretrain_data(tmp_path),
                  {**BASE, "out_dir": "run", "steps": 40, "precision": "bf16"})
    final = Trainer(load_config(cfg), "pretrain").train()
    losses = _losses(tmp_path / "run")
    assert losses[0] > 4.0 and losses[-1] < 0.5, losses
    assert all(t.dtype == torch.float32 for t in _weights(final).values())  # float32 master weights


def test_overfit_sft(tmp_path, ckpt):
    f = tmp_path / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Capital of Korea?"}, {"role": "assistant", "content": "Seoul."}]},
            {"prompt": "안녕?", "response": "안녕하세요!"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = _recipe(tmp_path, ckpt, {"files": [str(f)], "seq_len": 48}, {**BASE, "out_dir": "run", "steps": 30})
    Trainer(load_config(cfg), "sft").train()
    losses = _losses(tmp_path / "run")
    assert losses[0] > 3.0 and losses[-1] < 0.1, losses


def _pref_file(tmp_path):
    f = tmp_path / "pref.jsonl"
    rows = [{"prompt": "Capital of Korea?", "chosen": "Seoul.", "rejected": "Tokyo is the capital."},
            {"prompt": "안녕?", "chosen": "안녕하세요!", "rejected": "몰라요."}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(f)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_overfit_preference_staged(tmp_path, ckpt, objective):
    cfg = _recipe(tmp_path, ckpt, {"files": [_pref_file(tmp_path)]},
                  {**BASE, "batch_size": 2, "micro_batch": 1, "out_dir": "run", "steps": 12, "lr": 5e-3},
                  {"beta": 0.5, "stages": 2})
    Trainer(load_config(cfg), objective).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["loss"] > 0.3 and rows[-1]["loss"] < 0.05, [r["loss"] for r in rows]
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["rewards/margins"] > 0
    if objective == "dpo":
        # stage 2 starts from stage 1's policy as its reference: its first loss is log 2 again
        assert abs(rows[12]["loss"] - 0.6931) < 1e-3
    assert os.path.isdir(tmp_path / "run" / "stage-1") and os.path.isdir(tmp_path / "run" / "stage-2")


def test_preference_stages_with_generated_candidates(tmp_path, ckpt):
    """Each stage samples replies from the current policy; the scorer's best / worst become the pairs."""
    seen = []

    def score(messages, text):
        seen.append(text)
        return len(text)
    cfg = _recipe(tmp_path, ckpt, {"files": [_pref_file(tmp_path)]},
                  {**BASE, "batch_size": 2, "micro_batch": 2, "out_dir": "run", "steps": 2},
                  {"stages": 2, "candidates": 3, "max_new_tokens": 8})
    trainer = Trainer(load_config(cfg), "dpo", scorer=score)
    trainer.train()
    assert len(seen) == 2 * 2 * 3   # 2 stages x 2 prompts x 3 candidates
    for ex in trainer.data.examples:   # the last stage's pairs: generated, chosen scored above rejected
        chosen, rejected = (trainer.tokenizer.decode(r[:-1], skip_special_tokens=True) for r in (ex.chosen, ex.rejected))
        assert len(chosen) > len(rejected) and ex.chosen[-1] == trainer.tokenizer.eos_token_id


class _Killed(Exception):
    pass


@pytest.mark.parametrize("objective", ["pretrain", "dpo"])
def test_resume_is_bit_exact(tmp_path, ckpt, objective, monkeypatch):
    data = _pretrain_data(tmp_path) if objective == "pretrain" else {"files": [_pref_file(tmp_path)]}
    train = {**BASE, "steps": 7, "save_every": 3, "batch_size": 2, "micro_batch": 1}
    ref = Trainer(load_config(_recipe(tmp_path, ckpt, data, {**train, "out_dir": "a"}, name="a.toml")), objective)
    final_a = ref.train()
    cfg = load_config(_recipe(tmp_path, ckpt, data, {**train, "out_dir": "b"}, name="b.toml"))
    step = Trainer._step
    calls = {"n": 0}

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 5:   # after checkpoint-3 and one more step: that step's work is lost
            raise _Killed
        return step(self)
    monkeypatch.setattr(Trainer, "_step", dying_step)
    with pytest.raises(_Killed):
        Trainer(cfg, objective).train()
    monkeypatch.setattr(Trainer, "_step", step)
    assert latest_checkpoint(str(tmp_path / "b")).endswith("checkpoint-0000003")
    final_b = Trainer(cfg, objective).train(resume=True)
    a, b = _weights(final_a), _weights(final_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, ckpt, monkeypatch):
    cfg = load_config(_recipe(tmp_path, ckpt, _pretrain_data(tmp_path),
                              {**BASE, "out_dir": "run", "steps": 4, "save_every": 2}))
    import exaone_ext.training.checkpoint as ck
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:   # the second checkpoint dies after its weights, before its state
            raise _Killed
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(_Killed):
        Trainer(cfg, "pretrain").train()
    monkeypatch.setattr(ck.torch, "save", real_save)
    latest = latest_checkpoint(str(tmp_path / "run"))
    assert latest.endswith("checkpoint-0000002")
    assert sorted(d for d in os.listdir(tmp_path / "run") if d.startswith("checkpoint-")) == ["checkpoint-0000002"]
    assert _weights(latest)  # complete and loadable
    Trainer(cfg, "pretrain").train(resume=True)
    assert latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-0000004")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, ckpt, mode):
    data = _pretrain_data(tmp_path)
    train = {**BASE, "steps": 4, "batch_size": 4, "micro_batch": 1, "distributed": mode}
    one = _recipe(tmp_path, ckpt, data, {**train, "out_dir": "one"}, name="one.toml")
    two = _recipe(tmp_path, ckpt, data, {**train, "out_dir": "two"}, name="two.toml")
    Trainer(load_config(one), "pretrain").train()
    env = dict(os.environ, OMP_NUM_THREADS="1", EXAONE_EXT_DEBUG="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "exaone_ext.cli", "train", "pretrain", "--config", two]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_same_result(tmp_path, ckpt):
    data = _pretrain_data(tmp_path)
    finals = []
    for ac in (False, True):
        cfg = _recipe(tmp_path, ckpt, data, {**BASE, "steps": 2, "out_dir": f"ac{ac}", "activation_checkpointing": ac},
                      name=f"ac{ac}.toml")
        finals.append(_weights(Trainer(load_config(cfg), "pretrain").train()))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert _losses(tmp_path / "acFalse") == _losses(tmp_path / "acTrue")


# ---------------------------------------------------------------- recipes and bad input
def test_config_errors_name_key_and_file(tmp_path, ckpt):
    cfg = _recipe(tmp_path, ckpt, {"files": ["x.jsonl"]}, {"out_dir": "r", "steps": 1, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"recipe.toml: unknown key 'learning_rate' in \[train\]"):
        load_config(cfg)
    (tmp_path / "s.toml").write_text("[modle]\npath = 'x'\n")
    with pytest.raises(ConfigError, match=r"s.toml: unknown section \[modle\]"):
        load_config(tmp_path / "s.toml")
    cfg = _recipe(tmp_path, ckpt, {"files": ["x.jsonl"]}, {"out_dir": "r", "steps": "ten"})
    with pytest.raises(ConfigError, match=r"\[train\] steps must be an integer"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_bad_recipe(tmp_path, ckpt):
    from exaone_ext.cli import main
    cfg = _recipe(tmp_path, ckpt, {"files": ["missing.jsonl"]}, {"out_dir": "r", "steps": 1, "progress": False})
    assert main(["train", "pretrain", "--config", cfg]) != 0
    cfg = _recipe(tmp_path, ckpt, {"files": [_pretrain_data(tmp_path)["files"][0]], "seq_len": 4096},
                  {"out_dir": "r", "steps": 1})
    with pytest.raises(ValueError, match="longer than the model's context"):
        Trainer(load_config(cfg), "pretrain").train()


def test_quantized_checkpoint_is_refused(tmp_path, ckpt):
    from exaone_ext import ExaoneForCausalLM
    ExaoneForCausalLM.from_pretrained(ckpt).quantize("int8").save_pretrained(tmp_path / "q")
    cfg = _recipe(tmp_path, tmp_path / "q", _pretrain_data(tmp_path), {"out_dir": "r", "steps": 1})
    with pytest.raises(ConfigError, match=r"\[model\] path .*q is a quantized checkpoint .*needs the float weights"):
        Trainer(load_config(cfg), "pretrain")


def test_token_nll_sum_equals_summed_token_logps(ckpt):
    """The pre-training objective (the fused loss summed, its gradients made in the forward) has the
    value and the gradients of the per-token log-probabilities summed (gradients in the backward),
    on a packed batch of two documents with ignored labels."""
    from exaone_ext.data import Row, collate
    from exaone_ext.model import ExaoneForCausalLM
    from exaone_ext.training import token_logps, token_nll_sum

    model = ExaoneForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (11, 6)]
    rows = [Row(docs[0] + docs[1], docs[0][1:] + [-100] + docs[1][1:3] + [-100] * 4, [11, 6])]
    batch = collate(rows)
    grads = []
    values = []
    for fn in (lambda: -token_logps(model, batch).sum(), lambda: token_nll_sum(model, batch)):
        model.zero_grad(set_to_none=True)
        value = fn()
        value.backward()
        values.append(value.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


_FAULTS = """
import resource, sys, torch
from exaone_ext import keep_freed_memory
def faults():  # minor page faults of allocating, touching and freeing 64 MiB, five times
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
# the fewest faults of several rounds: where a freed block lands beside the interpreter's own small
# allocations varies, so one round may miss a reuse that the next makes
faults()
before = min(faults() for _ in range(3))
assert keep_freed_memory() and keep_freed_memory()
faults()
print(before, min(faults() for _ in range(5)))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_keep_freed_memory(tmp_path, ckpt):
    """Freed tensor memory is reused without page faults once kept (each in a process of its own:
    the setting is process-wide); the trainer keeps it on CPU unless the recipe says not to."""
    env = {k: v for k, v in os.environ.items() if k != "EXAONE_EXT_KEEP_FREED_MEMORY"}  # conftest's off switch
    r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split())
    assert before >= 5 * 16000 and after < 1000, (before, after)  # 16384 pages of 4 KiB per 64 MiB
    data = _pretrain_data(tmp_path)
    for keep in (True, False):
        cfg = _recipe(tmp_path, ckpt, data, {**BASE, "steps": 1, "out_dir": "k", "device": "cpu", "keep_freed_memory": keep})
        code = ("from exaone_ext import memory; from exaone_ext.training import Trainer, load_config; "
                f"Trainer(load_config({cfg!r}), 'pretrain'); print(memory._applied)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == str(keep)
    # the environment's off switch, and the CLI's on the CPU (its flag and the default)
    code = "from exaone_ext import keep_freed_memory; print(keep_freed_memory())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "EXAONE_EXT_KEEP_FREED_MEMORY": "0"})
    assert r.returncode == 0 and r.stdout.split()[-1] == "False", r.stderr[-2000:]
    for flag, want in (([], "True"), (["--no-keep-freed-memory"], "False")):
        code = ("import sys; from exaone_ext import cli, memory; "
                f"cli.main(['generate', '--model', {str(ckpt)!r}, '--device', 'cpu', '--max-new-tokens', '2', "
                f"'--prompt', 'hello'] + {flag!r}); print(memory._applied)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-1] == want
