"""Write a randomly initialised model as a starting checkpoint (a base to fine-tune, score or pre-train from).

    torchrun --nproc-per-node N -m minorsft_megatron.init_checkpoint --config FILE.yaml --out DIR [key=value ...]

The model section of the config decides the architecture; `seed` the weights (drawn in full on the CPU, then
split, so the same seed gives the same model under any TP). DIR then holds a megatron-core dist checkpoint
with the config inside, loadable under any TP/PP (`checkpoint.init: DIR`, `score --load DIR`).
"""

from __future__ import annotations

import argparse
import shutil
import sys

from minorsft_megatron import checkpoint, parallel, paths
from minorsft_megatron.cli import ArgumentParser, run_main
from minorsft_megatron.config import load_config, to_dict
from minorsft_megatron.data.dataset import SFTDataset
from minorsft_megatron.device import setup_device
from minorsft_megatron.model import build_model
from minorsft_megatron.transformer_engine import RolePrecision


def init_checkpoint(config_path: str, out: str, overrides: list[str], overwrite: bool = False) -> None:
    """Write the starting checkpoint into `out`: a new or empty directory, or (`overwrite`) one to replace."""
    cfg = load_config(config_path, overrides)
    paths.check_fresh_dir(out, "--out", overwrite)
    paths.check_apart({"--out": out}, {"--config": config_path, "data.prefix": f"{cfg.data.prefix}.json"})
    device = setup_device(cfg.device)
    vocab = cfg.model.vocab_size or SFTDataset(cfg.data.prefix).meta["tokenizer"]["vocab_size"]
    parallel.initialize(device, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, seed=cfg.seed, ep=cfg.parallel.ep,
                        etp=cfg.parallel.etp)
    if overwrite:
        parallel.on_rank_zero(lambda: shutil.rmtree(out, ignore_errors=True))
    model, _ = build_model(cfg, RolePrecision(cfg.precision.dtype), vocab, device, initialize=True)
    path = checkpoint.save(out, 0, model, None, {"config": to_dict(cfg), "vocab_size": vocab, "kind": "init"})
    if parallel.is_logging_rank():
        print(f"wrote the initial checkpoint {path}", flush=True)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m minorsft_megatron.init_checkpoint", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="a new or empty directory")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value")

    def job():
        args = parser.parse_args(argv)
        init_checkpoint(args.config, args.out, args.overrides, args.overwrite)

    return run_main(job)


if __name__ == "__main__":
    sys.exit(main())
