#!/usr/bin/env python
"""Plot m_theta and loss over training steps for several runs side by side (the paper's Figure 1).

    python tools/plot_metrics.py RUN [RUN ...] --out metrics.png [--labels A B ...]

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


def plot(runs: list[str], labels: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        steps = [r["iteration"] for r in rows]
        if any("m_theta" in r for r in rows):
            left.plot(steps, [r.get("m_theta", float("nan")) for r in rows], label=label)
        right.plot(steps, [r["loss"] for r in rows], label=label)
    left.set(title="deviation from the reference, m_theta", xlabel="step", ylabel="mean (1/m) log pi/pi_ref")
    right.set(title="training loss", xlabel="step", ylabel="loss")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = f"{out}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN")
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", nargs="+")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: --labels: {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    try:
        plot(args.runs, labels, args.out)
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
