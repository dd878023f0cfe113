"""DFT, iw-SFT, ASFT and sft_kl through the training command: at step 1 the co-located reference is the policy, so
every iw-SFT weight (p / p_ref per token, exp(D / m) per sequence) is exactly 1 and their step-1 loss is raw SFT's
token-mean NLL bit for bit, which holds only if the reference's per-token log-probs land on the policy's positions
(packed rows at PP 2, two policy micro-batches scored as one); and the full-vocabulary KL of ASFT and sft_kl is
exactly 0, their step-1 losses DFT's and SFT's, which holds only if the reference's hidden states and output
weight reach the policy's loss position by position; with LoRA and reference.mode base (the policy with its adapters
off) the same. The float64 formulas and layouts are in test_loss.py,
test_gradients_vs_transformers.py and test_context_parallel.py."""

import pytest

from tests.distributed import spawn
from tests.train_workers import metrics, run_commands, tiny_config


def test_iw_sft_starts_as_sft_and_dft_trains_without_a_reference(tmp_path, data_prefix):
    config = tiny_config(tmp_path, data_prefix, parallel={"pp": 2}, data={"packing": True},
                         reference={"micro_batch_size": 8})
    runs = {"sft": [], "iw_sft": [], "iw_sft_token": [], "dft": ["reference.mode=none"],
            "asft": ["reference.micro_batch_size=4"], "sft_kl": ["reference.micro_batch_size=4"],
            "iw_sft_token_lora": ["loss.name=iw_sft_token", "lora.rank=4"],  # reference.mode base: adapters off
            "asft_lora": ["loss.name=asft", "lora.rank=4", "reference.micro_batch_size=4"]}
    spawn(2, run_commands, [("train", ["--config", config, "train_steps=3", f"loss.name={name.split('_lora')[0]}",
                                       f"output_dir={tmp_path / name}", *extra]) for name, extra in runs.items()],
          out_dir=tmp_path / "job", timeout=400)
    got = {name: metrics(tmp_path / name) for name in runs}
    for name in ("iw_sft", "iw_sft_token"):
        first = got[name][0]
        assert first["loss"] == got["sft"][0]["loss"] and first["m_theta"] == 0.0, name
        last = got[name][-1]  # the weighted loss may grow as weights exp(D / m) do: the answers' NLL falls
        assert last["m_theta"] > 0.0 and last["logp_per_token"] > first["logp_per_token"], name
    for name, unregularised in (("asft", "dft"), ("sft_kl", "sft")):  # KL(pi_ref || pi_theta) = 0 exactly at step 1
        first, last = got[name][0], got[name][-1]
        assert first["kl_mean"] == 0.0 and first["loss"] == got[unregularised][0]["loss"], name
        assert last["kl_mean"] > 0.0 and last["logp_per_token"] > first["logp_per_token"], name
    assert "kl_mean" not in got["sft"][0]
    for name, full in (("iw_sft_token_lora", "sft"), ("asft_lora", "dft")):  # LoRA: B = 0, the base is the policy
        first = got[name][0]
        assert first["loss"] == got[full][0]["loss"] and first["m_theta"] == 0.0, name
        assert got[name][-1]["m_theta"] > 0.0, name
    assert got["asft_lora"][0]["kl_mean"] == 0.0 and got["asft_lora"][-1]["kl_mean"] > 0.0
    dft = got["dft"]
    assert "m_theta" not in dft[0] and 0 < dft[0]["token_prob_mean"] < 1
    assert dft[-1]["token_prob_mean"] > dft[0]["token_prob_mean"]  # DFT raises the answer tokens' probabilities


def test_a_cache_cannot_serve_per_token_reference_log_probs(tmp_path, data_prefix):
    from minorsft_megatron.config import ConfigError, load_config

    cache = tmp_path / "ref.jsonl"
    cache.write_text("")
    config = tiny_config(tmp_path, data_prefix)
    with pytest.raises(ConfigError, match=r"reference.mode: cache holds per-sample sums; loss iw_sft_token reads the "
                                          r"reference's per-token log-probs"):
        load_config(config, ["loss.name=iw_sft_token", "reference.mode=cache", f"reference.cache={cache}"])
    with pytest.raises(ConfigError, match=r"reference.mode: .*loss iw_sft needs a reference"):
        load_config(config, ["loss.name=iw_sft", "reference.mode=none"])
    with pytest.raises(ConfigError, match=r"reference.mode: loss asft reads the reference's whole distribution"):
        load_config(config, ["loss.name=asft", "reference.mode=cache", f"reference.cache={cache}"])
    with pytest.raises(ConfigError, match=r"reference.micro_batch_size: loss sft_kl keeps the reference's hidden"):
        load_config(config, ["loss.name=sft_kl", "reference.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"loss.logprob_chunk_size: loss asft computes the KL .* must be > 0"):
        load_config(config, ["loss.name=asft", "loss.logprob_chunk_size=0"])
