"""Bytes per target token, for bits per byte: the UTF-8 bytes the target tokens of packed rows decode to."""

from __future__ import annotations

import numpy as np

from data_prep.tokenizer import EOS_ID, load_tokenizer


class TokenBytes:
    """UTF-8 bytes the target tokens of packed rows decode to.

    Each token counts the bytes of its piece ("▁" is a space, a byte-fallback piece one byte, control
    and unknown tokens none). SentencePiece puts a "▁" before every document's first word that is not
    in the text (its dummy prefix); documents end with <eos>, so a space-led token right after <eos>
    counts one byte less. Counted this way, a document's bytes are exactly its text's UTF-8 length.
    """

    def __init__(self, tokenizer_path: str, vocab: int):
        sp = load_tokenizer(tokenizer_path)
        n = max(vocab, sp.get_piece_size())
        self.sizes = np.zeros(n, dtype=np.int64)
        self.space_led = np.zeros(n, dtype=bool)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            piece = sp.id_to_piece(i)
            self.sizes[i] = 1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
            self.space_led[i] = piece.startswith("\u2581")
        self.dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
        self.eos = EOS_ID

    def document_bytes(self, tokens: np.ndarray) -> int:
        """Bytes of one whole document's tokens (no special tokens): its text's UTF-8 length."""
        total = int(self.sizes[tokens].sum())
        if self.dummy_prefix and len(tokens) and self.space_led[tokens[0]]:
            total -= 1
        return total

    def count(self, rows: np.ndarray) -> int:
        """Bytes of ``rows[:, 1:]`` (the targets of rows of seq_len + 1 tokens)."""
        targets, previous = rows[:, 1:], rows[:, :-1]
        total = int(self.sizes[targets].sum())
        if self.dummy_prefix:
            total -= int((self.space_led[targets] & (previous == self.eos)).sum())
        return total
