"""Keys and values kept between generation steps (imports torch only).

One `KVCache` serves one batch being generated: every attention layer has its own keys and values, and a
core layer has one set per loop iteration (a new token at loop t attends to the earlier tokens' states at
loop t), keyed by ``(part, loop, layer)``. Buffers are allocated for the whole generation at the first
use, so appending is a copy into place. Rows of different prompt lengths are left-padded: ``real`` marks
the positions holding tokens, and no real position attends to a padded one (RoPE scores depend only on
the distance between positions, so a left-padded row computes what it computes alone).
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's (one loop's) keys and values: (batch, heads, capacity, head_dim) buffers."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values (batch, heads, t, head_dim); return all of them so far."""
        start, end = self.owner.n, self.owner.n + k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.owner.capacity, k.shape[3])
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        assert self.v is not None
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def mask(self, t: int) -> torch.Tensor:
        """(batch, 1, t, n + t) bool: the new positions attend causally to real positions (and themselves)."""
        start, end = self.owner.n, self.owner.n + t
        device = self.owner.real.device
        query = torch.arange(start, end, device=device)[:, None]
        key = torch.arange(end, device=device)[None, :]
        causal = key <= query
        real = self.owner.real[:, None, :end] | (key == query)[None]
        return (causal[None] & real)[:, None]


class KVCache:
    def __init__(self, real: torch.Tensor):
        """``real``: (batch, capacity) bool, True where a position will hold a token (False: left padding)."""
        self.real = real
        self.capacity = real.shape[1]
        self.n = 0  # positions stored so far
        self.layers: dict[tuple, LayerKV] = {}

    def layer(self, key: tuple) -> LayerKV:
        if key not in self.layers:
            self.layers[key] = LayerKV(self)
        return self.layers[key]

    def advance(self, t: int) -> None:
        """After a forward of ``t`` new positions through every layer."""
        self.n += t

    def nbytes(self) -> int:
        """Bytes the stored keys and values take (the buffers hold ``capacity`` positions)."""
        return sum(x.numel() * x.element_size() for kv in self.layers.values() for x in (kv.k, kv.v) if x is not None)
