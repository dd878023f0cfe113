"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers: per-token log-probs after
conversion at (TP, PP, EP, ETP) layouts, and Hugging Face tensors written back from checkpoints saved at EP = 2,
with ETP and at PP = 2 equal to the originals."""

import subprocess
import sys

import pytest
import torch

from tests.convert_workers import MOE_FAMILIES, hf_token_log_probs, make_hf_model, megatron_token_log_probs
from tests.distributed import spawn
from tests.test_convert import CONVERT, rel_err, tensors

RTOL = 1e-5
LAYOUTS = [(1, 1, 1, None), (1, 1, 2, None), (2, 1, 1, None), (1, 2, 1, None), (2, 1, 2, 1),
           (1, 1, 2, None, "allgather"), (2, 1, 1, 1, "allgather")]
"""(tp, pp, ep, etp[, dispatcher]) on 2 processes: EP 2, TP 2 (ETP = TP), PP 2, TP 2 with EP 2 and ETP 1 (the
alltoall dispatcher), and the allgather dispatcher at EP 2 and at TP 2 with ETP 1."""
SAVED_FROM = {(1, 1, 2, None): "ep2", (1, 2, 1, None): "pp2", (2, 1, 2, 1): "tp2_ep2_etp1"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_moe")
    for family in MOE_FAMILIES:
        make_hf_model(family, str(root / family / "hf"))
    subprocess.run([sys.executable, "-c", CONVERT, str(root), *MOE_FAMILIES], check=True, timeout=600)
    return root


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_log_probs_match_transformers_at_every_layout(converted, tmp_path, family):
    tokens = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    reference = hf_token_log_probs(str(converted / family / "hf"), tokens)
    saves = {layout: str(tmp_path / name) for layout, name in SAVED_FROM.items()}
    ranks = spawn(2, megatron_token_log_probs, str(converted / family / "megatron"), LAYOUTS, tokens, saves,
                  out_dir=tmp_path / "job", timeout=400)
    for layout in LAYOUTS:
        got = [r[layout] for r in ranks if layout in r]
        assert got, layout
        for logp in got:
            assert rel_err(logp, reference) <= RTOL, (family, layout, rel_err(logp, reference))
    original = tensors(str(converted / family / "hf"))
    for layout, path in saves.items():  # written back from each layout's shards: the original tensors
        back = str(tmp_path / f"hf_from_{SAVED_FROM[layout]}")
        subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import megatron_to_hf; "
                        "megatron_to_hf(sys.argv[1], sys.argv[2], log=lambda *_: None)", path, back],
                       check=True, timeout=300)
        written = tensors(back)
        assert written.keys() == original.keys(), layout
        assert all(torch.equal(original[k], v) for k, v in written.items()), layout


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_round_trip_is_bit_identical(converted, family):
    a, b = tensors(str(converted / family / "hf")), tensors(str(converted / family / "hf_back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (converted / family / "hf" / "config.json").read_bytes() == \
        (converted / family / "hf_back" / "config.json").read_bytes()


def test_model_configs_map_each_moe_family():
    from minorsft_megatron.convert import model_config_from_hf
    from tests.test_convert import config_dict

    qwen3, qwen2, mixtral = (model_config_from_hf(dict(config_dict(f))) for f in MOE_FAMILIES)
    assert qwen3.num_experts == 4 and qwen3.moe_layers == [0, 1] and qwen3.moe_norm_topk_prob and qwen3.qk_layernorm
    assert qwen2.moe_shared_expert_ffn_hidden_size == 48 and qwen2.moe_shared_expert_gate
    assert not qwen2.moe_norm_topk_prob and qwen2.add_qkv_bias and qwen2.moe_layers is None
    assert mixtral.num_experts == 4 and mixtral.moe_ffn_hidden_size == 32 and mixtral.moe_norm_topk_prob


MOE_MODEL = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
             "num_query_groups": 2, "max_position_embeddings": 128, "num_experts": 4, "spec": "local"}


@pytest.mark.parametrize("override,message", [
    ("model.moe_capacity_factor=1.0", "model.moe_capacity_factor: drops tokens by how samples are grouped"),
    ("parallel.ep=3", "parallel.ep: must divide num_experts 4"),
    ("model.moe_router_topk=5", "model.moe_router_topk: must be between 1 and num_experts 4"),
    ("model.moe_load_balancing=global_aux_loss", "model.moe_load_balancing: the global-batch load-balancing loss"),
    ("model.moe_layers=[1,0,1]", "model.moe_layers: must list 0 (dense) or 1 (MoE) for each of the 2 layers"),
    ("model.moe_shared_expert_gate=true", "model.moe_shared_expert_gate: needs model.moe_shared_expert_ffn_hidden_size"),
    ("model.num_experts=null", "parallel.ep: needs a mixture-of-experts model"),
])
def test_what_an_moe_config_cannot_run_is_refused_in_one_line(tmp_path, data_prefix, override, message):
    from minorsft_megatron.config import ConfigError, load_config
    from tests.train_workers import tiny_config

    config = tiny_config(tmp_path, data_prefix, model=MOE_MODEL, parallel={"ep": 2})
    load_config(config)  # the config itself is fine
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_the_te_spec_is_refused_for_moe_before_any_work(tmp_path, data_prefix, monkeypatch):
    """Where `auto` resolves to Transformer Engine (a GPU with TE), MoE layers are refused on it (untested)."""
    from minorsft_megatron import transformer_engine
    from minorsft_megatron.config import ConfigError, Source, check_for_device, load_config
    from tests.train_workers import tiny_config

    monkeypatch.setattr(transformer_engine, "resolve_spec", lambda spec, device_type: "te")
    monkeypatch.setattr(transformer_engine, "check_fp8", lambda *args, **kwargs: None)
    config = tiny_config(tmp_path, data_prefix, model=dict(MOE_MODEL, spec="auto"))
    with pytest.raises(ConfigError, match="model.spec: auto resolves to te here"):
        check_for_device(load_config(config), Source(config), "cuda")
