#!/usr/bin/env python
"""Tokenize SFT records (JSONL) into prompt-masked megatron-core indexed datasets. See --help and docs/data.md.

    python tools/preprocess_sft_data.py --input FILE.jsonl [FILE2 ...] --tokenizer PATH --output-prefix PREFIX
        [--chat-template NAME|auto|none] [--seq-length N] [--truncate answer|drop] [--workers K]
        [--skip-bad-records]
"""

import sys

from minorsft_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
