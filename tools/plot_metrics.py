#!/usr/bin/env python
"""Compare runs on the same quantities over training steps (the paper's Figure 1 and more):

    python tools/plot_metrics.py RUN [RUN ...] --out metrics.png [--labels A B ...] [--loss]

Panels: m_theta (deviation from the reference, logged whenever a reference is present) and the answer NLL per
token, -logp_per_token (logged for every loss), so methods are compared on one scale; `--loss` adds each run's
own training loss as a third panel (MinorSFT's loss is down-weighted: not comparable with raw SFT's).
RUN is a run directory (holding metrics.jsonl) or a metrics .jsonl file. Where a run evaluated held-out sets
(data.valid), a second row of panels draws the same quantities on each held-out set, one line per run and set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_records(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})")
    if not any("eval" not in row for row in rows):
        raise ValueError(f"{path}: no metrics")
    return rows


def latest_of_each_iteration(rows: list[dict]) -> list[dict]:
    last = {}
    for row in rows:  # a resumed run may repeat iterations: keep the latest of each
        last[row["iteration"]] = row
    return [last[i] for i in sorted(last)]


def read_metrics(run: str) -> list[dict]:
    """The training steps' records of `run`, in iteration order."""
    return latest_of_each_iteration([r for r in read_records(run) if "eval" not in r])


def read_evaluations(run: str) -> dict[str, list[dict]]:
    """{held-out set: its evaluation records in iteration order} of `run` ({} without evaluation)."""
    sets: dict[str, list[dict]] = {}
    for row in read_records(run):
        if "eval" in row:
            sets.setdefault(row["eval"], []).append(row)
    return {name: latest_of_each_iteration(rows) for name, rows in sets.items()}


PANELS = {  # metric -> (title, y label, value of a metrics row)
    "m_theta": ("deviation from the reference, m_theta", "mean (1/m) log pi/pi_ref", lambda r: r.get("m_theta")),
    "nll": ("answer NLL per token", "-logp_per_token", lambda r: -r["logp_per_token"] if "logp_per_token" in r
            else None),
    "loss": ("each method's own loss", "loss", lambda r: r.get("loss")),
}


def series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(iteration, value) of panel `name` over the rows that log it."""
    points = [(r["iteration"], PANELS[name][2](r)) for r in rows]
    return [(step, value) for step, value in points if value is not None]


def draw(axes, names: list[str], rows: list[dict], label: str, **style) -> None:
    for ax, name in zip(axes, names):
        points = series(rows, name)
        if points:
            ax.plot(*zip(*points), label=label, **style)


def plot(runs: list[str], labels: list[str], out: str, with_loss: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["m_theta", "nll"] + (["loss"] if with_loss else [])
    evaluations = [read_evaluations(run) for run in runs]
    rows_of_panels = 2 if any(evaluations) else 1
    fig, axes = plt.subplots(rows_of_panels, len(names), figsize=(5.5 * len(names), 4 * rows_of_panels),
                             squeeze=False)
    for run, label, sets in zip(runs, labels, evaluations):
        draw(axes[0], names, read_metrics(run), label)
        for name, rows in sets.items():
            draw(axes[-1], names, rows, f"{label}: {name}", marker="o")
    for row, where in zip(axes, ["training", "held-out"][:rows_of_panels]):
        for ax, name in zip(row, names):
            title, ylabel, _ = PANELS[name]
            ax.set(title=f"{title} ({where})", xlabel="step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
    fig.tight_layout()
    extension = os.path.splitext(out)[1].lstrip(".").lower() or "png"
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=110, format=extension)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--loss", action="store_true", help="add each run's own training loss as a third panel")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: --labels: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        plot(args.runs, labels, args.out, args.loss)
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
