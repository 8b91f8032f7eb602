"""A small EXAONE-style block built from every exaone_ext op, compiled with fullgraph=True: the
compiled graph must contain our ops (not graph breaks) and match eager, forward and backward."""
import torch

from exaone_ext import ops

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


class Block(torch.nn.Module):
    def __init__(self, hidden=64, heads=4, kv_heads=2, head_dim=64, inter=96):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.ln_1 = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.ln_2 = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.qkv = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.out = torch.nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        cos, sin = ops.rope_cos_sin(head_dim, 16384, 1e6, LLAMA3)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x, residual, position_ids):
        b, s, _ = x.shape
        h_norm, h = ops.add_rms_norm(x, residual, self.ln_1, 1e-5)
        qkv = self.qkv(h_norm)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.heads, self.head_dim)          # [b, s, hq, d]
        k = k.view(b, s, self.kv_heads, self.head_dim)       # [b, s, hk, d]
        v = v.view(b, s, self.kv_heads, self.head_dim)
        q, k = ops.apply_rope(q, k, self.cos, self.sin, position_ids)
        attn = ops.flash_attn(q, k, v, causal=True)           # [b, s, hq, d]
        h = h + self.out(attn.reshape(b, s, -1))
        y = ops.swiglu(self.gate_up(ops.rms_norm(h, self.ln_2, 1e-5)))
        return h + self.down(y)


def test_block_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 17, 64, requires_grad=True)
    r = torch.randn(2, 17, 64)
    pos = torch.arange(17)[None].repeat(2, 1) + 9000
    eager = block(x, r, pos)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    out = compiled(x, r, pos)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    for name in ("add_rms_norm", "apply_rope", "flash_attn_fwd", "swiglu", "rms_norm"):
        assert any(f"exaone_ext.{name}" in t for t in seen), f"{name} missing from the compiled graph"
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-5)

    inductor = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(inductor(x, r, pos), eager, rtol=1e-4, atol=1e-4)
