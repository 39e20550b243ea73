"""VQMoE (vector-quantized mixture of experts) on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
