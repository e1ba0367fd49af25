"""Bytes per target token, for bits per byte: the UTF-8 bytes the target tokens of packed rows decode to."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_prep.inspect import packing_of
from data_prep.tokenizer import BOS_ID, EOS_ID, TextTokenizer


def special_ids(manifest: dict[str, Any]) -> tuple[int, int]:
    """(the token every document of a shard set starts from, eos): under bos-aligned packing its <bos>; under
    concat packing the tokenizer's BOS where the shards put one before every document (a tokenizer.json with
    one), else <eos> (ours, SentencePiece: documents only end with <eos>, so each follows the last one's)."""
    info = manifest["tokenizer"]
    eos = info.get("eos_id", EOS_ID)
    if packing_of(manifest) == "bos-aligned":
        return manifest["packing"].get("bos_id", BOS_ID), eos
    if info.get("bos_id") is not None:
        return info["bos_id"], eos
    return eos, eos


class TokenBytes:
    """UTF-8 bytes the target tokens of packed rows decode to.

    Each token counts the bytes of its piece ("▁" is a space, a byte-fallback or byte-level piece its
    bytes, special tokens none). SentencePiece puts a "▁" before every document's first word that is not
    in the text (its dummy prefix); documents end with <eos>, so a space-led token right after <eos>
    counts one byte less. Counted this way, a document's bytes are exactly its text's UTF-8 length.
    """

    def __init__(self, tokenizer_path: str, vocab: int, eos: int = EOS_ID):
        tokenizer = TextTokenizer(tokenizer_path)
        sizes, space_led, self.dummy_prefix = tokenizer.piece_bytes()
        n = max(vocab, len(sizes))
        self.sizes = np.zeros(n, dtype=np.int64)
        self.space_led = np.zeros(n, dtype=bool)
        self.sizes[: len(sizes)] = sizes
        self.space_led[: len(space_led)] = space_led
        self.eos = eos

    def document_bytes(self, tokens: np.ndarray) -> int:
        """Bytes of one whole document's tokens (no special tokens): its text's UTF-8 length."""
        total = int(self.sizes[tokens].sum())
        first = tokens[self.sizes[tokens] > 0][:1]  # a leading <bos> counts nothing
        if self.dummy_prefix and len(first) and self.space_led[first[0]]:
            total -= 1
        return total

    def count(self, rows: np.ndarray) -> int:
        """Bytes of ``rows[:, 1:]`` (the targets of rows of seq_len + 1 tokens)."""
        targets, previous = rows[:, 1:], rows[:, :-1]
        total = int(self.sizes[targets].sum())
        if self.dummy_prefix:
            total -= int((self.space_led[targets] & (previous == self.eos)).sum())
        return total
