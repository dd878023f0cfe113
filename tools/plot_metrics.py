#!/usr/bin/env python
"""Compare runs on the same quantities over training steps (the paper's Figure 1 and more):

    python tools/plot_metrics.py RUN [RUN ...] --out metrics.png [--labels A B ...] [--loss]

Panels: m_theta (deviation from the reference, logged whenever a reference is present) and the answer NLL per
token, -logp_per_token (logged for every loss), so methods are compared on one scale; `--loss` adds each run's
own training loss as a third panel (MinorSFT's loss is down-weighted: not comparable with raw SFT's).
RUN is a run directory (holding metrics.jsonl) or a metrics .jsonl file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(run: str) -> list[dict]:
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
    if not rows:
        raise ValueError(f"{path}: no metrics")
    last = {}
    for row in rows:  # a resumed run may repeat iterations: keep the latest of each
        last[row["iteration"]] = row
    return [last[i] for i in sorted(last)]


PANELS = {  # metric -> (title, y label, value of a metrics row)
    "m_theta": ("deviation from the reference, m_theta", "mean (1/m) log pi/pi_ref", lambda r: r.get("m_theta")),
    "nll": ("answer NLL per token", "-logp_per_token", lambda r: -r["logp_per_token"] if "logp_per_token" in r
            else None),
    "loss": ("each method's own training loss", "loss", lambda r: r.get("loss")),
}


def series(rows: list[dict], name: str) -> list[tuple[int, float]]:
    """(iteration, value) of panel `name` over the rows that log it."""
    points = [(r["iteration"], PANELS[name][2](r)) for r in rows]
    return [(step, value) for step, value in points if value is not None]


def plot(runs: list[str], labels: list[str], out: str, with_loss: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["m_theta", "nll"] + (["loss"] if with_loss else [])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4))
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        for ax, name in zip(axes, names):
            points = series(rows, name)
            if points:
                ax.plot(*zip(*points), label=label)
    for ax, name in zip(axes, names):
        title, ylabel, _ = PANELS[name]
        ax.set(title=title, xlabel="step", ylabel=ylabel)
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
