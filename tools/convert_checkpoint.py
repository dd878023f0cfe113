#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoint conversion (Llama 2/3/3.1, Qwen2/2.5, Qwen3, Mistral). See --help.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir DIR --out DIR [--spec local|te] [--dtype bf16|fp32] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf --load DIR --out DIR [--verify]
"""

import sys

from minorsft_megatron.convert import main

if __name__ == "__main__":
    sys.exit(main())
