"""MinorSFT fine-tuning on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
