"""peftjax: parameter-efficient fine-tuning, quantization, compression and MoE in JAX/Flax."""
__version__ = '0.1.0'
