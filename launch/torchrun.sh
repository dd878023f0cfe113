#!/usr/bin/env bash
# Launch training (or another module) on one node or several with torchrun (quiet: minorsft_megatron.launch).
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
#
# Environment (defaults in brackets):
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#   GPUS_PER_NODE [the GPUs torch sees, or 2 CPU processes where there are none]
#   MODULE [minorsft_megatron.train]     DRY_RUN=1 prints the command instead of running it
#
# Two nodes: run on each node, with that node's NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh examples/qwen2_7b_minor_sft.yaml   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh examples/qwen2_7b_minor_sft.yaml   # on node1
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: launch/torchrun.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MODULE=${MODULE:-minorsft_megatron.train}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# torchrun with one line per error (minorsft_megatron/launch.py): the training config, world size included, is
# checked before any process starts, and a rank's one-line error is not followed by torchrun's traceback.
CMD=(python -m minorsft_megatron.launch --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
     -m "$MODULE" --config "$CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    echo "${CMD[@]}"
else
    exec "${CMD[@]}"
fi
