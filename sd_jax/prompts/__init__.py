"""Prompts as A1111 writes them: emphasis, ``BREAK``, long prompts in 75-token chunks, LoRA
tags (:mod:`.parser`, :mod:`.chunks`), and textual-inversion embeddings (:mod:`.embeddings`)."""
from sd_jax.prompts.chunks import CHUNK, SYNTAXES, chunk_prompt, count_chunks, emphasis, prompt_arrays
from sd_jax.prompts.parser import extract_loras, parse_prompt_attention

__all__ = ["CHUNK", "SYNTAXES", "chunk_prompt", "count_chunks", "emphasis", "prompt_arrays", "extract_loras",
           "parse_prompt_attention"]
