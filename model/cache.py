"""Keys and values kept between generation steps (imports torch only).

One `KVCache` serves one batch being generated: every attention layer has its own keys and values, keyed by
``(part, slot, layer)``. A prelude or coda layer has one slot. A core layer has one per loop iteration by
default (a new token at loop t attends to the earlier tokens' states at loop t: exact), or, bounded with
``core_slots=k``, k of them: loop t reads and writes slot t mod k, so an earlier token is seen at the last
loop it ran that is congruent to t (k = 1: its last loop). The prompt, prefilled in one forward, is exact
either way (its positions write and read the same loop); the approximation is in later tokens.

Buffers are allocated for the whole generation at the first use, so appending is a copy into place. Rows
of different prompt lengths are left-padded: ``real`` marks the positions holding tokens, and no real
position attends to a padded one (RoPE scores depend only on the distance between positions, so a
left-padded row computes what it computes alone). A step may run on a subset of the rows (adaptive depth
stops looping rows one by one): `LayerKV.rows` gives the same interface for those rows only.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's (one slot's) keys and values: (batch, heads, capacity, head_dim) buffers."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def _allocate(self, like: torch.Tensor) -> None:
        if self.k is None:
            shape = (self.owner.real.shape[0], like.shape[1], self.owner.capacity, like.shape[3])
            self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values (batch, heads, t, head_dim); return all of them so far."""
        return self.rows(None).append(k, v)

    def mask(self, t: int) -> torch.Tensor:
        return self.rows(None).mask(t)

    def rows(self, rows: torch.Tensor | None) -> RowsKV:
        """This layer's keys and values for ``rows`` (a 1-d index tensor) only; None: every row."""
        return RowsKV(self, rows)

    def copy_position(self, source: LayerKV, rows: torch.Tensor) -> None:
        """The newest position (``owner.n``) of ``rows`` takes ``source``'s keys and values there."""
        assert source.k is not None and source.v is not None
        self._allocate(source.k)
        assert self.k is not None and self.v is not None
        n = self.owner.n
        self.k[rows, :, n] = source.k[rows, :, n]
        self.v[rows, :, n] = source.v[rows, :, n]


class RowsKV:
    """`LayerKV` restricted to some rows (all of them when ``rows`` is None)."""

    def __init__(self, layer: LayerKV, rows: torch.Tensor | None):
        self.layer, self.index = layer, rows

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer, start, end = self.layer, self.layer.owner.n, self.layer.owner.n + k.shape[2]
        layer._allocate(k)
        assert layer.k is not None and layer.v is not None
        if self.index is None:
            layer.k[:, :, start:end] = k
            layer.v[:, :, start:end] = v
            return layer.k[:, :, :end], layer.v[:, :, :end]
        layer.k[self.index, :, start:end] = k
        layer.v[self.index, :, start:end] = v
        return layer.k[self.index, :, :end], layer.v[self.index, :, :end]

    def mask(self, t: int) -> torch.Tensor:
        """(batch, 1, t, n + t) bool: the new positions attend causally to real positions (and themselves)."""
        owner = self.layer.owner
        start, end = owner.n, owner.n + t
        real = owner.real if self.index is None else owner.real[self.index]
        query = torch.arange(start, end, device=real.device)[:, None]
        key = torch.arange(end, device=real.device)[None, :]
        causal = key <= query
        return (causal[None] & (real[:, None, :end] | (key == query)[None]))[:, None]


class KVCache:
    def __init__(self, real: torch.Tensor, core_slots: int | None = None):
        """``real``: (batch, capacity) bool, True where a position will hold a token (False: left padding).
        ``core_slots``: None keeps every loop of every core layer (exact); k >= 1 keeps k per core layer."""
        if core_slots is not None and core_slots < 1:
            raise ValueError(f"core_slots: None (one per loop) or at least 1, got {core_slots}")
        self.real = real
        self.capacity = real.shape[1]
        self.core_slots = core_slots
        self.n = 0  # positions stored so far
        self.layers: dict[tuple, LayerKV] = {}

    def layer(self, key: tuple) -> LayerKV:
        if key not in self.layers:
            self.layers[key] = LayerKV(self)
        return self.layers[key]

    def core(self, loop: int, layer: int) -> LayerKV:
        """Core layer ``layer``'s keys and values at loop ``loop`` (its slot)."""
        slot = loop if self.core_slots is None else loop % self.core_slots
        return self.layer(("core", slot, layer))

    def advance(self, t: int) -> None:
        """After a forward of ``t`` new positions through every layer."""
        self.n += t

    def nbytes(self) -> int:
        """Bytes the stored keys and values take (the buffers hold ``capacity`` positions)."""
        return sum(x.numel() * x.element_size() for kv in self.layers.values() for x in (kv.k, kv.v) if x is not None)
