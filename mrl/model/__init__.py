"""Model construction: typed configs and the Megatron-Core GPT builder."""

from mrl.model.config import ModelConfig, PrecisionConfig

__all__ = ["ModelConfig", "PrecisionConfig"]
