"""jdpo: Direct Preference Optimization in JAX / Flax NNX."""
