import math

import pytest
import torch
import torch.nn.functional as F

from exaone_ext.training import causal_lm_loss, dpo_loss, sequence_logps, simpo_loss


def _softplus(x):  # -log sigmoid(-x), in Python floats
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


PC = [-10.0, -25.5, -7.25, -40.0]
PR = [-12.0, -20.0, -9.0, -40.5]
RC = [-11.0, -24.0, -8.0, -39.0]
RR = [-11.5, -22.0, -8.5, -41.0]
LC = [5, 17, 3, 30]
LR = [6, 9, 4, 31]


def _t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def test_dpo_closed_form():
    beta = 0.1
    loss, m = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=beta)
    z = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    assert loss.item() == pytest.approx(sum(_softplus(-x) for x in z) / 4, rel=1e-12)
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 4, rel=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 4, rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 4, rel=1e-12)
    assert m["rewards/accuracies"].item() == sum(c > r for c, r in zip(chosen, rejected)) / 4 == 0.5
    assert all(not v.requires_grad for v in m.values())


def test_simpo_closed_form():
    beta, gamma = 2.0, 0.5
    loss, m = simpo_loss(_t(PC), _t(PR), torch.tensor(LC), torch.tensor(LR), beta=beta, gamma=gamma)
    z = [beta * (pc / lc - pr / lr) - gamma for pc, pr, lc, lr in zip(PC, PR, LC, LR)]
    assert loss.item() == pytest.approx(sum(_softplus(-x) for x in z) / 4, rel=1e-12)
    chosen = [beta * pc / lc for pc, lc in zip(PC, LC)]
    rejected = [beta * pr / lr for pr, lr in zip(PR, LR)]
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen) / 4, rel=1e-12)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rejected) / 4, rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 4, rel=1e-12)
    assert m["rewards/accuracies"].item() == sum(c > r for c, r in zip(chosen, rejected)) / 4


def _central_difference(f, xs, i, j, eps=1e-6):
    up = [x.clone() for x in xs]
    dn = [x.clone() for x in xs]
    up[i][j] += eps
    dn[i][j] -= eps
    return (f(*up).item() - f(*dn).item()) / (2 * eps)


def test_dpo_gradients_by_finite_differences():
    xs = [_t(PC), _t(PR), _t(RC), _t(RR)]
    f = lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3)[0]
    leaves = [x.clone().requires_grad_(i < 2) for i, x in enumerate(xs)]
    f(*leaves).backward()
    for i in (0, 1):
        for j in range(4):
            assert leaves[i].grad[j].item() == pytest.approx(_central_difference(f, xs, i, j), rel=1e-6, abs=1e-9)
    # the reference log-probs are constants of the stage
    ref = [x.clone().requires_grad_() for x in xs]
    f(*ref).backward()
    assert ref[2].grad is None or torch.equal(ref[2].grad, torch.zeros(4, dtype=torch.float64))


def test_simpo_gradients_by_finite_differences():
    xs = [_t(PC), _t(PR)]
    lc, lr = torch.tensor(LC), torch.tensor(LR)
    f = lambda a, b: simpo_loss(a, b, lc, lr)[0]
    leaves = [x.clone().requires_grad_() for x in xs]
    f(*leaves).backward()
    for i in (0, 1):
        for j in range(4):
            assert leaves[i].grad[j].item() == pytest.approx(_central_difference(f, xs, i, j), rel=1e-6, abs=1e-9)
    assert torch.autograd.gradcheck(f, tuple(x.clone().requires_grad_() for x in xs))


def test_preference_bad_inputs():
    with pytest.raises(ValueError, match="dpo_loss: 'ref_chosen_logps' must have the shape of 'policy_chosen_logps'"):
        dpo_loss(_t(PC), _t(PR), _t(RC[:3]), _t(RR))
    with pytest.raises(ValueError, match=r"simpo_loss: 'policy_chosen_logps' must be \[batch\]"):
        simpo_loss(_t([PC]), _t([PR]), torch.tensor([LC]), torch.tensor([LR]))
    with pytest.raises(ValueError, match="positive token counts"):
        simpo_loss(_t(PC), _t(PR), torch.tensor([5, 0, 3, 1]), torch.tensor(LR))
    with pytest.raises(TypeError, match="'chosen_lengths' must be a torch.Tensor"):
        simpo_loss(_t(PC), _t(PR), LC, torch.tensor(LR))


def test_sequence_logps_rows_cu_seqlens_and_segments():
    lp = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sums, lengths = sequence_logps(lp, mask, return_lengths=True)
    torch.testing.assert_close(sums, (lp * mask).sum(-1))
    assert lengths.tolist() == [3, 6]
    # packed: three sequences of 3, 0 and 4 tokens, one trailing padding token
    flat = torch.randn(8, requires_grad=True)
    m = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    s, n = sequence_logps(flat, m, cu_seqlens=cu, return_lengths=True)
    want = [flat[0] + flat[1], torch.tensor(0.0), flat[3] + flat[5] + flat[6]]
    torch.testing.assert_close(s, torch.stack(want))
    assert n.tolist() == [2, 0, 3]
    seg = torch.tensor([0, 0, 0, 2, 2, 2, 2, -1])
    torch.testing.assert_close(sequence_logps(flat, m, segment_ids=seg, num_sequences=3), s)
    s.sum().backward()
    assert flat.grad.tolist() == [1, 1, 0, 1, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="'cu_seqlens' must start at 0"):
        sequence_logps(flat, m, cu_seqlens=torch.tensor([0, 5, 3]))
    with pytest.raises(ValueError, match="'loss_mask' must be a tensor of the shape"):
        sequence_logps(flat, m[:4], cu_seqlens=cu)


def test_causal_lm_loss_shifts_labels():
    h = torch.randn(2, 9, 32, dtype=torch.float64)
    w = torch.randn(50, 32, dtype=torch.float64) * 0.3
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    logits = h @ w.T
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(h, w, labels, chunk_size=5), ref)
    shifted = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(causal_lm_loss(h, w, labels, shift=False), shifted)


def test_dpo_through_the_fused_op_matches_log_softmax():
    """Sequence log-probs from -linear_cross_entropy(reduction="none") feed DPO; loss and gradients
    equal the same pipeline over full log-softmax logits."""
    b, s, d, v = 4, 7, 16, 40
    h = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(v, d, dtype=torch.float64) * 0.3).requires_grad_()
    tgt = torch.randint(0, v, (b, s))
    tgt[:, :2] = -100  # prompt tokens
    ref_logps = torch.randn(b, dtype=torch.float64)

    def pipeline(per_token):
        mask = tgt != -100
        logps = sequence_logps(per_token, mask)
        return dpo_loss(logps[0::2], logps[1::2], ref_logps[0::2], ref_logps[1::2], beta=0.5)[0]

    from exaone_ext.ops import linear_cross_entropy
    ours = pipeline(-linear_cross_entropy(h, w, tgt, reduction="none", chunk_size=3))
    ours.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    lsm = torch.log_softmax(h @ w.T, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    ref = pipeline(torch.where(tgt == -100, 0.0, lsm))
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)
