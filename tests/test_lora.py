"""LoRA against transformers with peft in float64: a tiny Llama's per-sample answer log-prob sums and every
adapter's gradient for one MinorSFT step at (TP, PP, DP) = (1,1,2), (2,1,1) with SP, (1,2,1); and training with
reference.mode: base (step-1 weights exactly 1, the same losses as a co-located reference of the base, base
weights untouched)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.lora_workers import lora_step
from tests.moe_workers import answer_mask

RANK, ALPHA, BETA = 4, 8.0, 0.04
ROWS, LENGTH = 4, 17
PROMPTS = [3, 6, 9, 12]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF directory, converted megatron checkpoint) of a tiny random Llama."""
    root = tmp_path_factory.mktemp("lora")
    hf = make_hf_model("llama", str(root / "hf"))
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None)", hf,
                    str(root / "megatron")], check=True, timeout=300)
    return hf, str(root / "megatron")


def peft_model(hf_dir):
    """The base in float64 with PEFT LoRA adapters on every linear, A and B random (so every path matters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64)
    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, init_lora_weights=False)
    return get_peft_model(model, config)


def adapter_parameters(model) -> dict:
    """{(module name, 'a' or 'b'): parameter} of a PEFT model, by the base model's module names."""
    found = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            found[(module, "a" if ".lora_A." in name else "b")] = param
    return found


def step_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [ROWS, LENGTH], the reference's log-prob sums [ROWS] in float64) of the one-step comparisons."""
    tokens = torch.randint(0, 300, (ROWS, LENGTH), generator=torch.Generator().manual_seed(3))
    return tokens, -torch.linspace(20.0, 60.0, ROWS, dtype=torch.float64)


def full_adapters(tensors: dict) -> dict:
    """{module: (A, B)} in fp32 for lora_step from {(module, 'a' or 'b'): tensor}."""
    pairs = {}
    for (module, kind), tensor in tensors.items():
        pairs.setdefault(module, {})[kind] = tensor.detach().float()
    return {m: (v["a"], v["b"]) for m, v in pairs.items()}


def reference_step(model, tokens, ref_logp_sum):
    """Per-sample answer log-prob sums and the adapters' gradients of one MinorSFT step, in float64."""
    mask = answer_mask(tokens, PROMPTS).double()
    logp = model(tokens[:, :-1]).logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
    logp_sum, m = (logp * mask).sum(1), mask.sum(1)
    weight = 2 * torch.sigmoid(-BETA * (logp_sum - ref_logp_sum)).detach()
    (-(weight * logp_sum / m).sum() / (m > 0).sum()).backward()
    return logp_sum.detach(), {k: p.grad for k, p in adapter_parameters(model).items()}


def local_slice(full: torch.Tensor, key, column: bool, tp: tuple[int, int]) -> torch.Tensor:
    """The part of a full adapter tensor a TP rank holds (lora.AdapterSet.load_full's split)."""
    size, rank = tp
    if column:
        return full if key[1] == "a" else full.chunk(size, dim=0)[rank]
    return full.chunk(size, dim=1)[rank] if key[1] == "a" else full


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)])  # (tp, pp) on 2 processes: DP 2, TP 2 + SP, PP 2
def test_log_probs_and_adapter_gradients_match_peft(base, tmp_path, layout):
    """Through megatron-core's DDP and optimizer (the distributed optimizer at DP 2): the log-prob sums, every
    adapter's gradient and the gradient norm (the adapters' alone) of step 1; the base bit-identical after 4."""
    hf, ckpt = base
    tokens, ref_logp_sum = step_inputs()
    model = peft_model(hf)
    adapters = full_adapters(adapter_parameters(model))
    assert len(adapters) == 2 * len(MODULES)  # two layers
    want_logp, want_grads = reference_step(model, tokens, ref_logp_sum)
    ranks = spawn(2, lora_step, ckpt, layout, tokens, PROMPTS, ref_logp_sum, adapters, RANK, ALPHA, 2,
                  layout == (1, 1), out_dir=tmp_path / "job", timeout=300)
    want_norm = torch.cat([g.flatten() for g in want_grads.values()]).norm()
    for r in ranks:
        assert abs(r["grad_norm"] - float(want_norm)) <= 1e-5 * float(want_norm) and r["base_unchanged"]
    scored = [r for r in ranks if r["logp_sum"] is not None]
    assert scored
    for r in scored:
        got = r["logp_sum"].double()
        assert float((got - want_logp[r["rows"]]).abs().max() / want_logp.abs().max()) <= 1e-5
    seen = set()
    for r in ranks:
        for key, got in r["grads"].items():
            want = local_slice(want_grads[key], key, key in r["column"], r["tp"])
            err = float((got.double() - want).abs().max() / want.abs().max())
            assert err <= 1e-5, (key, err)
            seen.add(key)
    assert seen == set(want_grads)


class FixedMask(torch.nn.Module):
    """PEFT's lora_dropout replaced by a given mask (what our adapters drew)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def test_dropout_masks_match_peft(base, tmp_path):
    """lora.dropout 0.5: one mask per adapter (q, k and v each their own), drawn in training only (not by the eval
    scoring pass, nor with the adapters off); PEFT given the masks we drew has our every adapter gradient (1e-5)."""
    from peft.tuners.lora import LoraLayer

    hf, ckpt = base
    tokens, ref_logp_sum = step_inputs()
    model = peft_model(hf)
    adapters = full_adapters(adapter_parameters(model))
    [ours] = spawn(1, lora_step, ckpt, (1, 1), tokens, PROMPTS, ref_logp_sum, adapters, RANK, ALPHA, ROWS, False, 1,
                   0.5, out_dir=tmp_path / "job", timeout=300)
    masks = ours["masks"]
    assert ours["eval_draws"] == 0 and set(masks) == set(adapters)
    for mask in masks.values():
        assert set(mask.unique().tolist()) == {0.0, 2.0} and 0.3 < float((mask == 0).float().mean()) < 0.7
    assert not torch.equal(masks["model.layers.0.self_attn.q_proj"], masks["model.layers.0.self_attn.k_proj"])
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout["default"] = FixedMask(masks[name.split("base_model.model.", 1)[1]].double())
    _, want_grads = reference_step(model, tokens, ref_logp_sum)
    for key, got in ours["grads"].items():
        err = float((got.double() - want_grads[key]).abs().max() / want_grads[key].abs().max())
        assert err <= 1e-5, (key, err)
    assert set(ours["grads"]) == set(want_grads)


def test_training_with_the_base_as_reference(tmp_path, data_prefix):
    """fp32, DP 2 with the distributed optimizer, from a converted Llama: reference.mode base gives step-1 weights
    exactly 1 and m_theta 0 and the same losses over 4 steps as a co-located reference holding the base's weights,
    packed rows too; only the adapters train."""
    import yaml

    from tests.train_workers import metrics, run_commands, tiny_config

    hf = make_hf_model("llama", str(tmp_path / "hf"), vocab_size=1024)
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None)", hf,
                    str(tmp_path / "init")], check=True, timeout=300)
    config = tiny_config(tmp_path, data_prefix, optimizer={"lr": 1e-2})
    settings = yaml.safe_load(open(config))
    del settings["model"]  # the checkpoint's
    open(config, "w").write(yaml.safe_dump(settings))
    common = ["--config", config, f"checkpoint.init={tmp_path / 'init'}", "train_steps=4", "model.spec=local",
              "optimizer.distributed=true", "lora.rank=4", "lora.alpha=8"]
    halves = common + [f"output_dir={tmp_path / 'halves'}", "checkpoint.optimizer_sharding=fully_reshardable"]
    spawn(2, run_commands, [("train", common + [f"output_dir={tmp_path / 'base'}"]),
                            ("train", common + [f"output_dir={tmp_path / 'colocated'}", "reference.mode=colocated"]),
                            ("train", halves + ["stop_at_step=2"]), ("train", halves + ["parallel.tp=2",
                                                                                        "parallel.sp=true"]),
                            ("train", common + [f"output_dir={tmp_path / 'bf16'}", "precision.dtype=bf16",
                                                "train_steps=2"]),
                            ("train", common + [f"output_dir={tmp_path / 'fp16'}", "precision.dtype=fp16",
                                                "precision.initial_loss_scale=1024", "train_steps=2"]),
                            ("train", common + [f"output_dir={tmp_path / 'dropout'}", "lora.dropout=0.1",
                                                "parallel.tp=2", "parallel.sp=true", "train_steps=2"]),
                            ("train", common + [f"output_dir={tmp_path / 'packed'}", "data.packing=true"])],
          out_dir=tmp_path / "job", timeout=400)
    base, colocated = metrics(tmp_path / "base"), metrics(tmp_path / "colocated")
    bf16 = metrics(tmp_path / "bf16")  # bf16 weights, fp32 main weights: the base reference is still exact
    assert bf16[0]["weight_min"] == bf16[0]["weight_max"] == 1.0 and bf16[0]["m_theta"] == 0.0
    assert bf16[1]["m_theta"] != 0.0
    fp16 = metrics(tmp_path / "fp16")  # fp16 with the dynamic loss scale: the same
    assert fp16[0]["weight_min"] == fp16[0]["weight_max"] == 1.0 and fp16[0]["m_theta"] == 0.0
    assert not any(r["skipped"] for r in fp16) and fp16[1]["m_theta"] != 0.0
    dropout = metrics(tmp_path / "dropout")  # TP 2 + SP, dropout on the adapters: the base reference never sees it
    assert dropout[0]["weight_min"] == dropout[0]["weight_max"] == 1.0 and dropout[0]["m_theta"] == 0.0
    assert dropout[1]["m_theta"] != 0.0
    resumed = metrics(tmp_path / "halves")  # steps 3-4 at TP 2: the adapters and their Adam state resharded
    assert resumed[:2] == base[:2] and all(abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
                                           for a, b in zip(resumed[2:], base[2:]))
    assert base[0]["weight_min"] == base[0]["weight_max"] == 1.0 and base[0]["m_theta"] == 0.0
    assert base[-1]["m_theta"] != 0.0 and base[-1]["loss"] < base[0]["loss"]
    for a, b in zip(base, colocated):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]) and abs(a["m_theta"] - b["m_theta"]) <= 1e-6
    packed = metrics(tmp_path / "packed")  # packed rows (block-diagonal mask), the base reference packed alike
    assert packed[0]["weight_min"] == packed[0]["weight_max"] == 1.0 and packed[0]["m_theta"] == 0.0
    for a, b in zip(packed, base):  # the expectation is over sequences whatever the packing: fp32 sums reordered
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and abs(a["m_theta"] - b["m_theta"]) <= 1e-5
    exports_match_score(tmp_path, hf, tmp_path / "base" / "checkpoints", data_prefix)
    greedy_matches_the_merged_export(tmp_path, tmp_path / "base" / "checkpoints")
    adapters_only(tmp_path / "base" / "checkpoints", tmp_path / "init", hf,
                  common + [f"output_dir={tmp_path / 'base'}"])
    from minorsft_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"checkpoint.init: .* is a LoRA run's checkpoint \(adapters\): "
                                          r"resume it with checkpoint.load"):
        load_config(config, [f"checkpoint.init={tmp_path / 'base' / 'checkpoints' / 'iter_0000004'}"])


def greedy_matches_the_merged_export(tmp_path, trained):
    """`generate` at TP 2 on the LoRA checkpoint gives transformers' greedy tokens of the merged export."""
    import json

    from transformers import AutoModelForCausalLM

    from minorsft_megatron.data.templates import resolve_template
    from minorsft_megatron.data.tokenizer import load_tokenizer
    from minorsft_megatron.generate import generate, parse_args, read_prompts, stop_ids
    from tests.tokenizers_for_tests import DATA, SENTENCEPIECE_MODEL

    records = tmp_path / "eval.jsonl"
    records.write_text("".join(open(os.path.join(DATA, "sft_eval.jsonl")).readlines()[:3]))
    out = tmp_path / "answers.jsonl"
    spawn(2, generate, parse_args(["--load", str(trained), "--tp", "2", "--jsonl", str(records), "--tokenizer",
                                   SENTENCEPIECE_MODEL, "--chat-template", "chatml", "--out", str(out),
                                   "--max-new-tokens", "5", "--batch-size", "1"]), out_dir=tmp_path / "gen", timeout=300)
    tok = load_tokenizer(SENTENCEPIECE_MODEL)
    prompts, stops = read_prompts(str(records), tok, resolve_template("chatml", tok)), sorted(stop_ids(tok))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    for row, (prompt, _) in zip(map(json.loads, open(out)), prompts):
        with torch.no_grad():
            full = merged.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=stops,
                                   pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = full[0, len(prompt):].tolist()
        assert row["generated_ids"] == expected[: next((i for i, t in enumerate(expected) if t in stops),
                                                       len(expected))]


def adapters_only(trained, init, hf, resume_args):
    """A LoRA run's checkpoint holds the adapters (and their optimizer state) alone, naming its base; a base that
    has changed or gone is refused in one line by whatever loads it."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader

    from minorsft_megatron import checkpoint
    from minorsft_megatron.convert import megatron_to_hf

    directory = checkpoint.resolve(str(trained))
    keys = list(FileSystemReader(directory).read_metadata().state_dict_metadata)
    assert any(".lora." in k for k in keys) and not [k for k in keys if k.endswith((".weight", ".bias"))]
    base = checkpoint.read_state(directory)["base"]
    assert base == {"path": os.path.abspath(checkpoint.resolve(str(init))),
                    "checkpoint_id": checkpoint.read_state(str(init))["checkpoint_id"]}
    shutil.copytree(init, f"{init}.kept")
    shutil.rmtree(init)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds LoRA adapters only and its base checkpoint .* gone"):
        megatron_to_hf(str(trained), f"{init}.out")
    shutil.copytree(f"{init}.kept", init)
    assert checkpoint.base_of(directory, checkpoint.read_state(directory)) == base["path"]
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None, overwrite=True)", hf,
                    str(init)], check=True, timeout=300)  # the same weights, converted again: another checkpoint
    resumed = subprocess.run([sys.executable, "-m", "minorsft_megatron.train", *resume_args],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
    assert re.search(r"its base checkpoint .* has changed \(checkpoint \w+, the adapters were trained on \w+\)",
                     resumed.stderr.strip().splitlines()[-1])


def exports_match_score(tmp_path, hf, trained, data_prefix, **load):
    """The merged export and the PEFT adapter on the original base, each in transformers (from_pretrained with
    `load`), against our `score`."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minorsft_megatron.data.dataset import SFTDataset
    from tests.train_workers import run_commands

    for kind in ("merged", "peft"):
        subprocess.run([sys.executable, "tools/convert_checkpoint.py", "megatron-to-hf", "--load", str(trained),
                        "--out", str(tmp_path / kind), "--lora", kind], check=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scores = tmp_path / "scores.jsonl"
    spawn(2, run_commands, [("score", ["--load", str(trained), "--data", data_prefix, "--out", str(scores),
                                       "--precision", "fp32"])], out_dir=tmp_path / "score_job", timeout=300)
    ours = {row["index"]: row["logp_sum"] for row in map(json.loads, open(scores))}
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float64, **load)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64, **load),
                                        str(tmp_path / "peft"))
    dataset = SFTDataset(data_prefix)
    for i in range(0, len(dataset.lengths), 200):
        tokens = torch.from_numpy(dataset.tokens(i))
        answer = torch.from_numpy(dataset.answer_mask(i).astype(bool))[1:]
        for model in (merged, adapted):
            with torch.no_grad():
                logp = model(tokens[None, :-1]).logits[0].log_softmax(-1).gather(-1, tokens[1:, None])[:, 0]
            want = float(logp[answer].sum())
            assert abs(ours[i] - want) <= 1e-5 * abs(want), (i, type(model).__name__, ours[i], want)


@pytest.mark.parametrize("overrides,message", [
    (["lora.rank=4", "lora.target_modules=[linear_qkv, q_proj]"],
     r"lora.target_modules\[1\]: 'q_proj' is not a linear of the model"),
    (["lora.rank=65"], r"lora.rank: 65 is larger than the model's smallest adapted dimension \(32\)"),
    (["lora.rank=4", "lora.dropout=1.0"], r"lora.dropout: 1.0 must be in \[0, 1\)"),
    (["reference.mode=base"], r"reference.mode: base \(the policy with its adapters off\) needs LoRA"),
])
def test_lora_settings_are_refused_in_one_line(tmp_path, data_prefix, overrides, message):
    from minorsft_megatron.config import ConfigError, load_config
    from tests.train_workers import tiny_config

    with pytest.raises(ConfigError, match=r"^(command line|\S+config\.yaml): " + message):
        load_config(tiny_config(tmp_path, data_prefix), overrides)


def test_lora_defaults_to_the_base_reference(tmp_path, data_prefix):
    from minorsft_megatron.config import load_config
    from tests.train_workers import tiny_config

    config = tiny_config(tmp_path, data_prefix)
    assert load_config(config, ["lora.rank=4"]).reference.mode == "base"
    assert load_config(config).reference.mode == "colocated"
    assert load_config(config, ["lora.rank=4", "reference.mode=colocated"]).reference.mode == "colocated"
