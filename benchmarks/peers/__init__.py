"""Peer training baselines (vendored nanoGPT, a plain transformers Llama) for benchmark comparisons."""
