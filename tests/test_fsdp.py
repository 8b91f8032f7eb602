"""FSDP2 (`fully_shard`) on a real 2-process gloo run of a tiny model: every block and the root
sharded, the loss and gradients equal the unsharded model's, and the blocks' parameters are
sharded DTensors that are gathered for their forward and freed (resharded) after it."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exaone_ext.model import ExaoneConfig, ExaoneForCausalLM

WORLD = 2
CONFIG = dict(vocab_size=96, hidden_size=128, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=True)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _worker(rank: int, rdv: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same weights and batch on both ranks
        model = ExaoneForCausalLM(ExaoneConfig(**CONFIG))
        model.reset_parameters(0.1)
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
        reference = ExaoneForCausalLM(ExaoneConfig(**CONFIG))
        reference.load_state_dict(model.state_dict())
        ref_loss = _loss(reference(ids), ids)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

        seen = []  # what a block's weight is while the block runs

        def probe(module, args):
            w = module.c_proj.weight
            seen.append({"dtensor": isinstance(w, DTensor), "shape": list(w.shape)})

        handles = [b.mlp.register_forward_pre_hook(probe) for b in model.transformer.h]
        w_before = model.transformer.h[0].mlp.c_proj.weight
        sharded_before = {"dtensor": isinstance(w_before, DTensor), "local": list(w_before.to_local().shape),
                          "global": list(w_before.shape)}
        loss = _loss(model(ids), ids)
        w_after = model.transformer.h[1].mlp.c_proj.weight
        after_forward = {"dtensor": isinstance(w_after, DTensor), "local": list(w_after.to_local().shape)}
        loss.backward()
        for h in handles:
            h.remove()
        grad_err = 0.0
        for n, p in model.named_parameters():
            full = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grad_err = max(grad_err, ((full - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item())
        all_blocks_sharded = all(isinstance(p, DTensor) for b in model.transformer.h for p in b.parameters())
        result = {"loss": loss.item(), "ref_loss": ref_loss.item(), "grad_err": grad_err, "seen": seen,
                  "before": sharded_before, "after_forward": after_forward, "all_blocks_sharded": all_blocks_sharded}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()  # both ranks past every collective before the group is torn down
    finally:
        dist.destroy_process_group()
    # The results are on disk and the group is down: leave without interpreter finalisation, where
    # gloo's worker threads can still abort the process (SIGABRT; seen in CI and in one local full run
    # even after the barrier above). A failure above still raises and fails the test.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fully_shard_blocks_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rdv"), str(tmp_path)), nprocs=WORLD, join=True)
    d, i = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    for rank in range(WORLD):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # the sharded model computes the unsharded model's loss and gradients
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), r
        assert r["grad_err"] < 1e-5, r
        # at rest: a DTensor of global shape [d, i], each rank holding half of its rows
        assert r["all_blocks_sharded"]
        assert r["before"] == {"dtensor": True, "local": [d // WORLD, i], "global": [d, i]}
        # inside each block's forward: the whole weight, as a plain tensor (gathered)
        assert r["seen"] == [{"dtensor": False, "shape": [d, i]}] * CONFIG["num_layers"]
        # after the forward: resharded, the full weight freed
        assert r["after_forward"] == {"dtensor": True, "local": [d // WORLD, i]}
