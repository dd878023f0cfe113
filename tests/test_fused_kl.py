"""The fused log-probs + KL(pi_ref || pi_theta) op (ASFT, sft_kl) against float64 written here from both models'
full logits: the label log-probs, the full-vocabulary KL at every position, and the gradients of the policy's hidden
states and output weight for upstream gradients on both outputs (masked positions included), at TP = 1, 2 and 2
with sequence parallelism, a padded vocabulary (and a shard of padding only), and chunks that do and do not divide
the positions. The reference gets no gradient."""

import pytest
import torch

from tests.distributed import spawn
from tests.test_fused_logprobs import HIDDEN, PADDED, ROWS, SEQ, VOCAB, rel_err

RTOL = 1e-6


def kl_inputs(vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(ROWS, SEQ, HIDDEN, generator=gen, dtype=torch.float64)
    ref_hidden = hidden + 0.5 * torch.randn(ROWS, SEQ, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=gen, dtype=torch.float64) * 0.5
    ref_weight = weight + 0.2 * torch.randn(PADDED, HIDDEN, generator=gen, dtype=torch.float64)
    weight[vocab:] = ref_weight[vocab:] = 3.0  # padding rows: large logits that must take no probability
    labels = torch.randint(0, vocab, (ROWS, SEQ), generator=gen)
    up_logp = torch.randn(ROWS, SEQ, generator=gen, dtype=torch.float64)
    up_kl = torch.rand(ROWS, SEQ, generator=gen, dtype=torch.float64)
    up_logp[1, 2:5] = up_kl[1, 2:5] = 0  # masked positions: no gradient
    up_kl[2, :3] = 0  # a position with a log-prob gradient only
    return hidden, ref_hidden, weight, ref_weight, labels, up_logp, up_kl


def expected(hidden, ref_hidden, weight, ref_weight, labels, up_logp, up_kl, vocab):
    """float64 from the full logits: (logp, kl, d hidden, d weight)."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_p = (hidden @ weight[:vocab].t()).log_softmax(-1)  # [b, s, V]
    log_r = (ref_hidden @ ref_weight[:vocab].t()).log_softmax(-1)
    logp = log_p.gather(-1, labels[..., None])[..., 0]
    kl = (log_r.exp() * (log_r - log_p)).sum(-1)
    ((logp * up_logp).sum() + (kl * up_kl).sum()).backward()
    return logp.detach(), kl.detach(), hidden.grad, weight.grad


def kl_worker(tp: int, sp: bool, chunk: int, vocab: int, hidden, ref_hidden, weight, ref_weight, labels, up_logp,
              up_kl):
    """The fused op on this rank's shards: its outputs, and the gradients of this rank's hidden states (its sequence
    part under SP; the output layer's region reduces them over TP) and output-weight rows."""
    from minorsft_megatron import parallel
    from minorsft_megatron.device import setup_device
    from minorsft_megatron.logprobs import fused_log_probs_and_kl

    pgs = parallel.initialize(setup_device("cpu"), tp=tp)
    rank = torch.distributed.get_rank(pgs.tp)
    w, w_ref = (x.float().chunk(tp)[rank].clone().requires_grad_() for x in (weight, ref_weight))
    h, h_ref = ((x.float().chunk(tp, dim=1)[rank] if sp else x.float()).clone().requires_grad_()
                for x in (hidden, ref_hidden))
    logp, kl = fused_log_probs_and_kl(h, w, h_ref, w_ref, labels, vocab, pgs.tp, sp, chunk)
    ((logp * up_logp.float()).sum() + (kl * up_kl.float()).sum()).backward()
    return {"logp": logp.detach(), "kl": kl.detach(), "hidden": h.grad, "weight": w.grad, "ref_weight": w_ref.grad,
            "ref_hidden": h_ref.grad, "rank": rank, "first_row": rank * w.size(0)}


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2sp"])
@pytest.mark.parametrize("chunk,vocab", [(8, VOCAB), (7, VOCAB), (1024, 20)], ids=["chunk8", "chunk7", "padshard"])
def test_fused_kl_equals_float64_from_full_logits(tmp_path, tp, sp, chunk, vocab):
    inputs = kl_inputs(vocab)
    want_logp, want_kl, want_hidden, want_weight = expected(*inputs, vocab)
    assert want_kl.min() > 0
    ranks = spawn(tp, kl_worker, tp, sp, chunk, vocab, *inputs, out_dir=tmp_path)
    for r in ranks:
        assert rel_err(r["logp"].double(), want_logp) <= RTOL and rel_err(r["kl"].double(), want_kl) <= RTOL
        hidden = want_hidden.chunk(tp, dim=1)[r["rank"]] if sp else want_hidden
        assert rel_err(r["hidden"].double(), hidden) <= RTOL, r["rank"]
        assert rel_err(r["weight"].double(), want_weight.chunk(tp)[r["rank"]]) <= RTOL, r["rank"]
        assert torch.all(r["weight"][max(vocab - r["first_row"], 0):] == 0)  # padding rows: no gradient
        assert r["ref_weight"] is None and r["ref_hidden"] is None  # the reference is a constant
