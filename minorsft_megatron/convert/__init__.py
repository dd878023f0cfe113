"""Hugging Face <-> Megatron checkpoints for Llama (2, 3, 3.1), Qwen2/2.5, Qwen3, Mistral, and the
mixture-of-experts Qwen3-MoE, Qwen2-MoE and Mixtral.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir DIR --out DIR [--spec local|te] [--dtype bf16|fp32] [--verify]
    python tools/convert_checkpoint.py megatron-to-hf --load DIR --out DIR [--verify]

The Megatron side is a megatron-core dist checkpoint (loads under any TP/PP/EP/ETP) whose common state carries
the training config, the original Hugging Face config and the tokenizer/generation files; its keys are
megatron-core's own (`GPTModel.sharded_state_dict()` of a model built on the meta device), which the local spec
already maps to Transformer Engine's fused layer-norm + linear names, so one checkpoint serves both specs. The
Hugging Face side is safetensors plus config.json, generation_config.json and the tokenizer files.

Memory stays bounded by the largest tensor: Hugging Face tensors are read one at a time and staged to
memory-mapped files before the dist checkpoint is written; the other way, megatron tensors (one expert's at a
time) are loaded one at a time and streamed into the safetensors file.

The package: family.py (what a family is: config mapping and tensor rules), families/ (one module per family),
tensors.py (the rules applied), io.py (reading, staging, writing), directions.py (the two directions, verify).
"""

from __future__ import annotations

import sys

from minorsft_megatron.convert.directions import hf_to_megatron, megatron_to_hf, verify, write_hf, write_megatron
from minorsft_megatron.convert.family import FAMILIES, ConversionError, interleave_qkv, split_qkv
from minorsft_megatron.convert.io import (
    DistCheckpointReader,
    HFReader,
    allocate_large_tensors_with_mmap,
    read_hf_config,
    single_process_group,
)
from minorsft_megatron.convert.tensors import (
    SUPPORTED,
    hf_config_from_model,
    hf_from_megatron,
    hf_names,
    megatron_from_hf,
    model_config_from_hf,
)

__all__ = [
    "FAMILIES", "SUPPORTED", "ConversionError", "DistCheckpointReader", "HFReader", "allocate_large_tensors_with_mmap",
    "hf_config_from_model", "hf_from_megatron", "hf_names", "hf_to_megatron", "interleave_qkv", "main",
    "megatron_from_hf", "megatron_to_hf", "model_config_from_hf", "read_hf_config", "single_process_group",
    "split_qkv", "verify", "write_hf", "write_megatron",
]


def parse_args(argv=None):
    import argparse

    from minorsft_megatron.cli import ArgumentParser

    parser = ArgumentParser(prog="tools/convert_checkpoint.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="a Hugging Face directory to a megatron-core dist checkpoint")
    to_mg.add_argument("--hf-dir", required=True)
    to_mg.add_argument("--spec", choices=("local", "te"), default="local")
    to_mg.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    to_hf = sub.add_parser("megatron-to-hf", help="a megatron-core checkpoint to a Hugging Face directory")
    to_hf.add_argument("--load", required=True)
    to_hf.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: the checkpoint's")
    to_hf.add_argument("--lora", choices=("merged", "peft"), default="merged",
                       help="a LoRA run's checkpoint: the full model with the adapters merged in (default), or a PEFT "
                            "adapter (adapter_config.json, adapter_model.safetensors) for the base it started from")
    for direction in (to_mg, to_hf):
        direction.add_argument("--out", required=True, help="a new or empty directory")
        direction.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never an input)")
        direction.add_argument("--verify", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import warnings

    from minorsft_megatron.compat import check_megatron_version
    from minorsft_megatron.errors import UserError

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    try:
        args = parse_args(argv)
        check_megatron_version()
        if args.direction == "hf-to-megatron":
            path = hf_to_megatron(args.hf_dir, args.out, args.spec, args.dtype, overwrite=args.overwrite)
            if args.verify:
                verify(args.hf_dir, path)
        else:
            if args.verify and args.lora == "peft":
                raise UserError("--verify compares a full model: leave it out with --lora peft")
            megatron_to_hf(args.load, args.out, args.dtype, overwrite=args.overwrite, lora=args.lora)
            if args.verify:
                verify(args.out, args.load)
    except (UserError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
