"""quant-rl harness: RL post-training of LLMs under quantization, as a sweepable benchmark."""

__version__ = "0.1.0"
