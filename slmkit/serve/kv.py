"""Key/value memory for the batching engine: a byte budget (`slm serve --kv-memory 2G`) and a batched cache that
grows as its rows need it, instead of max-batch x full context up front.

Why a budget and not a preallocation: the cache the engine needs is rows x positions x (layers x 2 x kv heads x head
size) values. Preallocated for every row at the model's whole context it is ~6 GB for SmolLM2-135M (16 rows x 8,192
positions x 46 KB a position in fp32), almost all of it never touched. Here the cache is one tensor pair per layer,
(rows, kv heads, length, head size) as the batched forward reads it, with `rows` the sequences in flight and `length`
the longest of them rounded up, grown (copied into a larger pair) when a row or a longer sequence needs more, and
freed when the engine goes idle. The engine admits a sequence only while

    rows x the longest reservation (prompt + max_tokens) <= the budget in positions,

so the cache can always reach what its rows may need without passing the budget; a sequence that does not fit waits
in the queue, and one that could never fit is refused when submitted. A growth holds the old and the new pair for
the moment of the copy.
"""

from __future__ import annotations

import torch

DEFAULT_KV_MEMORY = 2 << 30  # 2 GiB: 16 rows x 2,800 positions of SmolLM2-135M in fp32, twice that in bf16
LENGTH_STEP = 64  # lengths are rounded up to a multiple of this: fewer growths, little waste


def parse_memory(text: str | int) -> int:
    """'2G', '512M', '1.5GiB', '800MB', '1000000' -> bytes (options.parse_size). ValueError naming the value
    otherwise."""
    from slmkit.options import parse_size

    try:
        n = parse_size(text)
    except ValueError:
        raise ValueError(f"--kv-memory {text!r} is not a size: give bytes or a number with K, M, G or T, "
                         "e.g. 2G") from None
    if n <= 0:
        raise ValueError(f"--kv-memory {text!r} must be positive, e.g. 2G")
    return n


def format_bytes(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


class KVCache:
    """The engine's batched key/value cache for slmkit's Llama: a pair (rows, nkv, length, hd) per layer, grown on
    demand within BUDGET bytes. Row i holds the i-th sequence in flight (the engine keeps them at the front)."""

    def __init__(self, model: torch.nn.Module, budget: int, max_rows: int):
        c = model.config
        self.model, self.max_rows, self.budget = model, max_rows, budget
        self.dtype, self.device = model.norm.dtype, model.norm.device  # what Llama.new_cache gives (int8 models too)
        self.shape = (c["num_key_value_heads"], model.head_dim)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # bytes of one position of one row: keys and values of every layer
        self.position_bytes = len(model.layers) * 2 * self.shape[0] * self.shape[1] * itemsize
        self.budget_positions = budget // self.position_bytes
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.views: dict[int, list] = {}  # view(n), kept until the next resize: 2 slices a layer saved per step
        self.rows = self.length = 0  # allocated shape; 0 x 0 while idle
        self.growths = 0  # reallocations so far (tests, metrics)

    @property
    def allocated_bytes(self) -> int:
        return self.rows * self.length * self.position_bytes

    def fits(self, reservations: list[int]) -> bool:
        """Whether sequences reserving these positions (prompt + max_tokens each) may be in flight together."""
        return not reservations or len(reservations) * max(reservations) <= self.budget_positions

    def ensure(self, rows: int, length: int, reserved: int) -> None:
        """Make room for ROWS rows of LENGTH positions. RESERVED (the longest reservation in flight) caps the length
        a growth rounds up to; the caller's admission rule (fits) keeps rows x reserved within the budget."""
        if rows <= self.rows and length <= self.length:
            return
        new_len = max(self.length, length)
        if new_len > self.length:  # grow geometrically (fewer copies), but never past what a row may reach
            new_len = max(new_len, min(2 * self.length, reserved))
            new_len = min(-(-new_len // LENGTH_STEP) * LENGTH_STEP, max(reserved, length))
        new_rows = max(self.rows, rows)
        if new_rows > self.rows:  # room for a few more rows too, within the budget at this length
            spare = max(rows, self.budget_positions // max(new_len, 1))
            new_rows = max(rows, min(self.max_rows, 2 * self.rows, spare))
        self._resize(new_rows, new_len)

    def _resize(self, rows: int, length: int) -> None:
        shape = (rows, self.shape[0], length, self.shape[1])
        old, r, t = self.layers, min(self.rows, rows), min(self.length, length)
        self.layers = []
        for k, v in old or [(None, None)] * len(self.model.layers):
            # zeros, not empty: masked-out positions still enter attention as 0 x value, and 0 x NaN is NaN
            k2 = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v2 = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if k is not None and r and t:
                k2[:r, :, :t] = k[:r, :, :t]
                v2[:r, :, :t] = v[:r, :, :t]
            self.layers.append((k2, v2))
        del old
        self.views = {}
        self.rows, self.length = rows, length
        self.growths += 1

    def release(self) -> None:
        """Free the cache (the engine is idle): its memory goes back, so a quiet server's RSS falls."""
        self.layers, self.views, self.rows, self.length = [], {}, 0, 0

    def view(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first N rows of every layer, (n, nkv, length, hd) views."""
        if n not in self.views:
            self.views[n] = [(k[:n], v[:n]) for k, v in self.layers]
        return self.views[n]

    def row(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[i:i + 1], v[i:i + 1]) for k, v in self.layers]

    def move(self, dst: int, src: int, end: int) -> None:
        """Copy row SRC's first END positions to row DST (compacting the rows in flight towards the front)."""
        for k, v in self.layers:
            k[dst, :, :end] = k[src, :, :end]
            v[dst, :, :end] = v[src, :, :end]
