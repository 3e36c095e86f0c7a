"""Batched decoding for transformers decoders that are not slmkit's Llama (an imported GPT-2, Qwen2, GPT-Neo ...):
the engine's rows share one transformers `DynamicCache`, left-padded so that every row's next token sits at the
same cache index.

    row 0   . . k k k k k k     pad 2   positions 0-5
    row 1   k k k k k k k k     pad 0   positions 0-7
    row 2   . . . . . k k k     pad 5   (joined last: its prompt was read alone, then padded on the left)

Each step feeds one token per row with an attention mask that hides the padding and position ids that count each
row's own tokens, so a row decodes exactly as it would alone. A new row's prompt is read alone (one forward), its
cache padded to the batch's length (or the batch's to its length) and appended; finished rows are dropped and the
padding every row still has in common is cut from the left. Memory follows kv.py's rule (rows x the longest
reservation within the budget): the cache is never longer than its longest row.

Sliding-window layers (Gemma 3's local attention) hold only their window's last positions of every row; their
position count is kept equal to the batch's length. State-space and linear-attention layers (the conv and recurrent
states of LFM2's short convolutions, Qwen3-Next's gated delta rule, Mamba's SSMs; alone or in hybrid layers) hold a
fixed-size state per row, not positions: a new row's states are appended, a finished row's dropped, nothing padded
(transformers masks no single-token step of theirs). Models with other caches are not batched: the engine then
decodes their rows one after another (generate.py's loop), as before.
"""

from __future__ import annotations

import torch

from slmkit.infer.generate import cache_kwarg
from slmkit.serve.kv import DEFAULT_KV_MEMORY


def batchable(model: torch.nn.Module) -> bool:
    """MODEL is a transformers decoder whose DynamicCache holds only layers this module can batch: key/value
    (plain, sliding-window) and per-row states (linear attention, state-space), or both in one hybrid layer."""
    from transformers import cache_utils as cu

    if not hasattr(model, "config") or not hasattr(model, "generation_config"):
        return False
    try:
        cache = cu.DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 — a config this transformers cannot build a cache for
        return False
    kinds = tuple(getattr(cu, n) for n in ("DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer",
                                           "LinearAttentionAndFullAttentionLayer",
                                           "LinearAttentionAndSlidingWindowAttentionLayer") if hasattr(cu, n))
    return bool(cache.layers) and all(type(layer) in kinds for layer in cache.layers)


def _has_kv(layer) -> bool:
    return getattr(layer, "keys", None) is not None  # key/value positions (attention, or a hybrid's attention part)


def _states(layer) -> list[tuple[dict, int]]:
    """LAYER's per-row state tensors as (dict, key) slots: a linear-attention layer's conv and recurrent states."""
    return [(d, k) for d in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None))
            if isinstance(d, dict) for k, v in d.items() if isinstance(v, torch.Tensor)]


def _kept(layer, length: int) -> int:
    """Positions LAYER holds when the batch is LENGTH long: all of them, or a sliding window's last W - 1."""
    window = getattr(layer, "sliding_window", None)
    return length if window is None else min(length, window - 1)


class HFBatch:
    """The rows in flight of one transformers decoder: their shared cache, each row's left padding and position."""

    def __init__(self, model: torch.nn.Module, budget: int | None = None):
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.model = model
        self.budget = budget or DEFAULT_KV_MEMORY
        heads = getattr(c, "num_attention_heads", None)  # none in a pure state-space model: no positions kept
        kv_heads = getattr(c, "num_key_value_heads", None) or heads or 0
        head = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else 0)
        itemsize = next(model.parameters()).element_size()
        self.position_bytes = max(1, c.num_hidden_layers * 2 * kv_heads * head * itemsize)  # (hybrids: an upper bound)
        self.budget_positions = self.budget // self.position_bytes
        self.device = next(model.parameters()).device
        self.cache_arg = cache_kwarg(model)
        self.release()

    def release(self) -> None:
        self.cache, self.pad, self.pos, self.length = None, [], [], 0

    @property
    def rows(self) -> int:
        return len(self.pos)

    def fits(self, reservations: list[int]) -> bool:
        """kv.KVCache.fits's rule: rows x the longest reservation within the budget."""
        return not reservations or len(reservations) * max(reservations) <= self.budget_positions

    def add(self, prompt_ids: list[int]) -> torch.Tensor:
        """Read PROMPT_IDS alone and append the row -> the logits of its first new token (V,)."""
        from transformers.cache_utils import DynamicCache

        x = torch.tensor([prompt_ids], device=self.device)
        new, n = DynamicCache(config=self.model.config), len(prompt_ids)  # filled in place by the forward
        out = self.model(input_ids=x, use_cache=True, **{self.cache_arg: new})
        if self.cache is None:
            self.cache, self.length = new, n
        else:
            length = max(n, self.length)  # the shorter side gets more padding on the left
            self.pad = [p + length - self.length for p in self.pad]
            for mine, theirs in zip(self.cache.layers, new.layers, strict=True):
                for (d, k), (d2, _) in zip(_states(mine), _states(theirs), strict=True):
                    d[k] = torch.cat([d[k], d2[k]])  # (rows + 1, ...): states have no positions to pad
                if not _has_kv(mine):
                    continue
                self._pad_left(mine, _kept(mine, length) - _kept(mine, self.length))
                self._pad_left(theirs, _kept(theirs, length) - _kept(theirs, n))
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
            self._set_length(length)
        self.pad.append(self.length - n)
        self.pos.append(n)
        return out.logits[0, -1]

    def step(self, tokens: list[int]) -> torch.Tensor:
        """One token for every row (in row order) -> the next logits (rows, V)."""
        n = len(tokens)
        mask = torch.ones(n, self.length + 1, dtype=torch.long, device=self.device)
        for i, p in enumerate(self.pad):
            mask[i, :p] = 0
        out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                         position_ids=torch.tensor(self.pos, device=self.device)[:, None], use_cache=True,
                         **{self.cache_arg: self.cache})  # (the cache grows in place)
        self.length += 1
        self.pos = [p + 1 for p in self.pos]
        return out.logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Only ROWS (indices, in order) stay; the padding they all share is cut from the left."""
        if not rows:
            return self.release()
        if rows != list(range(self.rows)):
            idx = torch.tensor(rows, device=self.device)
            for layer in self.cache.layers:
                for d, k in _states(layer):
                    d[k] = d[k][idx]
                if _has_kv(layer):
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            self.pad, self.pos = [self.pad[i] for i in rows], [self.pos[i] for i in rows]
        cut = min(self.pad)
        if cut:
            for layer in filter(_has_kv, self.cache.layers):  # (a sliding window only loses what it need not hold)
                drop = _kept(layer, self.length) - _kept(layer, self.length - cut)
                layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
            self.pad = [p - cut for p in self.pad]
            self._set_length(self.length - cut)

    def _set_length(self, length: int) -> None:
        self.length = length
        for layer in self.cache.layers:  # a sliding window's masks count the positions seen (all rows alike here)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length
            if isinstance(getattr(layer, "cumulative_length_linear", None), torch.Tensor):  # a state layer's count
                layer.cumulative_length_linear.fill_(length)

    @staticmethod
    def _pad_left(layer, n: int) -> None:
        if n <= 0:
            return
        # zeros, never attended to (masked); 0 x value keeps NaN out
        b, h, _, d = layer.keys.shape
        layer.keys = torch.cat([layer.keys.new_zeros(b, h, n, d), layer.keys], dim=2)
        b, h, _, d = layer.values.shape
        layer.values = torch.cat([layer.values.new_zeros(b, h, n, d), layer.values], dim=2)
