"""Models: loading a policy (and its quantized base), the built-in tiny model, checkpoints, export."""
