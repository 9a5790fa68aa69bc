"""Loading causal LMs, LoRA, reference strategies and the memory-lean log-prob computation."""
