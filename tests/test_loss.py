"""Every registered loss against a float64 autograd reference written here from the papers' formulas: sequence-level
losses on per-sequence sums, token-level ones on per-token log-probs (with m = 0 rows), through the same
loss_and_stats path and the package's per-sequence answer sums."""

import math

import pytest
import torch

from minorsft_megatron.loss import LOSSES, get_loss, loss_and_stats, metrics_from_stats

BETA = 0.04


def random_inputs(n=12, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randint(0, 40, (n,), generator=gen)
    m[[2, 7]] = 0  # sequences with no answer token
    logp = -(torch.rand(n, generator=gen, dtype=torch.float64) * 3 + 0.1) * m  # sum of m log-probs
    ref = logp + torch.randn(n, generator=gen, dtype=torch.float64) * 20 * (m > 0)
    return logp.to(dtype), ref.to(dtype), m


def reference_loss(name, logp, ref, m, beta):
    """The global-batch loss in float64, written from the paper; m = 0 sequences are dropped first."""
    keep = m > 0
    logp, ref, m = logp[keep], ref[keep], m[keep].double()
    d = logp - ref
    if name == "sft":  # Megatron's token mean
        return -logp.sum() / m.sum()
    if name == "sft_seq":  # paper eq. 5's loss: -E[(1/m) log pi]
        return -(logp / m).mean()
    if name == "minor_sft":  # gradient -E[(2/m) sigmoid(-beta D) grad log pi] (eq. 7)
        weight = 2.0 / (1.0 + torch.exp(beta * d.detach()))
        return -(weight * logp / m).mean()
    if name == "sft_dpo":  # -E[log sigmoid(beta D)]
        return torch.log1p(torch.exp(-beta * d)).mean()
    if name == "iw_sft":  # arXiv 2507.12856: clamp(exp(D / m), 0, 16), detached, on the summed NLL, token mean
        weight = torch.exp(d.detach() / m).clamp(max=16.0)
        return -(weight * logp).sum() / m.sum()
    raise AssertionError(name)


SEQUENCE_LOSSES = ["sft", "sft_seq", "minor_sft", "sft_dpo", "iw_sft"]
TOKEN_LOSSES = ["dft", "iw_sft_token", "asft", "sft_kl"]
KL_COEF = 0.1


def test_registry_holds_the_losses():
    assert set(LOSSES) == set(SEQUENCE_LOSSES + TOKEN_LOSSES)
    assert {get_loss(n).denominator for n in ("sft", "iw_sft", "dft", "iw_sft_token")} == {"tokens"}
    assert {get_loss(n).denominator for n in ("sft_seq", "minor_sft", "sft_dpo")} == {"sequences"}
    assert {n for n, spec in LOSSES.items() if spec.level == "token"} == set(TOKEN_LOSSES)
    assert not get_loss("dft").needs_reference and get_loss("iw_sft_token").reads == {"ref_tokens"}
    assert get_loss("asft").reads == get_loss("sft_kl").reads == {"ref_logits"}
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        get_loss("dpo")


@pytest.mark.parametrize("name", SEQUENCE_LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_match_float64_reference(name, seed):
    logp, ref, m = random_inputs(seed=seed)
    logp64 = logp.double().requires_grad_()
    expected = reference_loss(name, logp64, ref.double(), m, BETA)
    expected.backward()

    logp32 = logp.clone().requires_grad_()
    loss_sum, denominator, _, _ = loss_and_stats(get_loss(name), logp32, ref, m, BETA)
    loss = loss_sum / denominator  # the single division by the global denominator
    loss.backward()

    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp32.grad.double(), logp64.grad, rtol=1e-5, atol=1e-9)
    assert torch.all(logp32.grad[m == 0] == 0)
    assert torch.isfinite(loss)


def random_tokens(n=10, length=15, seed=0):
    """Per-token log-probs [n, L], a reference's, and answer masks with rows 2 and 7 empty."""
    gen = torch.Generator().manual_seed(seed)
    token_logp = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 4  # p_t from 0.02 to 1
    ref_token_logp = token_logp + torch.randn(n, length, generator=gen, dtype=torch.float64)  # ratios 0.1 to 10
    mask = torch.rand(n, length, generator=gen) < 0.6
    mask[[2, 7]] = False
    return token_logp, ref_token_logp, mask


def reference_token_loss(name, token_logp, ref_token_logp, kl, mask):
    """The global-batch token-level loss in float64, from the papers: a mean over all answer tokens."""
    logp, ref, kl = token_logp[mask], ref_token_logp[mask], kl[mask]
    if name == "dft":  # arXiv 2508.05629 eq. 9: sg(p_t) * -log p_t
        return -(torch.exp(logp).detach() * logp).sum() / mask.sum()
    if name == "asft":  # arXiv 2509.23753: DFT + lambda KL(pi_ref || pi_theta)
        return (-(torch.exp(logp).detach() * logp) + KL_COEF * kl).sum() / mask.sum()
    if name == "sft_kl":  # NLL + lambda KL(pi_ref || pi_theta)
        return (-logp + KL_COEF * kl).sum() / mask.sum()
    if name == "iw_sft_token":  # clamp(p_t / p_ref,t, 0.2, 1.8), detached
        return -((torch.exp(logp) / torch.exp(ref)).detach().clamp(0.2, 1.8) * logp).sum() / mask.sum()
    raise AssertionError(name)


@pytest.mark.parametrize("name", TOKEN_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_token_level_value_and_gradient_match_float64_reference(name, seed):
    from minorsft_megatron.data.batch import SFTBatch
    from minorsft_megatron.logprobs import answer_sums

    token_logp, ref_token_logp, mask = random_tokens(seed=seed)
    kl = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    want_in, want_kl = token_logp.clone().requires_grad_(), kl.clone().requires_grad_()
    expected = reference_token_loss(name, want_in, ref_token_logp, want_kl, mask)
    expected.backward()
    got_in, got_kl = token_logp.float().requires_grad_(), kl.float().requires_grad_()
    garbage = torch.where(mask, got_in, torch.full_like(got_in, float("inf")))  # off the answer: never summed
    kl_garbage = torch.where(mask, got_kl, torch.full_like(got_kl, float("nan")))
    spec = get_loss(name)
    batch = SFTBatch(tokens=torch.zeros(mask.shape, dtype=torch.long), labels=torch.zeros(mask.shape, dtype=torch.long),
                     loss_mask=mask.float(), position_ids=torch.zeros(mask.shape, dtype=torch.long))
    per_token = spec.fn(garbage, ref_token_logp.float(), kl_garbage, BETA, KL_COEF)
    sums = answer_sums(batch, [garbage, torch.ones_like(garbage), per_token], None)
    ref_sum = (ref_token_logp * mask).sum(-1).float()
    loss_sum, denominator, stats, _ = loss_and_stats(spec, sums[0], ref_sum, sums[1].round().long(), BETA,
                                                     token_loss_sum=sums[2], token_prob_sum=sums[0].detach().exp())
    loss = loss_sum / denominator
    loss.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_in.grad.double(), want_in.grad, rtol=1e-5, atol=1e-9)
    if got_kl.grad is not None or want_kl.grad is not None:
        torch.testing.assert_close(got_kl.grad.double(), want_kl.grad, rtol=1e-5, atol=1e-9)
        assert torch.all(got_kl.grad[~mask] == 0)
    assert torch.all(got_in.grad[~mask] == 0) and torch.isfinite(loss)


def test_token_prob_mean_is_the_mean_answer_token_probability():
    token_logp, _, mask = random_tokens(seed=3)
    m = mask.sum(-1)
    p_sum = torch.where(mask, token_logp.exp(), 0.0).sum(-1)
    _, _, sums, maxes = loss_and_stats(get_loss("dft"), (token_logp * mask).sum(-1), None, m, BETA,
                                       token_loss_sum=torch.zeros(len(m), dtype=torch.float64), token_prob_sum=p_sum)
    metrics = metrics_from_stats(sums, maxes, has_reference=False)
    torch.testing.assert_close(metrics["token_prob_mean"], token_logp.exp()[mask].mean())


def test_minor_sft_gradient_is_paper_eq7():
    logp, ref, m = random_inputs(seed=3, dtype=torch.float64)
    logp = logp.requires_grad_()
    loss_sum, denominator, _, _ = loss_and_stats(get_loss("minor_sft"), logp, ref, m, BETA)
    (loss_sum / denominator).backward()
    keep = m > 0
    d = (logp - ref).detach()
    eq7 = -(2.0 / m.clamp(min=1)) * torch.sigmoid(-BETA * d) / keep.sum()
    torch.testing.assert_close(logp.grad, torch.where(keep, eq7, torch.zeros_like(eq7)))


def test_all_empty_batch_is_zero_not_nan():
    m = torch.zeros(3, dtype=torch.long)
    logp = torch.zeros(3, requires_grad=True)
    for name, spec in LOSSES.items():
        loss_sum, denominator, sums, maxes = loss_and_stats(spec, logp, torch.zeros(3), m, BETA,
                                                            token_loss_sum=logp * 0, token_prob_sum=logp * 0)
        assert loss_sum.item() == 0 and denominator.item() == 0, name
        metrics = metrics_from_stats(sums, maxes, has_reference=True)
        assert metrics["num_empty_sequences"] == 3
        assert all(not torch.isnan(v) for v in metrics.values()), name


def test_metrics_are_detached_and_follow_eq8():
    logp, ref, m = random_inputs(seed=4)
    logp.requires_grad_()
    _, _, sums, maxes = loss_and_stats(get_loss("sft"), logp, ref, m, BETA)
    assert not sums.requires_grad and not maxes.requires_grad
    metrics = metrics_from_stats(sums, maxes, has_reference=True)
    keep = m > 0
    d = (logp.detach().double() - ref.double())[keep]
    mm = m[keep].double()
    weights = 2 * torch.sigmoid(-BETA * d)
    torch.testing.assert_close(metrics["m_theta"], (d / mm).mean())
    torch.testing.assert_close(metrics["reward_mean"], (BETA * d).mean())
    torch.testing.assert_close(metrics["weight_min"], weights.min())
    torch.testing.assert_close(metrics["weight_max"], weights.max())
    torch.testing.assert_close(metrics["logp_per_token"], (logp.detach().double()[keep] / mm).mean())
    torch.testing.assert_close(metrics["ref_logp_per_token"], (ref.double()[keep] / mm).mean())
    assert metrics["num_empty_sequences"] == 2 and metrics["num_answer_tokens"] == m.sum()


def test_sft_without_reference_has_no_reference_metrics():
    logp, _, m = random_inputs(seed=5)
    _, _, sums, maxes = loss_and_stats(get_loss("sft_seq"), logp, None, m, BETA)
    metrics = metrics_from_stats(sums, maxes, has_reference=False)
    assert "m_theta" not in metrics and math.isfinite(metrics["loss"].item())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 0.0}, "beta must be a number > 0, got 0.0"),
        ({"beta": -1}, "beta must be a number > 0"),
        ({"ref": torch.zeros(5)}, r"ref_logp_sum \(5,\) and logp_sum \(6,\)"),
        ({"m": torch.ones(4, dtype=torch.long)}, r"num_answer_tokens \(4,\) and logp_sum \(6,\)"),
        ({"m": torch.ones(6)}, "num_answer_tokens must be an integer tensor, got torch.float32"),
        ({"ref": torch.zeros(6, dtype=torch.float64)}, "ref_logp_sum is torch.float64 but logp_sum is torch.float32"),
        ({"logp": torch.zeros(2, 3)}, r"logp_sum must be a 1-D float tensor \[n\], got \(2, 3\)"),
        ({"ref": None}, "this loss needs ref_logp_sum"),
    ],
)
def test_bad_inputs_name_what_is_wrong(kwargs, match):
    args = {"logp": torch.zeros(6), "ref": torch.zeros(6), "m": torch.ones(6, dtype=torch.long), "beta": BETA}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        loss_and_stats(get_loss("minor_sft"), args["logp"], args["ref"], args["m"], args["beta"])
