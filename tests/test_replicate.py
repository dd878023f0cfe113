"""The replication study (examples/replicate): its synthetic skills, and the whole pipeline on a tiny corpus."""

import json
import os
import subprocess
import sys

from tests.tokenizers_for_tests import REPO

sys.path.insert(0, os.path.join(REPO, "examples", "replicate"))
import run  # noqa: E402  (examples/replicate/run.py)
import tasks  # noqa: E402

SIZES = {"a_train": 400, "a_test": 40, "b_train": 60, "b_dev": 20, "b_test": 30}


def test_skills_spell_what_their_docstring_says():
    assert [tasks.SKILLS_A[s]("bdca") for s in ("copy", "rev", "sort", "next")] == ["bdca", "acdb", "abcd", "cedb"]
    assert tasks.SKILL_B[1]("bdca") == "jbca"  # reversed: acdb; each letter back by one, a wrapping to j
    assert tasks.SKILLS_A["next"]("hij") == "ija"


def test_corpus_is_deterministic_and_held_out_words_are_unseen():
    splits = tasks.corpus(7, **SIZES)
    assert splits == tasks.corpus(7, **SIZES)
    assert splits != tasks.corpus(8, **SIZES)
    assert {k: len(v) for k, v in splits.items()} == SIZES

    def words(name):
        return {r["prompt"].split()[1] for r in splits[name]}

    for name in ("b_dev", "b_test"):
        assert not words(name) & words("b_train")
    assert not words("b_dev") & words("b_test")
    for skill in tasks.SKILLS_A:  # per skill, test words are not training words of that skill
        train = {r["prompt"] for r in splits["a_train"] if r["prompt"].startswith(skill + " ")}
        test = {r["prompt"] for r in splits["a_test"] if r["prompt"].startswith(skill + " ")}
        assert test and not test & train
    for rows in splits.values():
        for r in rows:
            skill, word, eq = r["prompt"].split()
            fn = tasks.SKILLS_A.get(skill) or dict([tasks.SKILL_B])[skill]
            assert eq == "=" and r["response"] == fn(word) and tasks.MIN_LEN <= len(word) <= tasks.MAX_LEN


def test_study_runs_end_to_end_on_a_tiny_corpus(tmp_path):
    """`run.py --smoke`: data, base model, every method through train/generate/score in the worker pool, report."""
    out = tmp_path / "study"
    argv = [sys.executable, "examples/replicate/run.py", "--smoke", "--out", str(out), "--seeds", "2",
            "--lrs", "1e-3", "--betas", "0.04", "--workers", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "total run time:" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in run.METHODS for s in (1, 2))
    assert set(run.METHODS) >= {"sft_seq", "sft_dpo", "minor_sft", "dft", "asft", "iw_sft"}
    for r in runs:
        # Step 1 is measured before any update: the policy is the base the fp32 reference cache was scored with.
        assert abs(r["m_theta_steps"][0]) < 1e-5
        assert 0.0 <= r["acc_b_test"] <= 1.0 and r["nll_a_test"] > 0
        assert len(r["m_theta_steps"]) == run.SMOKE_SIZES["b_train"] // 32  # one epoch at global batch 32
    assert set(results["best"]) == set(run.METHODS)
    report = (out / "report.md").read_text()
    claims = ("1. MinorSFT deviates less", "2. At its best learning rate", "3. MinorSFT needs a higher",
              *(f"not the paper's: MinorSFT beats {name}" for name in ("DFT", "ASFT", "iw-SFT")))
    for claim in claims:
        verdict = results["verdicts"][next(c for c in results["verdicts"] if c.startswith(claim))]["verdict"]
        assert verdict in ("holds", "does not hold", "not resolved at this scale")
        assert claim in report
    for name in ("fig1_m_theta.png", "fig2_best_accuracy.png", "fig3_sweep.png", "fig4_tradeoff.png"):
        assert (out / name).stat().st_size > 10_000

