"""LoRA on a mixture-of-experts model against transformers with peft in float64: a tiny random Qwen2-MoE (8 routed
experts, top 2, and a gated shared expert in every layer) with adapters on attention, the shared expert
(target_modules) and every routed expert (PEFT's target_parameters on transformers' fused expert tensors). The
per-sample answer log-prob sums and every adapter's gradient of one MinorSFT step at (TP, PP, EP) = (1,1,1) with DP 2
and the distributed optimizer, (1,1,2), (2,1,2) with SP and expert TP 1, and (2,1,1) with SP and expert TP 2; then
training with reference.mode base at EP 2 and at ETP 2, and both exports in transformers against our `score`."""

import subprocess
import sys

import pytest
import torch

from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.lora_workers import lora_step
from tests.test_lora import PROMPTS, full_adapters, local_slice, reference_step, step_inputs

RANK, ALPHA = 4, 8.0
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_TENSORS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
NUM_EXPERTS = 8


def convert(hf: str, out: str) -> str:
    subprocess.run([sys.executable, "-c", "import sys; from minorsft_megatron.convert import hf_to_megatron; "
                    "hf_to_megatron(sys.argv[1], sys.argv[2], dtype='fp32', log=lambda *_: None)", hf, out],
                   check=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_moe")
    hf = make_hf_model("qwen2_moe", str(root / "hf"))
    return hf, convert(hf, str(root / "megatron"))


def peft_moe_model(hf_dir):
    """The base in float64 with random PEFT adapters on every linear and on both fused expert tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, experts_implementation="eager")
    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES,
                        target_parameters=EXPERT_TENSORS, init_lora_weights=False)
    return get_peft_model(model, config)


def per_expert(model) -> dict:
    """{(module, 'a' or 'b'): (parameter, how to take one expert's tensor or the whole)} of a PEFT model, a routed
    expert's under the Hub-style name model.layers.N.mlp.experts.E.<gate_up_proj|down_proj>."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = name.split("base_model.model.", 1)[1].split(".mlp.experts")[0]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            for e in range(NUM_EXPERTS):
                key = f"{layer}.mlp.experts.{e}.{module.parameter_name}"
                found[(key, "a")] = (a, lambda t, e=e: t.reshape(NUM_EXPERTS, RANK, -1)[e])
                found[(key, "b")] = (b, lambda t, e=e: t.reshape(t.shape[0], RANK, NUM_EXPERTS)[:, :, e])
    for name, param in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and ".mlp.experts." not in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            found[(module, "a" if ".lora_A." in name else "b")] = (param, lambda t: t)
    return found


def expert_slice(full: torch.Tensor, key, tp: tuple[int, int]) -> torch.Tensor:
    """The part of a routed expert's full adapter tensor an ETP rank holds: a gated fc1's B [2F, r] this rank's
    gate rows, then its up rows (as megatron-core splits the gated weight)."""
    column = key[0].endswith(".gate_up_proj")
    if column and key[1] == "b":
        return torch.cat([half.chunk(tp[0])[tp[1]] for half in full.chunk(2)])
    return local_slice(full, key, column, tp)


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 1, 2), (2, 1, 2), (2, 1, 1, 2)])  # (tp, pp, ep[, etp]), 2 processes
def test_moe_adapters_match_peft(base, tmp_path, layout):
    """Log-prob sums, every adapter's gradient (routed experts' on the EP rank holding them) and the gradient norm
    of step 1; the base (routers and experts included) bit-identical after 4 steps."""
    hf, ckpt = base
    tokens, ref_logp_sum = step_inputs()
    model = peft_moe_model(hf)
    adapters = per_expert(model)
    full = full_adapters({key: take(param) for key, (param, take) in adapters.items()})
    assert len(full) == 2 * (4 + 3 + 2 * NUM_EXPERTS)  # two layers: attention, shared expert, routed experts
    want_logp, _ = reference_step(model, tokens, ref_logp_sum)
    want_grads = {k: take(param.grad) for k, (param, take) in adapters.items()}
    ranks = spawn(2, lora_step, ckpt, layout, tokens, PROMPTS, ref_logp_sum, full, RANK, ALPHA, 2, layout == (1, 1, 1),
                  out_dir=tmp_path / "job", timeout=400)
    for r in (r for r in ranks if r["logp_sum"] is not None):
        got = r["logp_sum"].double()
        assert float((got - want_logp[r["rows"]]).abs().max() / want_logp.abs().max()) <= 1e-5
    seen = set()
    for r in ranks:
        for key, got in r["grads"].items():
            etp = (1, 0) if len(layout) < 4 else r["tp"]  # expert TP = TP here
            want = expert_slice(want_grads[key], key, etp) if ".mlp.experts." in key[0] else \
                local_slice(want_grads[key], key, key in r["column"], r["tp"])
            err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))  # an expert
            assert err <= 1e-5, (key, err)  # no token reached has a zero gradient, here as there
            seen.add(key)
    assert seen == set(want_grads)
    fused = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    want_norm = float(torch.cat([g.flatten() for g in fused]).norm())
    for r in ranks:
        assert abs(r["grad_norm"] - want_norm) <= 1e-5 * want_norm and r["base_unchanged"]


def test_expert_dropout_masks_at_expert_tp_2(base, tmp_path):
    """lora.dropout at TP 2 + SP with expert TP 2: a routed expert's gated fc1 input (its whole tokens, the same on
    both ETP ranks) gets the same mask on both, its fc2 input (split over ETP) its own on each."""
    hf, ckpt = base
    tokens, ref_logp_sum = step_inputs()
    adapters = per_expert(peft_moe_model(hf))
    full = full_adapters({key: take(param) for key, (param, take) in adapters.items()})
    ranks = spawn(2, lora_step, ckpt, (2, 1, 1, 2), tokens, PROMPTS, ref_logp_sum, full, RANK, ALPHA, 4, False, 1, 0.3,
                  out_dir=tmp_path / "job", timeout=400)
    first, second = (r["masks"] for r in ranks)
    experts = [name for name in first if ".mlp.experts." in name]
    assert len(experts) == 2 * 2 * NUM_EXPERTS and set(experts) <= set(second)
    for name in (n for n in experts if first[n].numel()):  # an expert no token reached draws nothing
        same = first[name].shape == second[name].shape and torch.equal(first[name], second[name])
        assert same == name.endswith(".gate_up_proj"), name


def test_moe_training_with_the_base_as_reference(tmp_path, data_prefix):
    """From a converted Qwen2-MoE with the auxiliary loss on, the distributed optimizer: at EP 2, step-1 weights
    exactly 1 and m_theta 0 with reference.mode base, the same losses as a co-located reference of the base; at TP 2
    with expert TP 2 the same losses again, its step-2 checkpoint's merged export and PEFT adapter in transformers
    give our `score`'s log-probs, and resumed at EP 2 (the adapters and their Adam state resharded) it goes on with
    the EP 2 run's losses."""
    import yaml

    from tests.test_lora import exports_match_score
    from tests.train_workers import metrics, run_commands, tiny_config

    hf = make_hf_model("qwen2_moe", str(tmp_path / "hf"), vocab_size=1024)
    convert(hf, str(tmp_path / "init"))
    config = tiny_config(tmp_path, data_prefix, optimizer={"lr": 1e-2})
    settings = yaml.safe_load(open(config))
    del settings["model"]  # the checkpoint's
    open(config, "w").write(yaml.safe_dump(settings))
    common = ["--config", config, f"checkpoint.init={tmp_path / 'init'}", "train_steps=4", "model.spec=local",
              "optimizer.distributed=true", "lora.rank=4", "lora.alpha=8", "model.moe_aux_loss_coeff=0.01"]
    ep2 = ["parallel.ep=2", "parallel.etp=1"]
    halves = common + [f"output_dir={tmp_path / 'halves'}", "checkpoint.optimizer_sharding=fully_reshardable"]
    spawn(2, run_commands, [("train", common + ep2 + [f"output_dir={tmp_path / 'base'}"]),
                            ("train", common + ep2 + [f"output_dir={tmp_path / 'colocated'}", "reference.mode=colocated"]),
                            ("train", halves + ["parallel.tp=2", "parallel.sp=true", "parallel.etp=2",
                                                "stop_at_step=2"])],
          out_dir=tmp_path / "job", timeout=500)
    base, colocated, etp2 = (metrics(tmp_path / run) for run in ("base", "colocated", "halves"))
    assert base[0]["weight_min"] == base[0]["weight_max"] == 1.0 and base[0]["m_theta"] == 0.0
    assert base[-1]["m_theta"] != 0.0 and base[-1]["loss"] < base[0]["loss"]
    for a, b in zip(base, colocated):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]) and abs(a["m_theta"] - b["m_theta"]) <= 1e-6
    assert len(etp2) == 2 and etp2[1]["m_theta"] != 0.0
    exports_match_score(tmp_path, hf, tmp_path / "halves" / "checkpoints", data_prefix, experts_implementation="eager")
    peft_loads_the_expert_adapters(tmp_path / "peft", hf)
    spawn(2, run_commands, [("train", halves + ep2)], out_dir=tmp_path / "resume_job", timeout=300)
    resumed = metrics(tmp_path / "halves")  # steps 1-2 at TP 2 and ETP 2, steps 3-4 at EP 2
    assert len(resumed) == 4
    for a, b in zip(resumed, base):  # another layout: fp32 sums in another order
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) and abs(a["m_theta"] - b["m_theta"]) <= 1e-5


def peft_loads_the_expert_adapters(adapter_dir, hf):
    """Every tensor of the PEFT adapter (the routed experts' trained, nonzero B included) is what PEFT holds after
    from_pretrained: none left out as an unexpected key."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    experts_b = [k for k in saved if ".mlp.experts." in k and ".lora_B." in k]
    assert len(experts_b) == 4 and all(saved[k].abs().max() > 0 for k in experts_b)  # 2 layers x 2 tensors
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf, experts_implementation="eager"),
                                      str(adapter_dir))
    held = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}
    assert set(held) == set(saved) and all(torch.equal(held[k], saved[k].to(held[k].dtype)) for k in saved)


@pytest.mark.parametrize("overrides,message", [
    (["lora.target_modules=[experts.linear_fc1]"],
     r"lora.target_modules\[0\]: 'experts.linear_fc1': the model has no such linear"),
    (["model.num_experts=4", "parallel.tp=2", "parallel.sp=true", "parallel.etp=1"],
     r"parallel.etp: 1 below parallel.tp \(2\) needs parallel.ep > 1 with adapters on the routed experts"),
    (["model.num_experts=4", "parallel.etp=2"],
     r"parallel.etp: 2 must be 1 or parallel.tp \(1\) with adapters on the routed experts"),
    (["model.num_experts=4", "model.moe_ffn_hidden_size=2", "lora.target_modules=[experts.linear_fc2]"],
     r"lora.rank: 4 is larger than the model's smallest adapted dimension \(2\)"),
])
def test_moe_lora_settings_are_refused_in_one_line(tmp_path, data_prefix, overrides, message):
    from minorsft_megatron.config import ConfigError, load_config
    from tests.train_workers import tiny_config

    with pytest.raises(ConfigError, match=r"^(command line|\S+config\.yaml): " + message):
        load_config(tiny_config(tmp_path, data_prefix), ["lora.rank=4", *overrides])
