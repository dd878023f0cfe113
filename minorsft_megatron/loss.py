"""MinorSFT, its baselines and the reference-aware SFT family as pure functions, plus step metrics.

A loss is one of two kinds. A SEQUENCE-level loss maps, for `n` sequences of one micro-batch,
    logp_sum          [n] float  sum over answer tokens of log pi_theta(y_t | x, y_<t)   (differentiable)
    ref_logp_sum      [n] float  the same under the frozen reference pi_ref, or None      (constant)
    num_answer_tokens [n] int    m, the number of answer tokens
    beta              float > 0
to a per-sequence loss `[n]`. A TOKEN-level loss maps each position's
    token_logp        [...] float  log p_t = log pi_theta(y_t | x, y_<t)                  (differentiable)
    ref_token_logp    [...] float  log pi_ref(y_t | x, y_<t), or None                     (constant)
    kl                [...] float  KL(pi_ref || pi_theta) over the vocabulary at t, or None (differentiable)
    beta, kl_coef     float > 0
to a per-token loss `[...]`, which the caller sums over each sequence's answer tokens (selection, not
multiplication: other positions never reach the sum). Either way the per-sequence losses are summed BEFORE
division by the global denominator the loss declares: the number of sequences or of answer tokens in the whole
global batch. Sequences with m = 0 get loss 0 (with zero gradient) and are counted apart; they never make NaN.
`LossSpec.reads` says which inputs a loss needs, so that the log-prob op and the reference produce those alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

SEQUENCES = "sequences"
TOKENS = "tokens"


REF_SUMS = "ref_sums"  # the reference's per-sequence sums (ref_logp_sum): a cache can serve them
REF_TOKENS = "ref_tokens"  # the reference's per-token log-probs (ref_token_logp): a reference model must run
REF_LOGITS = "ref_logits"  # the reference's whole next-token distribution: kl = KL(pi_ref || pi_theta) per token


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, its level, what the global batch is divided by, and what it reads."""

    fn: Callable[..., torch.Tensor]
    """SEQUENCE level: fn(logp_sum, ref_logp_sum, num_answer_tokens, beta) -> [n] per-sequence loss.
    TOKEN level: fn(token_logp, ref_token_logp, kl, beta, kl_coef) -> per-token loss of token_logp's shape."""
    denominator: Literal["sequences", "tokens"]
    """SEQUENCES: divide by the number of sequences with m > 0; TOKENS: by the number of answer tokens."""
    reads: frozenset = frozenset()
    """Of REF_SUMS, REF_TOKENS and REF_LOGITS, what fn reads beside the policy's log-probs."""
    level: Literal["sequence", "token"] = "sequence"

    @property
    def needs_reference(self) -> bool:
        return bool(self.reads)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, denominator: str, reads: tuple = (), level: str = "sequence"):
    """Decorator adding a loss function to LOSSES under `name`."""
    if denominator not in (SEQUENCES, TOKENS):
        raise ValueError(f"denominator must be {SEQUENCES!r} or {TOKENS!r}, got {denominator!r}")
    if level not in ("sequence", "token") or not set(reads) <= {REF_SUMS, REF_TOKENS, REF_LOGITS}:
        raise ValueError(f"bad level {level!r} or reads {reads!r}")

    def add(fn):
        LOSSES[name] = LossSpec(fn=fn, denominator=denominator, reads=frozenset(reads), level=level)
        return fn

    return add


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`; ValueError listing the known ones otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# ---------------------------------------------------------------------------------------------- checks


def check_inputs(logp_sum, ref_logp_sum, num_answer_tokens, beta, needs_reference=True) -> None:
    """ValueError naming the offending shapes, dtypes or value; nothing is computed."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if logp_sum.dim() != 1 or not logp_sum.is_floating_point():
        raise ValueError(f"logp_sum must be a 1-D float tensor [n], got {tuple(logp_sum.shape)} {logp_sum.dtype}")
    if num_answer_tokens.shape != logp_sum.shape:
        raise ValueError(
            f"num_answer_tokens {tuple(num_answer_tokens.shape)} and logp_sum {tuple(logp_sum.shape)} "
            "must have the same shape [n]"
        )
    if num_answer_tokens.is_floating_point() or num_answer_tokens.is_complex():
        raise ValueError(f"num_answer_tokens must be an integer tensor, got {num_answer_tokens.dtype}")
    if ref_logp_sum is None:
        if needs_reference:
            raise ValueError("this loss needs ref_logp_sum, got None")
        return
    if ref_logp_sum.shape != logp_sum.shape:
        raise ValueError(
            f"ref_logp_sum {tuple(ref_logp_sum.shape)} and logp_sum {tuple(logp_sum.shape)} "
            "must have the same shape [n]"
        )
    if ref_logp_sum.dtype != logp_sum.dtype:
        raise ValueError(f"ref_logp_sum is {ref_logp_sum.dtype} but logp_sum is {logp_sum.dtype}")


# ----------------------------------------------------------------------------------------------- math


def _has_answer(num_answer_tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (num_answer_tokens > 0).to(like.dtype)  # [n] 1.0 where m > 0


def _per_token(value: torch.Tensor, num_answer_tokens: torch.Tensor) -> torch.Tensor:
    """value / m, and 0 where m = 0 (never 0/0)."""
    m = num_answer_tokens.clamp(min=1).to(value.dtype)
    return value / m * _has_answer(num_answer_tokens, value)


def deviation(logp_sum, ref_logp_sum):
    """D = log pi_theta(y|x) - log pi_ref(y|x), per sequence [n]; the reference is a constant."""
    return logp_sum - ref_logp_sum.detach()


def minor_sft_weight(logp_sum, ref_logp_sum, beta):
    """2 * sigmoid(-beta * D) per sequence [n], detached: exactly 1 where pi_theta == pi_ref."""
    return 2.0 * torch.sigmoid(-beta * deviation(logp_sum, ref_logp_sum).detach())


@register_loss("sft", denominator=TOKENS)
def sft_loss(logp_sum, ref_logp_sum, num_answer_tokens, beta):
    """Megatron's token-mean NLL: -logp_sum, divided by the global number of answer tokens."""
    return -logp_sum * _has_answer(num_answer_tokens, logp_sum)


@register_loss("sft_seq", denominator=SEQUENCES)
def sft_seq_loss(logp_sum, ref_logp_sum, num_answer_tokens, beta):
    """The paper's raw SFT: -logp_sum / m, divided by the global number of sequences."""
    return -_per_token(logp_sum, num_answer_tokens)


@register_loss("minor_sft", denominator=SEQUENCES, reads=(REF_SUMS,))
def minor_sft_loss(logp_sum, ref_logp_sum, num_answer_tokens, beta):
    """MinorSFT: -(2/m) * stopgrad(sigmoid(-beta * D)) * logp_sum; gradient is the paper's eq. 7."""
    weight = minor_sft_weight(logp_sum, ref_logp_sum, beta)  # [n], no gradient
    return -_per_token(weight * logp_sum, num_answer_tokens)


@register_loss("sft_dpo", denominator=SEQUENCES, reads=(REF_SUMS,))
def sft_dpo_loss(logp_sum, ref_logp_sum, num_answer_tokens, beta):
    """The paper's "SFT using DPO": -log sigmoid(beta * D)."""
    loss = -F.logsigmoid(beta * deviation(logp_sum, ref_logp_sum))
    return loss * _has_answer(num_answer_tokens, logp_sum)


IW_SFT_MAX_WEIGHT = 16.0
"""iw-SFT's sequence weights are clamped to [0, 16] (its authors' code)."""
IW_SFT_TOKEN_CLIP = (0.2, 1.8)
"""iw-SFT's token-level weights are clamped to [0.2, 1.8] (its authors' code)."""


@register_loss("iw_sft", denominator=TOKENS, reads=(REF_SUMS,))
def iw_sft_loss(logp_sum, ref_logp_sum, num_answer_tokens, beta):
    """iw-SFT (arXiv 2507.12856), sequence weights: -stopgrad(clamp(exp(D / m), 0, 16)) * logp_sum, divided by the
    global number of answer tokens. beta is not used."""
    weight = torch.exp(_per_token(deviation(logp_sum, ref_logp_sum), num_answer_tokens)).clamp(
        0.0, IW_SFT_MAX_WEIGHT).detach()  # [n], exp(0) = 1 where m = 0
    return -weight * logp_sum * _has_answer(num_answer_tokens, logp_sum)


@register_loss("dft", denominator=TOKENS, level="token")
def dft_loss(token_logp, ref_token_logp, kl, beta, kl_coef):
    """DFT (arXiv 2508.05629): -stopgrad(p_t) * log p_t per answer token, divided by the global number of answer
    tokens. beta is not used."""
    return -torch.exp(token_logp.detach()) * token_logp


@register_loss("iw_sft_token", denominator=TOKENS, reads=(REF_TOKENS,), level="token")
def iw_sft_token_loss(token_logp, ref_token_logp, kl, beta, kl_coef):
    """iw-SFT's token-level variant: -stopgrad(clamp(p_t / p_ref,t, 0.2, 1.8)) * log p_t per answer token, divided
    by the global number of answer tokens. beta is not used."""
    low, high = IW_SFT_TOKEN_CLIP
    weight = torch.exp(token_logp.detach() - ref_token_logp.detach()).clamp(low, high)
    return -weight * token_logp


@register_loss("asft", denominator=TOKENS, reads=(REF_LOGITS,), level="token")
def asft_loss(token_logp, ref_token_logp, kl, beta, kl_coef):
    """ASFT (arXiv 2509.23753): DFT's -stopgrad(p_t) * log p_t plus kl_coef * KL(pi_ref || pi_theta) over the full
    vocabulary at each answer token, divided by the global number of answer tokens."""
    return dft_loss(token_logp, ref_token_logp, kl, beta, kl_coef) + kl_coef * kl


@register_loss("sft_kl", denominator=TOKENS, reads=(REF_LOGITS,), level="token")
def sft_kl_loss(token_logp, ref_token_logp, kl, beta, kl_coef):
    """KL-regularised SFT (ASFT's "sft+kl" mode): -log p_t + kl_coef * KL(pi_ref || pi_theta) per answer token,
    divided by the global number of answer tokens."""
    return -token_logp + kl_coef * kl


# -------------------------------------------------------------------------------- sums for one batch

# Per-micro-batch statistics, summed over micro-batches and data-parallel ranks, then divided once.
SUM_STATS = (
    "loss_sum",  # sum of per-sequence losses
    "denominator",  # sequences or answer tokens, as the loss declares
    "num_sequences",  # sequences with m > 0
    "num_empty_sequences",  # sequences with m = 0, left out of loss and metrics
    "num_answer_tokens",
    "logp_per_token_sum",  # sum of logp_sum / m
    "ref_logp_per_token_sum",  # sum of ref_logp_sum / m
    "deviation_per_token_sum",  # sum of D / m            -> m_theta (paper eq. 8)
    "reward_sum",  # sum of beta * D
    "weight_sum",  # sum of 2 sigmoid(-beta D)
    "token_prob_sum",  # sum over answer tokens of p_t                -> token_prob_mean (DFT's mean sg(p_t))
    "kl_sum",  # sum over answer tokens of KL(pi_ref || pi_theta)  -> kl_mean (losses reading REF_LOGITS)
    "logp_sum",  # sum of logp_sum                 -> nll_per_token (answer NLL per token, token-weighted)
)
MAX_STATS = ("weight_max", "neg_weight_min")  # reduced with MAX; weight_min = -neg_weight_min


def loss_and_stats(spec: LossSpec, logp_sum, ref_logp_sum, num_answer_tokens, beta, token_loss_sum=None,
                   token_prob_sum=None, kl_sum=None):
    """The loss summed over this micro-batch's sequences, its denominator, and detached statistics.

    `token_loss_sum` [n]: for a token-level loss, each sequence's sum of spec.fn over its answer tokens
    (differentiable). `token_prob_sum`, `kl_sum` [n]: each sequence's sums of p_t and of the KL to the reference over
    its answer tokens (NaN when absent).
    Returns:
        loss_sum: scalar, differentiable; divide by the GLOBAL denominator (never by a local one).
        denominator: scalar int64, this micro-batch's share of the global denominator.
        sum_stats: [len(SUM_STATS)] float64, detached.
        max_stats: [len(MAX_STATS)] float64, detached (-inf where there is no sequence or no reference).
    """
    check_inputs(logp_sum, ref_logp_sum, num_answer_tokens, beta, spec.needs_reference)
    if spec.level == "token":
        if token_loss_sum is None or token_loss_sum.shape != logp_sum.shape:
            raise ValueError(f"a token-level loss needs token_loss_sum [n] = {tuple(logp_sum.shape)}")
        loss_sum = (token_loss_sum * _has_answer(num_answer_tokens, token_loss_sum)).sum()
    else:
        loss_sum = spec.fn(logp_sum, ref_logp_sum, num_answer_tokens, beta).sum()
    valid = num_answer_tokens > 0  # [n]
    num_sequences = valid.sum()
    num_tokens = num_answer_tokens.clamp(min=0).sum()
    denominator = num_sequences if spec.denominator == SEQUENCES else num_tokens

    logp = logp_sum.detach().double()
    m = num_answer_tokens
    zero = logp.new_zeros(())
    stats = {
        "loss_sum": loss_sum.detach().double(),
        "denominator": denominator.double(),
        "num_sequences": num_sequences.double(),
        "num_empty_sequences": (~valid).sum().double(),
        "num_answer_tokens": num_tokens.double(),
        "logp_per_token_sum": _per_token(logp, m).sum(),
        "logp_sum": (logp * valid).sum(),
        "token_prob_sum": _total(token_prob_sum, zero),
        "kl_sum": _total(kl_sum, zero),
    }
    max_stats = logp.new_full((len(MAX_STATS),), float("-inf"))
    if ref_logp_sum is None:
        for name in ("ref_logp_per_token_sum", "deviation_per_token_sum", "reward_sum", "weight_sum"):
            stats[name] = zero
    else:
        ref = ref_logp_sum.detach().double()
        dev = deviation(logp, ref)  # [n]
        weight = minor_sft_weight(logp, ref, beta)  # [n]
        stats["ref_logp_per_token_sum"] = _per_token(ref, m).sum()
        stats["deviation_per_token_sum"] = _per_token(dev, m).sum()
        stats["reward_sum"] = (beta * dev * valid).sum()
        stats["weight_sum"] = (weight * valid).sum()
        masked = torch.where(valid, weight, weight.new_tensor(float("-inf")))
        neg_masked = torch.where(valid, -weight, weight.new_tensor(float("-inf")))
        if masked.numel():
            max_stats = torch.stack([masked.max(), neg_masked.max()])
    sum_stats = torch.stack([stats[name] for name in SUM_STATS])
    return loss_sum, denominator.to(torch.int64), sum_stats, max_stats


def _total(values, zero):
    """The detached float64 sum of `values` [n], NaN when there are none."""
    return zero + float("nan") if values is None else values.detach().double().sum()


def metrics_from_stats(sum_stats: torch.Tensor, max_stats: torch.Tensor, has_reference: bool,
                       has_kl: bool = False) -> dict:
    """Divide the globally reduced statistics once. Returns detached 0-d tensors keyed by metric name.

    loss, m_theta (mean of D/m), weight_mean/min/max (2 sigmoid(-beta D)), reward_mean (beta D),
    logp_per_token / ref_logp_per_token (means of logp_sum/m, ref_logp_sum/m), nll_per_token (-sum logp_sum /
    sum m: the answer NLL per token, what Megatron-LM's validation loss is), token_prob_mean (the mean over
    answer tokens of p_t: what DFT weighs each token by), kl_mean (with `has_kl`: the mean over answer tokens of
    KL(pi_ref || pi_theta)), and the counts.
    """
    s = dict(zip(SUM_STATS, sum_stats.unbind()))
    n = s["num_sequences"].clamp(min=1)
    metrics = {
        "loss": s["loss_sum"] / s["denominator"].clamp(min=1),
        "logp_per_token": s["logp_per_token_sum"] / n,
        "nll_per_token": -s["logp_sum"] / s["num_answer_tokens"].clamp(min=1),
        "num_sequences": s["num_sequences"],
        "num_empty_sequences": s["num_empty_sequences"],
        "num_answer_tokens": s["num_answer_tokens"],
        "token_prob_mean": s["token_prob_sum"] / s["num_answer_tokens"].clamp(min=1),
    }
    if has_kl:
        metrics["kl_mean"] = s["kl_sum"] / s["num_answer_tokens"].clamp(min=1)
    if has_reference:
        metrics.update(
            m_theta=s["deviation_per_token_sum"] / n,
            ref_logp_per_token=s["ref_logp_per_token_sum"] / n,
            reward_mean=s["reward_sum"] / n,
            weight_mean=s["weight_sum"] / n,
            weight_max=max_stats[0],
            weight_min=-max_stats[1],
        )
    return metrics
