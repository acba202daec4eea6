"""Parallel layout (degrees and process groups) and CPU execution of Megatron-Core."""

from mrl.parallel.layout import ParallelConfig, ParallelLayout, check_model_divisibility

__all__ = ["ParallelConfig", "ParallelLayout", "check_model_divisibility"]
