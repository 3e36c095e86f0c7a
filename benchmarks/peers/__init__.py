"""Peers for benchmark comparisons: upstream nanoGPT (run from ../shared/peers/nanogpt), a plain transformers Llama."""
