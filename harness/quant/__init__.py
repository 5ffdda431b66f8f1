"""Quantization formats, one per `quant:` name: bitsandbytes, ModelOpt fake quant, NVFP4 on CPU."""
