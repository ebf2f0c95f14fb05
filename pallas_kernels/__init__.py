"""Pallas kernels, each beside its plain-jnp reference: masked top-k, budget scatter (packing kept
tokens into the pool), ragged decode attention over the pooled cache."""
