#!/usr/bin/env python
"""Peak memory of checkpoint conversion against the model size and the largest tensor, both directions.

    python benchmarks/convert_memory.py [--hidden 2048] [--layers 8] [--vocab 32000]

Writes a random Llama-style Hugging Face checkpoint (bf16) to a temporary directory, converts it to Megatron and
back, and samples the process's anonymous resident memory (RssAnon: what cannot be paged out to the files) every
5 ms. Prints the peak above the level just before each conversion, next to the model's size and its largest
tensor. Memory-mapped staging files and the page cache are file-backed and not counted: the kernel can drop them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import torch


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(0.005)

    def __enter__(self):
        self.base = rss_anon_bytes()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def write_random_llama(path: str, hidden: int, layers: int, vocab: int) -> tuple[int, int]:
    """A random bf16 Llama checkpoint written tensor by tensor; returns (total bytes, largest tensor bytes)."""
    import json

    from safetensors.torch import save_file

    heads, kv, ffn = hidden // 128, max(1, hidden // 512), int(hidden * 2.75)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "torch_dtype": "bfloat16"}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    d = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * d, hidden), p + "self_attn.k_proj.weight": (kv * d, hidden),
                       p + "self_attn.v_proj.weight": (kv * d, hidden), p + "self_attn.o_proj.weight": (hidden, heads * d),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    weight_map, total, largest = {}, 0, 0
    for n, (name, shape) in enumerate(shapes.items()):
        tensor = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        file = f"part-{n:05d}.safetensors"
        save_file({name: tensor}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map[name] = file
        total += tensor.numel() * 2
        largest = max(largest, tensor.numel() * 2)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total, largest


def convert_in_child(direction: str, source: str, target: str) -> tuple[int, int]:
    """Run one direction in a fresh process (so one direction's freed memory does not hide the other's)."""
    import json
    import sys

    from children import run_child

    out = run_child([sys.executable, __file__, "--child", direction, source, target], direction).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["base"], result["peak"]


def child(direction: str, source: str, target: str) -> None:
    import json

    from minorsft_megatron.convert import hf_to_megatron, megatron_to_hf, single_process_group

    single_process_group()
    convert = hf_to_megatron if direction == "hf-to-megatron" else megatron_to_hf
    with PeakSampler() as sampler:
        convert(source, target, log=lambda *_: None)
    print(json.dumps({"base": sampler.base, "peak": sampler.peak}))


def main() -> int:
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        total, largest = write_random_llama(os.path.join(tmp, "hf"), args.hidden, args.layers, args.vocab)
        results = {
            "hf-to-megatron": convert_in_child("hf-to-megatron", os.path.join(tmp, "hf"), os.path.join(tmp, "mg")),
            "megatron-to-hf": convert_in_child("megatron-to-hf", os.path.join(tmp, "mg"), os.path.join(tmp, "back")),
        }
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"model {mib(total):.0f} MiB (bf16, {args.layers} layers, hidden {args.hidden}), largest tensor "
          f"{mib(largest):.0f} MiB")
    for name, (base, peak) in results.items():
        extra = peak - base
        print(f"{name}: peak anonymous memory above the start {mib(extra):.0f} MiB = "
              f"{extra / largest:.2f} x largest tensor = {extra / total:.2f} x model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
