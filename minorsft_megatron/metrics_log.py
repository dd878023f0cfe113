"""Training logs, Megatron style: a console line per interval, TensorBoard scalars and a JSONL file per step.

Only the logging rank (the last rank, on the last pipeline stage, where the loss lives) writes.
"""

from __future__ import annotations

import json
import os
import sys

CONSOLE_KEYS = (
    ("loss", "loss", "{:.4f}"), ("m_theta", "m_theta", "{:+.4f}"), ("weight_mean", "w_mean", "{:.4f}"),
    ("weight_min", "w_min", "{:.4f}"), ("moe_load_balancing_loss", "lb_loss", "{:.4f}"), ("moe_z_loss", "z_loss", "{:.3f}"),
    ("moe_max_load", "max_load", "{:.2f}"), ("grad_norm", "grad_norm", "{:.3f}"), ("loss_scale", "loss_scale", "{:.1f}"),
)


def keep_until(path: str, iteration: int) -> None:
    """Drop the records of `path` past `iteration` (steps a crashed or stopped run logged after its last save, which
    the resumed run takes again), rewriting it atomically."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLog:
    def __init__(self, output_dir: str, total_steps: int, interval: int, tensorboard: bool,
                 progress_bar: bool | None, resume_at: int | None):
        """`resume_at`: the iteration a resumed run continues from (its later records are dropped); None: new."""
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.total_steps, self.interval = total_steps, interval
        if resume_at is not None:
            keep_until(self.path, resume_at)
        self.jsonl = open(self.path, "a" if resume_at is not None else "w", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        interactive = sys.stdout.isatty() if progress_bar is None else progress_bar
        self.bar = None
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def step(self, record: dict) -> None:
        """One step's record: iteration, consumed_samples, lr, metrics, grad_norm, tokens_per_s, ..."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, record["iteration"])
        if self.bar is not None:
            self.bar.n = record["iteration"]
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", m_theta=f"{record.get('m_theta', 0):+.4f}")
        if record["iteration"] % self.interval == 0 or record["iteration"] == self.total_steps:
            self.print(console_line(record, self.total_steps))

    def evaluation(self, record: dict) -> None:
        """One held-out set's evaluation (eval_record): metrics.jsonl, TensorBoard eval/SET/..., a console line."""
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("eval", "iteration") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{record['eval']}/{key}", value, record["iteration"])
        self.print(eval_console_line(record, self.total_steps))

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


EVAL_CONSOLE_KEYS = (
    ("nll_per_token", "nll/token", "{:.4f}"), ("m_theta", "m_theta", "{:+.4f}"), ("weight_mean", "w_mean", "{:.4f}"),
    ("weight_min", "w_min", "{:.4f}"), ("loss", "loss", "{:.4f}"), ("accuracy", "accuracy", "{:.4f}"),
)


def eval_console_line(r: dict, total_steps: int) -> str:
    parts = [f"eval {r['eval']} at iteration {r['iteration']}/{total_steps}", f"samples {int(r['num_samples'])}"]
    parts += [f"{label} {fmt.format(r[key])}" for key, label, fmt in EVAL_CONSOLE_KEYS if key in r]
    return " | ".join(parts + [f"s {r['seconds']:.3f}"])


def console_line(r: dict, total_steps: int) -> str:
    parts = [f"iteration {r['iteration']:6d}/{total_steps}", f"consumed samples {r['consumed_samples']:8d}",
             f"lr {r['lr']:.3e}"]
    parts += [f"{label} {fmt.format(r[key])}" for key, label, fmt in CONSOLE_KEYS if key in r]
    if r.get("skipped"):
        parts.append("skipped (overflow)")
    parts += [f"tokens/s {r['tokens_per_s']:.0f}", f"s/iter {r['seconds_per_iteration']:.3f}",
              f"mem {r['memory_gib']:.2f} GiB"]
    return " | ".join(parts)
