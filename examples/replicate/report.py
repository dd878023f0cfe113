"""The study's summary: results.json, report.md (tables and the three verdicts) and the figures.

Every number is a mean over seeds with its sample standard deviation (the spread). A method's best setting is
the one with the highest mean task-B *dev* accuracy; its task-B *test* accuracy is what the tables compare.
Two means are called different when they differ by more than twice the standard error of their difference,
sqrt(sd1^2/n1 + sd2^2/n2); otherwise the comparison is not resolved at this scale.
"""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from run import FAMILY, METHODS, best_setting, mean_std, settings  # noqa: E402

LABELS = {"sft_seq": "raw SFT (sft_seq)", "sft_dpo": "SFT using DPO (sft_dpo)", "minor_sft": "MinorSFT (minor_sft)",
          "dft": "DFT (dft)", "asft": "ASFT (asft)", "iw_sft": "iw-SFT (iw_sft)"}
COLORS = {"sft_seq": "tab:blue", "sft_dpo": "tab:orange", "minor_sft": "tab:green", "dft": "tab:red",
          "asft": "tab:purple", "iw_sft": "tab:brown"}


def values(runs: list[dict], key: str) -> list[float]:
    return [r[key][-1] if isinstance(r[key], list) else r[key] for r in runs]


def cell(runs: list[dict], key: str, digits: int = 3, signed: bool = False) -> str:
    m, s = mean_std(values(runs, key))
    return f"{m:+.{digits}f} ± {s:.{digits}f}" if signed else f"{m:.{digits}f} ± {s:.{digits}f}"


def compare(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """(mean(a) - mean(b), standard error of that difference, sign: +1 / -1 if beyond 2 SE, else 0)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff, se = ma - mb, math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return diff, se, 1 if diff > 2 * se else -1 if diff < -2 * se else 0


# ---- tables --------------------------------------------------------------------------------------------------

COLUMNS = [("task B dev acc", "acc_b_dev", 3, False), ("task B test acc", "acc_b_test", 3, False),
           ("task A test acc", "acc_a_test", 3, False), ("task A NLL/token", "nll_a_test", 4, False),
           ("task A m_theta", "m_theta_a_test", 3, True), ("final train m_theta", "m_theta_steps", 3, True)]


def table(groups: dict, keys: list[tuple], base: dict | None) -> list[str]:
    head = "| method | lr | beta | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    if base is not None:
        lines.append("| base model | | | | " + " | ".join(
            f"{base[k]:.{d}f}" if k in base else "" for _, k, d, _ in COLUMNS) + " |")
    for k in keys:
        runs = groups[k]
        beta = "" if k[2] is None else f"{k[2]:g}"
        lines.append(f"| {k[0]} | {k[1]:g} | {beta} | {len(runs)} | "
                     + " | ".join(cell(runs, key, d, s) for _, key, d, s in COLUMNS) + " |")
    return lines


def matrix(groups: dict, key: str, digits: int, signed: bool) -> list[str]:
    """One row per (method, beta), one column per learning rate: mean ± sd over seeds of `key`."""
    lrs = sorted({k[1] for k in groups})
    rows = sorted({(k[0], k[2]) for k in groups}, key=lambda r: (METHODS.index(r[0]), r[1] or 0))
    lines = ["| method | beta | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|" + "---|" * (2 + len(lrs))]
    for method, beta in rows:
        cells = [cell(groups[(method, lr, beta)], key, digits, signed) if (method, lr, beta) in groups else ""
                 for lr in lrs]
        lines.append(f"| {method} | {'' if beta is None else f'{beta:g}'} | " + " | ".join(cells) + " |")
    return lines


def key_order(k: tuple) -> tuple:
    return METHODS.index(k[0]), k[2] or 0, k[1]


# ---- verdicts ------------------------------------------------------------------------------------------------

WORDS = {1: "holds", -1: "does not hold", 0: "not resolved at this scale"}


def final_m_theta(runs: list[dict]) -> float:
    return mean_std(values(runs, "m_theta_steps"))[0]


def claim_sign(signs: list[int]) -> int:
    return 1 if all(s == 1 for s in signs) else -1 if any(s == -1 for s in signs) else 0


def verdict_deviation(groups: dict, best: dict, paper_beta: float) -> tuple[str, list[str]]:
    """Claim 1: at each method's best setting, MinorSFT's training m_theta ends lower than the others'."""
    minor = values(groups[best["minor_sft"]], "m_theta_steps")
    notes, signs = [], []
    for other in ("sft_seq", "sft_dpo"):
        diff, se, sign = compare(values(groups[best[other]], "m_theta_steps"), minor)
        signs.append(sign)
        notes.append(f"final m_theta, {other} minus minor_sft, each at its best setting: {diff:+.3f} (SE {se:.3f})")
    lrs = sorted(k[1] for k in groups
                 if k[0] == "minor_sft" and k[2] == paper_beta and ("sft_seq", k[1], None) in groups)
    lower = sum(final_m_theta(groups[("minor_sft", lr, paper_beta)]) < final_m_theta(groups[("sft_seq", lr, None)])
                for lr in lrs)
    notes.append(f"at equal learning rate, minor_sft (beta {paper_beta:g}) ends with a lower m_theta than sft_seq "
                 f"at {lower} of {len(lrs)} learning rates")
    return WORDS[claim_sign(signs)], notes


def verdict_accuracy(groups: dict, best: dict) -> tuple[str, list[str]]:
    """Claim 2: at its best setting MinorSFT's task-B test accuracy is higher than both others' at theirs."""
    minor = values(groups[best["minor_sft"]], "acc_b_test")
    notes, signs = [], []
    for other in ("sft_seq", "sft_dpo"):
        diff, se, sign = compare(minor, values(groups[best[other]], "acc_b_test"))
        signs.append(sign)
        notes.append(f"task B test accuracy, minor_sft minus {other}, each at its best setting: {diff:+.3f} "
                     f"(SE {se:.3f})")
    return WORDS[claim_sign(signs)], notes


# What "MinorSFT beats X" means against each loss of the reference-aware family: higher task-B test accuracy,
# higher task-A test accuracy (retention) and a lower final training m_theta, each at the method's best setting.
FAMILY_MEASURES = (("task B test accuracy", "acc_b_test", 1), ("task A test accuracy", "acc_a_test", 1),
                   ("final training m_theta", "m_theta_steps", -1))


def verdict_family(groups: dict, best: dict, other: str) -> tuple[str, list[str]]:
    """Not the paper's: MinorSFT against `other` on the three measures, each at its best setting. It holds when all
    three count in MinorSFT's favour, does not hold when one counts against it."""
    notes, signs = [], []
    for title, key, better in FAMILY_MEASURES:
        diff, se, sign = compare(values(groups[best["minor_sft"]], key), values(groups[best[other]], key))
        signs.append(sign * better)
        notes.append(f"{title}, minor_sft minus {other}: {diff:+.3f} (SE {se:.3f}; "
                     f"{'higher' if better > 0 else 'lower'} is better)")
    return WORDS[claim_sign(signs)], notes


def verdict_learning_rate(groups: dict, best: dict) -> tuple[str, list[str]]:
    """Claim 3: MinorSFT's best learning rate is above raw SFT's. Resolved only when each method's dev accuracy at
    its own best learning rate beats its accuracy at the other's by more than 2 SE (for equal best learning
    rates, see same_best_learning_rate)."""
    (_, lr_minor, beta_minor), (_, lr_sft, _) = best["minor_sft"], best["sft_seq"]
    notes = [f"best learning rate (task B dev): minor_sft {lr_minor:g} (beta {beta_minor:g}), sft_seq {lr_sft:g}"]
    if lr_minor == lr_sft:
        return same_best_learning_rate(groups, best["minor_sft"], notes)
    separated = True
    for method, own, other, beta in (("minor_sft", lr_minor, lr_sft, beta_minor), ("sft_seq", lr_sft, lr_minor, None)):
        diff, se, sign = compare(values(groups[(method, own, beta)], "acc_b_dev"),
                                 values(groups[(method, other, beta)], "acc_b_dev"))
        notes.append(f"{method}: dev accuracy at lr {own:g} minus at lr {other:g}: {diff:+.3f} (SE {se:.3f})")
        separated &= sign == 1
    if not separated:
        return WORDS[0], notes
    return WORDS[1 if lr_minor > lr_sft else -1], notes


def same_best_learning_rate(groups: dict, minor_best: tuple, notes: list[str]) -> tuple[str, list[str]]:
    """Both best at one learning rate: the claim fails only if MinorSFT is measurably worse at the next higher one."""
    _, lr, beta = minor_best
    higher = sorted(k[1] for k in groups if k[0] == "minor_sft" and k[2] == beta and k[1] > lr)
    notes.append("both are best at the same learning rate")
    if not higher:
        return WORDS[0], notes + ["no higher learning rate in the grid"]
    diff, se, sign = compare(values(groups[("minor_sft", lr, beta)], "acc_b_dev"),
                             values(groups[("minor_sft", higher[0], beta)], "acc_b_dev"))
    notes.append(f"minor_sft: dev accuracy at lr {lr:g} minus at lr {higher[0]:g}: {diff:+.3f} (SE {se:.3f})")
    return WORDS[-1 if sign == 1 else 0], notes


# ---- figures -------------------------------------------------------------------------------------------------

def band(ax, runs: list[dict], key: str, color: str, label: str) -> None:
    curves = [r[key] for r in runs]
    n = min(len(c) for c in curves)
    steps = list(range(1, n + 1))
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    ax.plot(steps, mean, color=color, label=label)
    ax.fill_between(steps, [min(c[i] for c in curves) for i in range(n)],
                    [max(c[i] for c in curves) for i in range(n)], color=color, alpha=0.2, linewidth=0)


def setting_label(k: tuple) -> str:
    return f"{k[0]} lr {k[1]:g}" + ("" if k[2] is None else f" β {k[2]:g}")


def figure_m_theta(path: str, groups: dict, best: dict, paper_beta: float) -> None:
    """Like the paper's Figure 1: m_theta over the steps, each method at its best setting; and all at raw SFT's
    best learning rate (sft_dpo and minor_sft at the paper's beta)."""
    lr = best["sft_seq"][1]
    same = {m: (m, lr, paper_beta if m in ("sft_dpo", "minor_sft") else None) for m in METHODS}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, keys in zip(axes, (best, same)):
        for m in METHODS:
            if keys[m] in groups:
                band(ax, groups[keys[m]], "m_theta_steps", COLORS[m], setting_label(keys[m]))
    axes[0].set_title("each method at its best setting (task B dev)", fontsize=10)
    axes[1].set_title(f"all at lr {lr:g} (raw SFT's best), β {paper_beta:g}", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("m_theta = mean of (log π_θ − log π_ref) / m")
    fig.suptitle("Deviation from the base model during fine-tuning on task B (mean over seeds; band: min–max)")
    save(fig, path)


def figure_best_accuracy(path: str, groups: dict, best: dict, base: dict) -> None:
    """Like the paper's Figure 2: task-B test accuracy of each method at its best setting; and task-A retention."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    names = ["base"] + list(METHODS)
    for ax, key, title in ((axes[0], "acc_b_test", "task B (new skill): test exact match"),
                           (axes[1], "acc_a_test", "task A (pre-training skills): test exact match")):
        stats = [(base[key], 0.0)] + [mean_std(values(groups[best[m]], key)) for m in METHODS]
        ax.bar(range(len(names)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
               color=["tab:gray"] + [COLORS[m] for m in METHODS])
        ax.set_xticks(range(len(names)), ["base"] + [setting_label(best[m]).replace(" lr", "\nlr") for m in METHODS],
                      fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Each method at its best setting (chosen on task B dev; error bar: sd over seeds)")
    save(fig, path)


def figure_lr_sweep(path: str, groups: dict) -> None:
    """Per method: task-B test accuracy, task-A test accuracy and final m_theta against the learning rate, one
    line per beta."""
    rows = (("acc_b_test", "task B test accuracy"), ("acc_a_test", "task A test accuracy"),
            ("m_theta_steps", "final training m_theta"))
    fig, axes = plt.subplots(len(rows), len(METHODS), figsize=(4.3 * len(METHODS), 9), sharex=True, sharey="row")
    for j, m in enumerate(METHODS):
        betas = sorted({k[2] for k in groups if k[0] == m}, key=lambda b: b or 0)
        for n, beta in enumerate(betas):
            keys = sorted((k for k in groups if k[0] == m and k[2] == beta), key=lambda k: k[1])
            label = m if beta is None else f"β {beta:g}"
            for i, (key, _) in enumerate(rows):
                stats = [mean_std(values(groups[k], key)) for k in keys]
                axes[i][j].errorbar([k[1] for k in keys], [s[0] for s in stats], yerr=[s[1] for s in stats],
                                    marker="o", capsize=3, label=label, color=plt.cm.viridis(n / max(len(betas), 2)))
        axes[0][j].set_title(LABELS[m], fontsize=10)
        lrs = sorted({k[1] for k in groups if k[0] == m})
        for i, (_, title) in enumerate(rows):
            ax = axes[i][j]
            ax.set_xscale("log")
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(title)
            if i == len(rows) - 1:
                ax.set_xlabel("peak learning rate")
        axes[0][j].legend(fontsize=8)
    fig.suptitle("Learning-rate x beta sweep (mean ± sd over seeds)")
    save(fig, path)


def figure_tradeoff(path: str, groups: dict) -> None:
    """Every setting: task-B test accuracy against the deviation it cost (final m_theta, and task-A m_theta)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for m in METHODS:
        keys = [k for k in groups if k[0] == m]
        for ax, key in zip(axes, ("m_theta_steps", "m_theta_a_test")):
            ax.scatter([mean_std(values(groups[k], key))[0] for k in keys],
                       [mean_std(values(groups[k], "acc_b_test"))[0] for k in keys], color=COLORS[m], label=m)
    axes[0].set_xlabel("final training m_theta (task B)")
    axes[1].set_xlabel("m_theta on task A test (negative: forgetting)")
    axes[0].set_ylabel("task B test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy against deviation, every setting (mean over seeds)")
    save(fig, path)


def save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the report ----------------------------------------------------------------------------------------------

def write(out: str, base: dict, results: list[dict], args, minutes: float) -> None:
    groups = settings(results)
    best = {m: best_setting(groups, m) for m in METHODS}
    paper_beta = 0.04 if 0.04 in args.betas else args.betas[0]
    figures = {"fig1_m_theta.png": lambda p: figure_m_theta(p, groups, best, paper_beta),
               "fig2_best_accuracy.png": lambda p: figure_best_accuracy(p, groups, best, base),
               "fig3_sweep.png": lambda p: figure_lr_sweep(p, groups),
               "fig4_tradeoff.png": lambda p: figure_tradeoff(p, groups)}
    for name, draw in figures.items():
        draw(os.path.join(out, name))
    verdicts = {"1. MinorSFT deviates less than raw SFT and SFT using DPO": verdict_deviation(groups, best, paper_beta),
                "2. At its best learning rate MinorSFT scores higher on the new task": verdict_accuracy(groups, best),
                "3. MinorSFT needs a higher learning rate than raw SFT": verdict_learning_rate(groups, best)}
    verdicts.update({f"not the paper's: MinorSFT beats {LABELS[m].split(' (')[0]} on task B, task A and m_theta":
                     verdict_family(groups, best, m) for m in FAMILY})
    lines = [f"# Replication study: {len(results)} fine-tuning runs, {args.seeds} seeds, {minutes:.1f} min",
             "", "## Best setting of each method (chosen on task B dev)", ""]
    lines += table(groups, [best[m] for m in METHODS], base)
    lines += ["", "## Verdicts (a difference counts when it exceeds 2 standard errors)", ""]
    for claim, (word, notes) in verdicts.items():
        lines += [f"- **{claim}: {word}.**"] + [f"  - {n}" for n in notes]
    for title, key, digits, signed in (("Task B test accuracy", "acc_b_test", 3, False),
                                       ("Task A test accuracy (retention)", "acc_a_test", 3, False),
                                       ("Final training m_theta", "m_theta_steps", 2, True),
                                       ("m_theta on task A test, against the base", "m_theta_a_test", 2, True)):
        lines += ["", f"## {title}: every setting", ""] + matrix(groups, key, digits, signed)
    lines += ["", "## Every setting, all measures", ""] + table(groups, sorted(groups, key=key_order), None)
    lines += ["", "Figures: " + ", ".join(figures), ""]
    atomic_text(os.path.join(out, "report.md"), "\n".join(lines))
    summary = {"minutes": minutes, "args": vars(args), "base": base, "best": {m: list(k) for m, k in best.items()},
               "verdicts": {c: {"verdict": w, "notes": n} for c, (w, n) in verdicts.items()}, "runs": results}
    atomic_text(os.path.join(out, "results.json"), json.dumps(summary, indent=1))


def rewrite(out: str) -> None:
    """report.md and the figures again from `out`/results.json (the recorded run time is kept)."""
    import argparse

    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    write(out, summary["base"], summary["runs"], argparse.Namespace(**summary["args"]), summary["minutes"])


def atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "results.json")):
        sys.exit("usage: python examples/replicate/report.py STUDY_DIR   (a directory with results.json)")
    rewrite(sys.argv[1])
    print(f"rewrote {sys.argv[1]}/report.md and the figures from its results.json")
