"""Compose models: speculative decoding with a small draft (speculative.py), a calibrated cascade to a larger model
(cascade.py), a router over specialists (router.py), and the OpenAI-compatible client they share for remote models
(remote.py)."""
