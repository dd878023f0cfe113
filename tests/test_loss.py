"""Every registered loss against a float64 autograd reference written here from the paper's formulas."""

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
    raise AssertionError(name)


def test_registry_holds_the_four_losses():
    assert set(LOSSES) == {"sft", "sft_seq", "minor_sft", "sft_dpo"}
    assert get_loss("sft").denominator == "tokens"
    assert {get_loss(n).denominator for n in ("sft_seq", "minor_sft", "sft_dpo")} == {"sequences"}
    with pytest.raises(ValueError, match="unknown loss 'dpo'"):
        get_loss("dpo")


@pytest.mark.parametrize("name", sorted(["sft", "sft_seq", "minor_sft", "sft_dpo"]))
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
        loss_sum, denominator, sums, maxes = loss_and_stats(spec, logp, torch.zeros(3), m, BETA)
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
