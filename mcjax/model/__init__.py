"""Pure Flax modules: the base GPT, rotary embeddings, the fused cross-entropy."""
