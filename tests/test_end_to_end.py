"""One MinorSFT step of a tiny GPTModel through megatron-core's schedules, under several parallel layouts.

Every layout loads the same full weights (sharded per layout) and the same global batch; the per-sequence
log-prob sums and every parameter gradient must agree with the single-process run.
"""

import pytest
import torch

from tests.distributed import spawn
from tests.gpt_workers import GLOBAL_BATCH, VOCAB, global_batch, one_step

RTOL = 1e-5


def run(tmp_path, device, tp=1, pp=1, dp=1, sp=False, mbs=2, loss="minor_sft", ref_from_policy=False):
    world = tp * pp * dp
    if device == "cuda" and torch.cuda.device_count() < world:
        device = "cpu"
    results = spawn(
        world, one_step, tp, pp, dp, sp, mbs, loss, device, ref_from_policy,
        out_dir=tmp_path / f"tp{tp}pp{pp}dp{dp}sp{int(sp)}mbs{mbs}{loss}",
    )
    grads = {}
    for result in results:  # stages hold different parameters; DP and TP ranks hold the same gathered ones
        grads.update(result["grads"])
    last = [r for r in results if "logp_sum" in r]
    by_dp = {r["dp_rank"]: r for r in last}
    logp_sum = torch.cat([by_dp[d]["logp_sum"] for d in sorted(by_dp)])
    return grads, logp_sum, last


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, device):
    return run(tmp_path_factory.mktemp("ref"), device, mbs=GLOBAL_BATCH)


def assert_same_step(run_result, reference):
    grads, logp_sum, _ = run_result
    ref_grads, ref_logp_sum, _ = reference
    assert logp_sum.shape == (GLOBAL_BATCH,)
    assert rel_err(logp_sum, ref_logp_sum) <= RTOL
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert grads[name].shape == grad.shape, name
        assert grad.norm() > 0, name
        assert rel_err(grads[name], grad) <= RTOL, name


@pytest.mark.parametrize(
    "tp,pp,dp,sp",
    [(1, 1, 1, False), (2, 1, 1, False), (1, 2, 1, False), (2, 2, 1, False), (1, 1, 2, False), (2, 1, 1, True)],
    ids=["tp1pp1dp1", "tp2pp1dp1", "tp1pp2dp1", "tp2pp2dp1", "tp1pp1dp2", "tp2sp"],
)
def test_layouts_agree(tmp_path, device, reference_run, tp, pp, dp, sp):
    assert_same_step(run(tmp_path, device, tp=tp, pp=pp, dp=dp, sp=sp, mbs=2), reference_run)


def test_one_versus_four_microbatches(tmp_path, device, reference_run):
    # reference_run is one micro-batch of 8; this is four of 2 at the same layout.
    assert_same_step(run(tmp_path, device, mbs=2), reference_run)


def test_padded_vocabulary_rows_get_no_gradient(reference_run):
    grads, _, _ = reference_run
    assert grads["output_layer.weight"][VOCAB:].abs().max() == 0
    assert grads["output_layer.weight"][:VOCAB].abs().max() > 0


def test_step_zero_weights_are_exactly_one(tmp_path, device):
    """Reference = a second model with the policy's weights: weights 2*sigmoid(0) == 1 and m_theta == 0."""
    grads, logp_sum, last = run(tmp_path, device, tp=2, pp=2, mbs=2, ref_from_policy=True)
    metrics = last[0]["metrics"]
    assert torch.equal(last[0]["ref_logp_sum"].double(), logp_sum)
    assert metrics["weight_min"] == 1.0 and metrics["weight_max"] == 1.0 and metrics["weight_mean"] == 1.0
    assert metrics["m_theta"] == 0.0 and metrics["reward_mean"] == 0.0
    # With every weight exactly 1, MinorSFT's gradient is raw SFT's (the paper's eq. 5), bit for bit.
    sft_grads, _, _ = run(tmp_path, device, tp=2, pp=2, mbs=2, loss="sft_seq", ref_from_policy=True)
    for name, grad in grads.items():
        assert torch.equal(grad, sft_grads[name]), name


def test_metrics_match_float64_formulas(reference_run):
    _, logp_sum, last = reference_run
    metrics = last[0]["metrics"]
    batch = global_batch()
    m = batch["loss_mask"].sum(-1).double()
    ref = batch["ref_logp_sum"].double()
    valid = m > 0
    dev = (logp_sum - ref)[valid] / m[valid]
    weight = 2 * torch.sigmoid(-0.04 * (logp_sum - ref))[valid]
    assert metrics["num_sequences"] == valid.sum() and metrics["num_empty_sequences"] == 1
    torch.testing.assert_close(metrics["m_theta"], dev.mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["weight_mean"], weight.mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["weight_min"], weight.min(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(metrics["weight_max"], weight.max(), rtol=1e-6, atol=1e-9)
    loss = -(weight * logp_sum[valid] / m[valid]).mean()
    torch.testing.assert_close(metrics["loss"], loss, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", ["minor_sft", "sft"])
def test_packed_rows_equal_unpacked_rows(tmp_path, device, loss):
    """Four samples packed two per row (block-diagonal causal mask, positions restarting) at TP = 2 give the
    same per-sample sums and parameter gradients as one sample per row."""
    from tests.gpt_workers import packed_and_unpacked

    world = 2
    dev = device if device == "cpu" or torch.cuda.device_count() >= world else "cpu"
    result = spawn(world, packed_and_unpacked, 2, dev, loss, out_dir=tmp_path)[0]
    packed, unpacked = result["packed"], result["unpacked"]
    assert packed["logp_sum"].shape == (4,)
    assert torch.equal(packed["num_answer_tokens"], unpacked["num_answer_tokens"])
    assert rel_err(packed["logp_sum"], unpacked["logp_sum"]) <= RTOL
    for name, grad in unpacked["grads"].items():
        assert grad.norm() > 0, name
        assert rel_err(packed["grads"][name], grad) <= RTOL, name


def test_dataset_batches_padded_equal_packed(tmp_path, device):
    """Step 0 of the bundled data through the dataset class at DP = 2: packed rows (fewer micro-batches, an
    empty padding row) give the same per-sample sums and gradients as padded rows."""
    from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess
    from tests.gpt_workers import dataset_padded_and_packed
    from tests.tokenizers_for_tests import DATA, SENTENCEPIECE_MODEL

    prefix = str(tmp_path / "train")
    preprocess(PreprocessSettings(inputs=[f"{DATA}/sft_train.jsonl"], tokenizer=SENTENCEPIECE_MODEL,
                                  output_prefix=prefix, chat_template="chatml", seq_length=64), log=print)
    world = 2
    dev = device if device == "cpu" or torch.cuda.device_count() >= world else "cpu"
    ranks = spawn(world, dataset_padded_and_packed, prefix, 64, 1024, dev, out_dir=tmp_path / "run")
    padded = {k: v for r in ranks for k, v in r["padded"]["logp_sum"].items()}
    packed = {k: v for r in ranks for k, v in r["packed"]["logp_sum"].items()}
    assert len(padded) == 12 and packed.keys() == padded.keys()
    keys = sorted(padded)
    assert rel_err(torch.tensor([packed[k] for k in keys]), torch.tensor([padded[k] for k in keys])) <= RTOL
    assert [r["packed"]["num_micro_batches"] for r in ranks] == [2, 2]
    assert sum(r["packed"]["empty_rows"] for r in ranks) >= 1
    assert [r["padded"]["num_micro_batches"] for r in ranks] == [2, 2]
    for name, grad in ranks[0]["padded"]["grads"].items():
        assert rel_err(ranks[0]["packed"]["grads"][name], grad) <= RTOL, name
        assert rel_err(ranks[1]["packed"]["grads"][name], grad) <= RTOL, name
