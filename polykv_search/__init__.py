"""polykv-search: choose a KV-cache eviction policy and token budget for every layer of a causal LM."""

__version__ = "0.1.0"
