"""UniMP tasks that run over the engine's stages (prompt, prefill, decoding) through ``TaskContext``."""
