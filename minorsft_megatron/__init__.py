"""MinorSFT fine-tuning on NVIDIA Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Known, harmless notices that would otherwise open every command's output: megatron-core saying it falls back
# to torch without Apex/Transformer Engine, torch's ShardedTensor deprecation inside dist checkpointing, and torch's
# note that a checkpoint is read by one process (megatron-core 0.19 reads the common state and, at load, asks for
# exactly that: the intent, not a problem), and torch's note on load's argument order (0.19 passes them by
# position; the call is right).
warnings.filterwarnings("ignore", message=r".*Apex (is|are) not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings(
    "ignore", category=FutureWarning, module=r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing)"
)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)
warnings.filterwarnings("ignore", message="The argument order of load has been changed", category=UserWarning)
# torch 2.13 renames two collectives that megatron-core calls by their old names (one notice per rank, per name).
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is "
                        "deprecated", category=FutureWarning)
