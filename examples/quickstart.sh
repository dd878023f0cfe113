#!/usr/bin/env bash
# The quickstart: on a machine with no GPU, fine-tune a tiny GPT on the bundled SFT data with MinorSFT at
# tensor-parallel size 2 (two CPU processes), and with raw SFT (sft_seq) for comparison, then plot both.
# Usage: bash examples/quickstart.sh        (from the repository root, after `pip install -e .`)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
mkdir -p runs/data

python tools/preprocess_sft_data.py --input examples/data/sft_train.jsonl \
    --tokenizer examples/data/tokenizer.model --chat-template chatml --seq-length 128 \
    --output-prefix runs/data/sft_train --workers 2
python tools/preprocess_sft_data.py --input examples/data/sft_eval.jsonl \
    --tokenizer examples/data/tokenizer.model --chat-template chatml --seq-length 128 \
    --output-prefix runs/data/sft_eval

# held-out evaluation at step 0, every 25 steps and after the last (answer NLL, m_theta, weights; eval/ in the logs)
EVAL="data.valid.held_out=runs/data/sft_eval logging.eval_interval=25"

export GPUS_PER_NODE=$NPROC
launch/torchrun.sh examples/tiny_cpu.yaml $EVAL
launch/torchrun.sh examples/tiny_cpu.yaml loss.name=sft_seq output_dir=runs/tiny_cpu_sft_seq $EVAL

python tools/plot_metrics.py runs/tiny_cpu runs/tiny_cpu_sft_seq --labels minor_sft sft_seq \
    --out runs/tiny_cpu/metrics.png --loss

cat <<DONE

Quickstart finished.
  metrics:     runs/tiny_cpu/metrics.jsonl, runs/tiny_cpu_sft_seq/metrics.jsonl (TensorBoard: runs/*/tensorboard)
  checkpoint:  runs/tiny_cpu/checkpoints (latest in latest_checkpointed_iteration.txt)
  plot:        runs/tiny_cpu/metrics.png (m_theta, answer NLL per token and each loss over steps, minor_sft against
               sft_seq, on training batches and on the held-out set)
DONE
