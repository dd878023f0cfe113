#!/usr/bin/env python
"""Speed-up of preprocessing with K worker processes over one, measured in one run on the same input.

    python benchmarks/preprocess.py [--workers K] [--copies 40] [--template chatml] [--repeats 3]

The input is the bundled training set repeated `--copies` times (48,000 records by default), tokenized with
the bundled SentencePiece tokenizer. Each worker count runs `--repeats` times, alternating, and the median
wall time is kept. Prints samples/s and tokens/s for each count and the speed-up ratio; also checks that
both runs wrote the same bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from minorsft_megatron.data.preprocess import PreprocessSettings, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "examples", "data")


def timed_run(inputs, out_prefix, workers, template):
    settings = PreprocessSettings(inputs=inputs, tokenizer=os.path.join(DATA, "tokenizer.model"),
                                  output_prefix=out_prefix, chat_template=template, workers=workers)
    start = time.perf_counter()
    meta = preprocess(settings, log=lambda *_: None)
    return time.perf_counter() - start, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = open(os.path.join(DATA, "sft_train.jsonl"), "rb").read()
        path = os.path.join(tmp, "input.jsonl")
        with open(path, "wb") as f:
            f.write(source * args.copies)
        seconds = {1: [], args.workers: []}
        metas = {}
        for _ in range(args.repeats):
            for workers in seconds:
                elapsed, metas[workers] = timed_run([path], os.path.join(tmp, f"w{workers}"), workers, args.template)
                seconds[workers].append(elapsed)
        same = all(open(os.path.join(tmp, f"w1{s}"), "rb").read() == open(os.path.join(tmp, f"w{args.workers}{s}"),
                   "rb").read() for s in ("_tokens.bin", "_tokens.idx", "_answer_mask.bin", "_answer_mask.idx"))
    counts = metas[1]["counts"]
    print(f"input: {counts['records']} records, {counts['tokens']} tokens; cpu cores: {os.cpu_count()}; "
          f"median of {args.repeats}")
    for workers, times in seconds.items():
        t = statistics.median(times)
        print(f"workers={workers}: {t:.2f} s, {counts['samples'] / t:.0f} samples/s, {counts['tokens'] / t:.0f} tokens/s")
    ratio = statistics.median(seconds[1]) / statistics.median(seconds[args.workers])
    print(f"speed-up of {args.workers} workers over 1: {ratio:.2f}x; identical output: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
