"""Evaluation during training: held-out figures against float64 and against `score` and `generate` on the same
checkpoint at four layouts, packed and padded; step-0 figures; training unchanged by evaluation; resumption; the
reference cache of a cache-mode run; keep_best; and the config's refusals."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minorsft_megatron.config import ConfigError, load_config
from minorsft_megatron.data.dataset import SFTDataset
from tests.convert_workers import make_hf_model
from tests.distributed import spawn
from tests.tokenizers_for_tests import DATA, REPO, SENTENCEPIECE_MODEL
from tests.train_workers import metrics, run_commands, tiny_config

EVAL_SAMPLES = 7  # uneven over two data-parallel ranks (4 + 3): rows of padding alone fill the short share
NEW_TOKENS = 4
BETA = 0.04


def preprocess(jsonl: str, prefix: str, template: str = "chatml") -> str:
    from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess as run

    run(PreprocessSettings(inputs=[jsonl], tokenizer=SENTENCEPIECE_MODEL, output_prefix=prefix,
                           chat_template=template, seq_length=128), log=lambda *_: None)
    return prefix


def generate_job(load: str, jsonl: str, out: str, tp: int = 1) -> None:
    from minorsft_megatron.generate import generate, parse_args

    generate(parse_args(["--load", load, "--tp", str(tp), "--jsonl", jsonl, "--tokenizer", SENTENCEPIECE_MODEL,
                         "--chat-template", "chatml", "--out", out, "--max-new-tokens", str(NEW_TOKENS)]))


def without_model(config: str) -> str:
    """The config with its model section left out: the model comes from checkpoint.init."""
    import yaml

    data = yaml.safe_load(open(config))
    data.pop("model")
    open(config, "w").write(yaml.safe_dump(data))
    return config


def rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny random Llama (the bundled tokenizer's vocabulary) and its megatron-core checkpoint."""
    root = tmp_path_factory.mktemp("start")
    hf = make_hf_model("llama", str(root / "hf"), vocab_size=1024)
    subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", hf, "--out",
                    str(root / "mg"), "--dtype", "fp32"], check=True, cwd=REPO, capture_output=True)
    return {"hf": hf, "mg": str(root / "mg")}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, start):
    """The first 8 bundled held-out records, every other one answered with the starting model's own greedy answer:
    exact-match accuracy at step 0 is then neither 0 nor 1. Returns (JSONL, preprocessed prefix)."""
    root = tmp_path_factory.mktemp("held_out")
    first = [json.loads(line) for line in open(os.path.join(DATA, "sft_eval.jsonl"))][:8]
    original = root / "original.jsonl"
    original.write_text("".join(json.dumps(r) + "\n" for r in first))
    spawn(1, generate_job, start["mg"], str(original), str(root / "greedy.jsonl"), out_dir=root / "job", timeout=300)
    greedy = rows(root / "greedy.jsonl")
    for i, (record, answer) in enumerate(zip(first, greedy)):
        if i % 2 == 0 and answer["generated"].strip():
            record["response"] = answer["generated"].strip()
    jsonl = root / "held_out.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in first))
    return str(jsonl), preprocess(str(jsonl), str(root / "held_out"))


def float64_answer_log_probs(hf_dir: str, prefix: str, n: int) -> tuple[list[float], list[int]]:
    """Each of the first n samples' answer log-prob sum and answer length, by transformers in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    dataset = SFTDataset(prefix)
    sums, counts = [], []
    for i in range(n):
        ids = torch.from_numpy(dataset.tokens(i))[None]
        mask = torch.from_numpy(dataset.answer_mask(i).astype(bool))[1:]
        with torch.no_grad():
            logp = model(ids[:, :-1]).logits[0].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        sums.append(float(logp[mask].sum()))
        counts.append(int(mask.sum()))
    return sums, counts


def figures(logp: list[float], ref: list[float], counts: list[int]) -> dict:
    """The held-out figures of MinorSFT from per-sample sums, in float64 (samples with m = 0 left out)."""
    kept = [(a, b, m) for a, b, m in zip(logp, ref, counts) if m > 0]
    weights = [2 / (1 + math.exp(BETA * (a - b))) for a, b, _ in kept]
    return {"nll_per_token": -sum(a for a, _, _ in kept) / sum(m for *_, m in kept),
            "m_theta": sum((a - b) / m for a, b, m in kept) / len(kept),
            "weight_mean": sum(weights) / len(kept), "weight_min": min(weights),
            "loss": -sum(w * a / m for w, (a, _, m) in zip(weights, kept)) / len(kept)}


def exact_matches(path, n: int) -> float:
    return sum(r["exact_match"] for r in rows(path)[:n]) / n


@pytest.mark.parametrize("tp,pp,dp,packing", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False), (1, 1, 2, True)])
def test_held_out_figures_equal_float64_score_and_generate(tmp_path, data_prefix, start, held_out, tp, pp, dp,
                                                           packing):
    jsonl, prefix = held_out
    first = tmp_path / "first.jsonl"  # the evaluated records, for generate
    first.write_text("".join(open(jsonl).readlines()[:EVAL_SAMPLES]))
    generating = pp == 1
    config = without_model(tiny_config(
        tmp_path, data_prefix, parallel={"tp": tp, "pp": pp}, data={"packing": packing, "valid": {"held_out": prefix}},
        logging={"eval_samples": EVAL_SAMPLES, "eval_generate": int(generating), "eval_max_new_tokens": NEW_TOKENS}))
    final = str(tmp_path / "run" / "checkpoints")
    commands = [
        ("train", ["--config", config, f"checkpoint.init={start['mg']}", "train_steps=2"]),
        ("score", ["--load", start["mg"], "--tp", str(tp), "--data", prefix, "--out", str(tmp_path / "init.jsonl")]),
        ("score", ["--load", final, "--tp", str(tp), "--pp", str(pp), "--data", prefix, "--out",
                   str(tmp_path / "final.jsonl")]),
    ]
    spawn(tp * pp * dp, run_commands, commands, out_dir=tmp_path / "job", timeout=600)
    if generating:
        spawn(tp, generate_job, final, str(first), str(tmp_path / "answers.jsonl"), tp, out_dir=tmp_path / "gen",
              timeout=300)
    evals = [r for r in metrics(tmp_path / "run") if "eval" in r]
    assert [(r["eval"], r["iteration"], r["num_samples"]) for r in evals] == [("held_out", 0, 7), ("held_out", 2, 7)]
    at_start, at_end = evals

    # step 0: the policy is the reference; its NLL is transformers' in float64, and score's
    assert at_start["m_theta"] == 0.0 and at_start["weight_min"] == at_start["weight_max"] == 1.0
    logp64, counts = float64_answer_log_probs(start["hf"], prefix, EVAL_SAMPLES)
    init = rows(tmp_path / "init.jsonl")[:EVAL_SAMPLES]
    assert [r["num_answer_tokens"] for r in init] == counts
    expected = figures(logp64, logp64, counts)
    assert at_start["nll_per_token"] == pytest.approx(expected["nll_per_token"], rel=1e-6)
    assert at_start["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert at_start["num_answer_tokens"] == sum(counts)

    # after training: the figures of score's sums on the saved checkpoint, against the starting model's
    ends = rows(tmp_path / "final.jsonl")[:EVAL_SAMPLES]
    expected = figures([r["logp_sum"] for r in ends], [r["logp_sum"] for r in init], counts)
    assert abs(expected["m_theta"]) > 1e-3  # the policy moved
    scale = expected["nll_per_token"]  # m_theta is a difference of fp32 log-probs of this size: 1e-6 of it
    for key, value in expected.items():
        assert at_end[key] == pytest.approx(value, rel=1e-6, abs=1e-6 * scale), key
    if generating:
        greedy = rows(held_out[0].replace("held_out.jsonl", "greedy.jsonl"))[:EVAL_SAMPLES]
        own = [i % 2 == 0 and bool(g["generated"].strip()) or g["exact_match"] for i, g in enumerate(greedy)]
        assert 0 < sum(own) < EVAL_SAMPLES
        assert at_start["accuracy"] == sum(own) / EVAL_SAMPLES
        assert at_end["accuracy"] == exact_matches(tmp_path / "answers.jsonl", EVAL_SAMPLES)
    else:
        assert "accuracy" not in at_end


def test_training_is_unchanged_by_evaluation_resumes_and_keeps_the_best(tmp_path, data_prefix, held_out):
    """lr 1.0 after a warm-up over half the run: the held-out NLL at step 4 is far above step 2's, so the best saved
    checkpoint is not the last."""
    _, prefix = held_out
    init = str(tmp_path / "init")
    config = tiny_config(tmp_path, data_prefix, parallel={"tp": 2}, optimizer={"lr": 1.0, "warmup_ratio": 0.5},
                         logging={"tensorboard": True})
    evaluating = ["data.valid.held_out=" + prefix, "logging.eval_interval=2", "checkpoint.interval=2",
                  "checkpoint.keep=1", "checkpoint.keep_best=held_out/nll_per_token", f"output_dir={tmp_path / 'e'}"]
    spawn(2, run_commands, [
        ("train", ["--config", config, "train_steps=4", f"output_dir={tmp_path / 'plain'}"]),
        ("train", ["--config", config, "train_steps=4", "stop_at_step=2", *evaluating]),
        ("train", ["--config", config, "train_steps=4", *evaluating]),
        ("init", [config, init]),
        ("score", ["--load", init, "--tp", "2", "--data", data_prefix, "--out", str(tmp_path / "train_ref.jsonl")]),
        ("score", ["--load", init, "--tp", "2", "--data", prefix, "--out", str(tmp_path / "held_out_ref.jsonl")]),
        ("train", ["--config", config, "train_steps=2", f"checkpoint.init={init}", "reference.mode=cache",
                   f"reference.cache={tmp_path / 'train_ref.jsonl'}", "data.valid.held_out=" + prefix,
                   f"output_dir={tmp_path / 'cache'}"]),
    ], out_dir=tmp_path / "job", timeout=600)
    plain, evaluated = metrics(tmp_path / "plain"), metrics(tmp_path / "e")
    assert [r for r in evaluated if "eval" not in r] == plain  # bit for bit
    evals = [r for r in evaluated if "eval" in r]
    assert [r["iteration"] for r in evals] == [0, 2, 4]  # resumed at 2 without evaluating again
    nll = {r["iteration"]: r["nll_per_token"] for r in evals}
    assert nll[2] < nll[4]
    saves = tmp_path / "e" / "checkpoints"
    best = json.loads((saves / "best_checkpoint.json").read_text())
    assert best["iteration"] == 2 and best["value"] == pytest.approx(nll[2], rel=1e-12)
    assert sorted(n for n in os.listdir(saves) if n.startswith("iter_")) == ["iter_0000002", "iter_0000004"]
    assert any(n.startswith("events") for n in os.listdir(tmp_path / "e" / "tensorboard"))

    cached = [r for r in metrics(tmp_path / "cache") if "eval" in r]  # its reference cache written at step 0
    cache = tmp_path / "cache" / "reference" / "held_out.jsonl"
    meta = json.loads(open(f"{cache}.meta.json").read())
    assert meta["dataset"]["fingerprint"] == SFTDataset(prefix).fingerprint and meta["num_samples"] == 8
    assert cached[0]["m_theta"] == 0.0 and cached[0]["weight_min"] == 1.0 == cached[0]["weight_max"]
    scored = rows(tmp_path / "held_out_ref.jsonl")[:8]  # what score writes for the starting checkpoint
    assert [r["index"] for r in rows(cache)] == list(range(8))
    for mine, theirs in zip(rows(cache), scored):
        assert mine["num_answer_tokens"] == theirs["num_answer_tokens"]
        assert mine["logp_sum"] == pytest.approx(theirs["logp_sum"], rel=1e-6)
    assert [r["iteration"] for r in cached] == [0, 2] and abs(cached[1]["m_theta"]) > 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["data.valid.held_out=/nowhere/eval"], "data.valid.held_out: /nowhere/eval.json not found"),
    (["logging.eval_interval=0"], "logging.eval_interval: must be at least 1"),
    (["checkpoint.keep_best=held_out/nll_per_token"], "checkpoint.keep_best: 'held_out/nll_per_token': SET/METRIC with "
                                                      "SET one of data.valid (none given)"),
    (["VALID", "checkpoint.keep_best=held_out/m_theta"], "METRIC must be one of nll_per_token, loss, accuracy"),
    (["VALID", "checkpoint.keep_best=held_out/loss"], "checkpoint.interval: keep_best compares the checkpoints"),
    (["VALID", "logging.eval_generate=1", "parallel.pp=2"], "logging.eval_generate: greedy decoding runs whole "
                                                            "prompts on each rank: needs parallel.pp 1"),
])
def test_evaluation_settings_are_refused_before_any_work(tmp_path, data_prefix, held_out, overrides, message):
    config = tiny_config(tmp_path, data_prefix)
    overrides = [f"data.valid.held_out={held_out[1]}" if o == "VALID" else o for o in overrides]
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    assert message in str(err.value)


def test_held_out_set_of_another_template_is_refused_in_one_line(tmp_path, data_prefix, held_out):
    other = preprocess(held_out[0], str(tmp_path / "plain"), template="none")
    config = tiny_config(tmp_path, data_prefix, data={"valid": {"held_out": other}})
    proc = subprocess.run([sys.executable, "-m", "minorsft_megatron.train", "--config", config], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.valid.held_out: {other} was preprocessed with "
                                                   "another chat template (none)"), proc.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
