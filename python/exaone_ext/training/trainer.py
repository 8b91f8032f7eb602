"""The trainer: pre-training (stage 1 / stage 2), SFT, DPO and SimPO from one TOML recipe.

    from exaone_ext.training import Trainer, load_config
    Trainer(load_config("stage1.toml"), objective="pretrain").train()          # or resume=True

One optimizer step takes `batch_size` rows (preference: pairs) from the global data stream;
each of the `world` processes takes its share (rank, rank + world, ...) in micro-batches of
`micro_batch`, and every loss is normalised by the global count (tokens or pairs), so a step's
gradient is the same whatever the number of processes. Under torchrun the model is wrapped in
DDP, or sharded with FSDP2 (`fully_shard`) when [train] distributed = "fsdp".
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time

import torch
import torch.distributed as dist

from ..data import PreferenceData, PretrainStream, SFTStream, collate, preference_rows, shard
from ..model import ExaoneForCausalLM
from ..model.checkpoint import read_config
from ..tokenizer import ExaoneTokenizer
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import ConfigError
from .monitor import MetricsLog, Progress, plot_loss
from .losses import dpo_loss, simpo_loss
from ..memory import keep_freed_memory
from .objectives import document_logps, token_logps, token_nll_sum

__all__ = ["Trainer", "OBJECTIVES"]

OBJECTIVES = ("pretrain", "sft", "dpo", "simpo")


def _dist() -> tuple[int, int]:
    """(rank, world); joins the process group torchrun describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """One run of a recipe. `objective`: pretrain, sft, dpo or simpo. `scorer` (or the recipe's
    [preference] scorer = "module:function"): score(messages, reply_text) -> float, which with
    [preference] candidates > 0 picks the best and worst of freshly generated replies each stage."""

    def __init__(self, config: dict, objective: str, scorer=None):
        if objective not in OBJECTIVES:
            raise ValueError(f"Trainer: objective must be one of {OBJECTIVES}, got {objective!r}")
        self.cfg, self.objective = config, objective
        self.source = config.get("source", "<config>")
        self.m, self.d, self.t, self.p = config["model"], config["data"], config["train"], config["preference"]
        self.rank, self.world = _dist()
        self.preference = objective in ("dpo", "simpo")
        if self.t.batch_size % self.world:
            raise ConfigError(f"{self.source}: [train] batch_size {self.t.batch_size} does not split over "
                              f"{self.world} processes")
        if not os.path.isdir(self.m.path):
            raise ConfigError(f"{self.source}: [model] path {self.m.path} is not a checkpoint directory")
        quant = read_config(self.m.path).extra.get("quantization_config")
        if quant:
            raise ConfigError(f"{self.source}: [model] path {self.m.path} is a quantized checkpoint ({quant}); "
                              f"training needs the float weights it was quantized from")
        self.device = self._device()
        if self.device.type == "cpu" and self.t.keep_freed_memory:
            keep_freed_memory()  # each step's tensors reuse the last step's pages (exaone_ext.memory)
        self.scorer = scorer if scorer is not None else self._load_scorer()
        self.tokenizer = ExaoneTokenizer.from_pretrained(self.m.path)

    # ------------------------------------------------------------------ setup
    def _device(self) -> torch.device:
        name = self.t.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def _load_scorer(self):
        spec = self.p.scorer
        if spec is None:
            return None
        import importlib
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{self.source}: [preference] scorer {spec!r} cannot be imported ({e})") from None

    def _autocast(self):
        precision = self.t.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _build_data(self):
        max_len = self.base.config.max_position_embeddings
        d = self.d
        if self.objective == "pretrain":
            return PretrainStream(self.tokenizer, d.files, d.seq_len, field=d.field or "text", split=d.split,
                                  replay_files=d.replay_files, replay_fraction=float(d.replay_fraction),
                                  replay_len=d.replay_len, seed=self.t.seed, max_len=max_len)
        if self.objective == "sft":
            return SFTStream(self.tokenizer, d.files, d.seq_len, field=d.field or "messages", max_len=max_len)
        return PreferenceData(self.tokenizer, d.files, max_len=max_len, seed=self.t.seed)

    def _load_model(self, path: str) -> None:
        model = ExaoneForCausalLM.from_pretrained(path, dtype=torch.float32, device=self.device,
                                                  use_kernels=self.m.use_kernels)
        model.train()
        self.base = model
        if self.t.activation_checkpointing:
            _checkpoint_blocks(model)
        if self.world > 1 and self.t.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard
            for block in model.transformer.h:
                if hasattr(type(block), "forward") and type(block).forward is not torch.nn.Module.forward:
                    fully_shard(block)
            fully_shard(model)
            self.model = model
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # the RoPE tables are the only buffers, computed alike on every rank: never synced
            self.model = DistributedDataParallel(model, forward_sync_buffers=False,
                                                 device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.model = model
        self._make_optimizer()

    def _make_optimizer(self) -> None:
        decay = [p for p in self.base.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.base.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(self.t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=float(self.t.lr), betas=tuple(self.t.betas), eps=float(self.t.eps),
            # one fused kernel per parameter group (CPU and CUDA): on the bench_training shape the
            # step took 120 ms instead of 754 ms for the per-op (foreach) update on the CPU
            fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.t.warmup_steps, self.t.steps, float(self.t.min_lr_ratio)))

    # ------------------------------------------------------------------ checkpoints
    def _full_optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _save_model_fn(self):
        if not (self.world > 1 and self.t.distributed == "fsdp"):
            return self.base.save_pretrained
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def save(path):
            with torch.device("meta"):
                copy = ExaoneForCausalLM(self.base.config, use_kernels=self.m.use_kernels)
            copy.load_state_dict(full, assign=True, strict=False)
            if self.base.config.tie_word_embeddings:
                copy.lm_head.weight = copy.transformer.wte.weight
            copy.generation_config = self.base.generation_config
            copy.save_pretrained(path)
        return save

    def save(self, name: str, state: dict) -> None:
        """Collective: every rank calls it; rank 0 writes."""
        optim = self._full_optimizer_state()
        save_model = self._save_model_fn()
        if self.rank == 0:
            state = dict(state, optimizer=optim, scheduler=self.scheduler.state_dict(),
                         rng={"torch": torch.get_rng_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
            save_checkpoint(self.t.out_dir, name, save_model, state, self.m.path, keep=self.t.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    def _restore(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ------------------------------------------------------------------ steps
    def _micro(self, items: list) -> list[list]:
        n = self.t.micro_batch
        return [items[i:i + n] for i in range(0, len(items), n)]

    def _sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        if self.world > 1 and self.t.distributed == "ddp" and not last:
            return self.model.no_sync()
        if self.world > 1 and self.t.distributed == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _lm_step(self) -> dict:
        rows = [self.data.next_row() for _ in range(self.t.batch_size)]
        targets = sum(sum(1 for x in r.labels if x != -100) for r in rows)
        micro = self._micro(shard(rows, self.rank, self.world))
        loss_sum = 0.0
        for j, m in enumerate(micro):
            batch = collate(m).to(self.device)
            with self._sync(j == len(micro) - 1), self._autocast():
                nll = token_nll_sum(self.model, batch)
            # the mean over the global batch's tokens; DDP / FSDP average over processes
            (nll * (self.world / max(1, targets))).backward()
            loss_sum += nll.item()
        (loss_sum,) = _all_sum([loss_sum], self.world)
        return {"loss": loss_sum / max(1, targets), "tokens": len(rows) * self.d.seq_len, "targets": targets}

    def _pref_step(self) -> dict:
        pairs = self.data.next_pairs(self.t.batch_size)
        micro = self._micro(shard(pairs, self.rank, self.world))
        sums = {}
        tokens = 0
        for j, m in enumerate(micro):
            batch = collate(preference_rows(m)).to(self.device)
            tokens += batch.num_tokens
            with self._sync(j == len(micro) - 1), self._autocast():
                logps, counts = document_logps(token_logps(self.model, batch), batch)
                pc, pr = logps[0::2], logps[1::2]
                if self.objective == "dpo":
                    ref = self.ref_logps[torch.tensor([i for i, _ in m])].to(self.device)
                    loss, metrics = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta=self._beta())
                else:
                    loss, metrics = simpo_loss(pc, pr, counts[0::2], counts[1::2], beta=self._beta(),
                                               gamma=float(self.p.gamma))
            (loss * (len(m) * self.world / self.t.batch_size)).backward()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(m)
        keys = sorted(sums)
        totals = _all_sum([sums[k] for k in keys] + [tokens], self.world)
        out = {k: v / self.t.batch_size for k, v in zip(keys, totals)}
        out["tokens"] = int(totals[-1])
        return out

    def _beta(self) -> float:
        if self.p.beta is not None:
            return float(self.p.beta)
        return 0.1 if self.objective == "dpo" else 2.0

    @torch.no_grad()
    def reference_logps(self) -> torch.Tensor:
        """float32 [n_pairs, 2]: the current policy's summed log-probs of each chosen / rejected
        reply, computed once (each process a share, then summed)."""
        n = len(self.data.examples)
        out = torch.zeros(n, 2, dtype=torch.float64)
        mine = list(range(self.rank, n, self.world))
        for m in self._micro([(i, self.data.examples[i]) for i in mine]):
            batch = collate(preference_rows(m)).to(self.device)
            with self._autocast():
                logps, _ = document_logps(token_logps(self.model, batch), batch)
            out[torch.tensor([i for i, _ in m])] = logps.view(-1, 2).double().cpu()
        if self.world > 1:
            dist.all_reduce(out)
        return out.float()

    def _step(self) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self._pref_step() if self.preference else self._lm_step()
        if self.t.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.t.grad_clip))
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return metrics

    # ------------------------------------------------------------------ stages
    def _generate_pairs(self, stage: int):
        """New pairs from the current policy: `candidates` sampled replies per prompt, the scorer's
        best as chosen and worst as rejected (prompts whose candidates all score the same dropped)."""
        from ..data.chat import PreferenceExample
        from ..generation import GenerationConfig, generate
        if self.world > 1 and self.t.distributed == "fsdp":
            raise ConfigError(f"{self.source}: generating candidates needs distributed = 'ddp'")
        cfg = GenerationConfig(max_new_tokens=self.p.max_new_tokens, do_sample=True, temperature=float(self.p.temperature),
                               top_p=float(self.p.top_p), seed=self.t.seed * 1000 + stage)
        mine = []
        self.base.eval()
        for ex in self.data.examples[self.rank::self.world]:
            results = generate(self.base, self.tokenizer, [ex.messages] * self.p.candidates, cfg)
            scored = sorted(((float(self.scorer(ex.messages, r.text)), r.tokens) for r in results), key=lambda x: x[0])
            if scored[0][0] == scored[-1][0]:
                continue
            eos = [self.tokenizer.eos_token_id]
            mine.append(PreferenceExample(ex.prompt, scored[-1][1] + eos, scored[0][1] + eos, ex.where, ex.messages))
        self.base.train()
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
            mine = [e for part in gathered for e in part]
        return mine

    def _begin_stage(self, stage: int) -> None:
        if self.p.candidates > 0:
            if self.scorer is None:
                raise ConfigError(f"{self.source}: [preference] candidates > 0 needs a scorer")
            self.data = PreferenceData(self.tokenizer, None, seed=self.t.seed + stage,
                                       examples=self._generate_pairs(stage) or self.base_examples)
        else:
            self.data = PreferenceData(self.tokenizer, None, seed=self.t.seed + stage, examples=self.base_examples)
        self.ref_logps = self.reference_logps() if self.objective == "dpo" else None

    # ------------------------------------------------------------------ run
    def train(self, resume: bool = False) -> str:
        """Runs the recipe; returns the directory of the final model (out_dir/final, or
        out_dir/stage-N after N preference stages)."""
        torch.manual_seed(self.t.seed)
        random.seed(self.t.seed)
        ckpt = latest_checkpoint(self.t.out_dir) if resume else None
        self._load_model(ckpt or self.m.path)
        state = load_trainer_state(ckpt) if ckpt else None
        self.data = self._build_data()
        stages = self.p.stages if self.preference else 1
        stage, step = (state["stage"], state["step"]) if state else (0, 0)
        if self.preference:
            self.base_examples = self.data.examples
            if state:
                self.data = PreferenceData(self.tokenizer, None, seed=self.t.seed + stage, examples=state["examples"])
                self.ref_logps = state["ref_logps"]
            else:
                self._begin_stage(0)
        if state:
            self.data.load_state_dict(state["data"])
            self._restore(state)
        log = MetricsLog(os.path.join(self.t.out_dir, "metrics.jsonl"), enabled=self.rank == 0,
                         truncate_after=stage * self.t.steps + step)
        progress = Progress(stages * self.t.steps, stage * self.t.steps + step,
                            enabled=self.rank == 0 and self.t.progress)
        while stage < stages:
            while step < self.t.steps:
                t0 = time.perf_counter()
                metrics = self._step()
                step += 1
                global_step = stage * self.t.steps + step
                metrics.update(step=global_step, stage=stage, time=time.perf_counter() - t0)
                progress.update(global_step, metrics)
                if global_step % self.t.log_every == 0 or step == self.t.steps:
                    log.write(metrics)
                if self.t.save_every and global_step % self.t.save_every == 0:
                    self.save(f"checkpoint-{global_step:07d}", self._state(stage, step))
            if self.preference:
                self.save(f"stage-{stage + 1}", self._state(stage + 1, 0))
            stage, step = stage + 1, 0
            if self.preference and stage < stages:
                self._begin_stage(stage)
                self._make_optimizer()   # each stage a fresh optimizer and schedule
        progress.close()
        if self.preference:   # the last stage's policy is the result
            final = os.path.join(self.t.out_dir, f"stage-{stages}")
        else:
            self.save("final", self._state(stages, 0))
            final = os.path.join(self.t.out_dir, "final")
        if self.rank == 0 and self.t.plot:
            plot_loss(os.path.join(self.t.out_dir, "metrics.jsonl"), os.path.join(self.t.out_dir, "loss.png"),
                      title=f"{self.objective}: {os.path.basename(self.source)}")
        return final

    def _state(self, stage: int, step: int) -> dict:
        state = {"stage": stage, "step": step, "objective": self.objective, "data": self.data.state_dict()}
        if self.preference:
            state["examples"] = self.data.examples
            state["ref_logps"] = self.ref_logps
        return state


def _checkpoint_blocks(model) -> None:
    """Activation checkpointing: each block's activations are recomputed in backward instead of
    kept (needs the model's Block.forward). The blocks stay the same modules, so the state dict's
    names do not change."""
    from torch.utils.checkpoint import checkpoint
    blocks = model.transformer.h
    if not len(blocks) or type(blocks[0]).forward is torch.nn.Module.forward:
        raise ConfigError("activation_checkpointing needs a model whose blocks have forward(); this model runs "
                          "its layers inline")
    for block in blocks:
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
