"""tools/plot_metrics.py: methods compared on m_theta and the answer NLL per token; the loss panel optional."""

import json
import os
import subprocess
import sys

from tests.tokenizers_for_tests import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import plot_metrics  # noqa: E402


def write_run(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_runs_are_compared_on_m_theta_and_answer_nll_with_the_loss_optional(tmp_path):
    minor = write_run(tmp_path / "minor", [
        {"iteration": 1, "loss": 1.5, "logp_per_token": -1.5, "m_theta": 0.0},
        {"iteration": 2, "loss": 0.6, "logp_per_token": -1.2, "m_theta": 0.25},
        {"iteration": 2, "loss": 0.5, "logp_per_token": -1.0, "m_theta": 0.5},  # a resumed run repeats: last wins
    ])
    sft = write_run(tmp_path / "sft", [{"iteration": 1, "loss": 1.5, "logp_per_token": -1.5}])
    rows = plot_metrics.read_metrics(minor)
    assert plot_metrics.series(rows, "nll") == [(1, 1.5), (2, 1.0)]
    assert plot_metrics.series(rows, "m_theta") == [(1, 0.0), (2, 0.5)]
    assert plot_metrics.series(plot_metrics.read_metrics(sft), "m_theta") == []  # no reference, no m_theta
    for extra, panels in (([], 2), (["--loss"], 3)):
        out = tmp_path / f"plot{panels}.png"
        done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), minor, sft, "--out",
                               str(out), *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        from PIL import Image

        width, _ = Image.open(out).size
        assert width == int(5.5 * panels * 110)


def test_the_output_format_follows_the_extension_and_a_bad_place_is_one_line(tmp_path):
    run = write_run(tmp_path / "run", [{"iteration": 1, "loss": 1.5, "logp_per_token": -1.5}])
    script = os.path.join(REPO, "tools", "plot_metrics.py")
    done = subprocess.run([sys.executable, script, run, "--out", str(tmp_path / "m.pdf")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and (tmp_path / "m.pdf").read_bytes().startswith(b"%PDF")
    bad = subprocess.run([sys.executable, script, run, "--out", str(tmp_path / "no" / "m.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: --out {tmp_path / 'no' / 'm.png'}: ")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_held_out_evaluations_get_their_own_row_and_never_replace_training_steps(tmp_path):
    run = write_run(tmp_path / "run", [
        {"eval": "held_out", "iteration": 0, "loss": 2.0, "logp_per_token": -2.0, "m_theta": 0.0},
        {"iteration": 1, "loss": 1.5, "logp_per_token": -1.5, "m_theta": 0.0},
        {"iteration": 2, "loss": 1.0, "logp_per_token": -1.0, "m_theta": 0.5},
        {"eval": "held_out", "iteration": 2, "loss": 1.8, "logp_per_token": -1.8, "m_theta": 0.3},
        {"eval": "task_a", "iteration": 2, "loss": 3.0, "logp_per_token": -3.0, "m_theta": -0.2},
    ])
    assert plot_metrics.series(plot_metrics.read_metrics(run), "nll") == [(1, 1.5), (2, 1.0)]
    sets = plot_metrics.read_evaluations(run)
    assert sorted(sets) == ["held_out", "task_a"]
    assert plot_metrics.series(sets["held_out"], "m_theta") == [(0, 0.0), (2, 0.3)]
    out = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), run, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(out).size == (int(5.5 * 2 * 110), int(4 * 2 * 110))
