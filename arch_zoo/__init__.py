"""arch_zoo: attention-architecture research in JAX/Flax NNX."""
