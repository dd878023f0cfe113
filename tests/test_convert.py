"""Hugging Face <-> Megatron conversion against transformers: per-token log-probs at TP = 1, 2 and PP = 2,
bit-identical round trips, and the refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from minorsft_megatron.convert import ConversionError, model_config_from_hf
from tests.convert_workers import FAMILIES, hf_config, hf_token_log_probs, make_hf_model, megatron_token_log_probs
from tests.distributed import spawn
from tests.tokenizers_for_tests import huggingface_dir

RTOL = 1e-5
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
CONVERT = """
import sys
from minorsft_megatron.convert import hf_to_megatron, megatron_to_hf
root, families = sys.argv[1], sys.argv[2:]
for family in families:
    path = hf_to_megatron(f"{root}/{family}/hf", f"{root}/{family}/megatron", dtype="fp32", log=lambda *_: None)
    megatron_to_hf(path, f"{root}/{family}/hf_back", log=lambda *_: None)
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every family: a tiny random HF model (with tokenizer files), converted there and back in one process."""
    root = tmp_path_factory.mktemp("convert")
    for family in FAMILIES:
        path = make_hf_model(family, str(root / family / "hf"))
        if family == "qwen2":
            huggingface_dir(path, adds_bos=False)  # tokenizer files travel with the checkpoint
    subprocess.run([sys.executable, "-c", CONVERT, str(root), *FAMILIES], check=True, timeout=600)
    return root


def tensors(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_log_probs_match_transformers_at_tp1_tp2_pp2(converted, tmp_path, family):
    tokens = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    reference = hf_token_log_probs(str(converted / family / "hf"), tokens)
    ckpt = str(converted / family / "megatron")
    resaved = str(tmp_path / "tp2")
    ranks = spawn(2, megatron_token_log_probs, ckpt, LAYOUTS, tokens, resaved, out_dir=tmp_path / "job", timeout=300)
    for layout in LAYOUTS:
        got = [r[layout] for r in ranks if layout in r]
        assert got, layout
        for logp in got:
            assert rel_err(logp, reference) <= RTOL, (family, layout, rel_err(logp, reference))
    # a checkpoint written from TP = 2 shards converts back to the same Hugging Face tensors
    back = str(tmp_path / "hf_from_tp2")
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import megatron_to_hf; "
                    "megatron_to_hf(sys.argv[1], sys.argv[2], log=lambda *_: None)", resaved, back],
                   check=True, timeout=300)
    original = tensors(str(converted / family / "hf"))
    assert all(torch.equal(original[k], v) for k, v in tensors(back).items()) and tensors(back).keys() == original.keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(converted, family):
    original, back = converted / family / "hf", converted / family / "hf_back"
    a, b = tensors(str(original)), tensors(str(back))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.load(open(original / "config.json")) == json.load(open(back / "config.json"))
    for name in os.listdir(original):
        if name != "model.safetensors":
            assert (original / name).read_bytes() == (back / name).read_bytes(), name
    if family == "qwen2":
        assert (back / "tokenizer.json").exists()


ARCHITECTURES = {"llama": "LlamaForCausalLM", "llama31": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def config_dict(family):
    return dict(hf_config(family).to_dict(), architectures=[ARCHITECTURES[family]])


def test_model_configs_map_each_family():
    configs = {f: model_config_from_hf(config_dict(f)) for f in FAMILIES}
    assert configs["qwen2"].add_qkv_bias and configs["qwen2"].tie_embeddings
    assert configs["qwen3"].qk_layernorm and configs["qwen3"].kv_channels == 24
    assert configs["llama31"].rope_scaling_factor == 8.0 and configs["llama"].rope_scaling_factor is None
    assert {c.num_query_groups for c in configs.values()} == {2}


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture GPT2LMHeadModel is not supported; supported: "
                                             "LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "architecture DeepseekV3ForCausalLM is not supported: multi-head "
                                                   "latent attention"),
    ({"architectures": ["GptOssForCausalLM"]}, "architecture GptOssForCausalLM is not supported: attention sinks"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' cannot be mapped exactly"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "low_freq_factor=2.0 cannot be mapped exactly"),
    ({"attention_bias": True}, "attention_bias: true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' cannot be mapped"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 128}, "sliding_window 128 < max_position_embeddings"),
])
def test_refusals(change, message):
    config = dict(config_dict("llama"), **change)
    config.pop("rope_parameters", None) if "rope_scaling" in change else None
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_config_from_hf(config)


def test_command_line_refusal_is_one_line(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", str(hf),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: architecture FalconForCausalLM is not supported; supported: LlamaForCausalLM, "
        "MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen2MoeForCausalLM, Qwen3ForCausalLM, "
        "Qwen3MoeForCausalLM"]
    assert not (tmp_path / "out").exists()


def test_training_config_takes_the_model_from_the_starting_checkpoint(converted, tmp_path):
    from minorsft_megatron.config import ConfigError, load_config
    from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess
    from tests.tokenizers_for_tests import DATA, SENTENCEPIECE_MODEL

    prefix = str(tmp_path / "data")
    preprocess(PreprocessSettings(inputs=[f"{DATA}/sft_eval.jsonl"], tokenizer=SENTENCEPIECE_MODEL,
                                  output_prefix=prefix, chat_template="chatml"), log=lambda *_: None)
    init = str(converted / "qwen3" / "megatron")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{prefix: {prefix}, seq_length: 128}}\nparallel: {{tp: 2}}\n")
    cfg = load_config(str(config), [f"checkpoint.init={init}", "model.spec=te", "model.num_layers=2"])
    assert (cfg.model.qk_layernorm, cfg.model.kv_channels, cfg.model.hidden_size) == (True, 24, 64)
    assert cfg.model.spec == "te"
    with pytest.raises(ConfigError, match=rf"model.hidden_size: 128 here but 64 in checkpoint.init {init}"):
        load_config(str(config), [f"checkpoint.init={init}", "model.hidden_size=128"])
