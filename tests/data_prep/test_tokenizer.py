"""SentencePiece training: fixed special ids, lossless round trips, the card."""

from __future__ import annotations

import json

import pytest

from data_prep.corpus import Document
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, TokenizerError, load_tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x  # comment",
        "tabs\tand  double  spaces\r\n",
        "ünïcødé, 漢字, emoji 🙂, Ω≈ç√",
        "\x00\x01 control bytes",
        "12345678901234567890",
    ],
)
def test_round_trip_is_lossless_including_bytes_outside_the_sample(tokenizer, text):
    sp = load_tokenizer(tokenizer)
    assert sp.decode(sp.encode(text)) == text


def test_special_ids_digits_and_card(tokenizer):
    sp = load_tokenizer(tokenizer)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, BOS_ID, EOS_ID)
    assert sp.id_to_piece(EOS_ID) == "<eos>" and sp.id_to_piece(BOS_ID) == "<bos>" and sp.id_to_piece(PAD_ID) == "<pad>"
    assert all(len(sp.id_to_piece(i).strip("▁")) <= 1 for i in sp.encode("1234567") if sp.id_to_piece(i) != "▁")
    card = json.loads(tokenizer.with_suffix(".json").read_text())
    assert card["vocab_size"] == 512 and card["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert card["sample"]["sample_chars"] <= 300_000 + 100_000 and card["settings"]["model_type"] == "bpe"


def test_unigram_and_errors(tmp_path, builtin_docs):
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    docs = [Document(text, "x") for text in builtin_docs[:500]]
    train_tokenizer(docs, TokenizerSettings(vocab_size=400, model_type="unigram"), tmp_path / "u")
    assert load_tokenizer(tmp_path / "u.model").get_piece_size() == 400
    with pytest.raises(TokenizerError, match="gave no text"):
        train_tokenizer([], TokenizerSettings(vocab_size=100), tmp_path / "e")
    with pytest.raises(TokenizerError, match="vocab_size=100000"):
        train_tokenizer(docs, TokenizerSettings(vocab_size=100000), tmp_path / "big")
    with pytest.raises(TokenizerError, match="no such tokenizer model"):
        load_tokenizer(tmp_path / "missing.model")


def test_documents_of_one_long_line_are_trained_on_not_dropped(tmp_path, builtin_docs):
    """SentencePiece drops a line over 64 KiB without a word: such lines are cut into pieces it keeps, the
    card counts them, and a corpus of nothing but one huge line trains (it failed with !sentences_.empty())."""
    from data_prep.tokenizer import MAX_LINE_BYTES, TokenizerSettings, split_long_line, train_tokenizer

    line = "привет мир " * 40_000  # 440k characters, 880 kB: one line, no newline
    pieces = split_long_line(line)
    assert "".join(pieces) == line and all(len(p.encode()) <= MAX_LINE_BYTES for p in pieces)
    settings = TokenizerSettings(vocab_size=600, max_chars_per_doc=200_000)
    docs = [Document(line, "long.txt:1"), *(Document(t, f"d{i}") for i, t in enumerate(builtin_docs[:50]))]
    card = train_tokenizer(iter(docs), settings, tmp_path / "t")
    assert card["sample"]["documents_sampled"] == 51 and card["sample"]["long_lines_split"] == 1
    assert card["sample"]["sample_chars"] >= 200_000  # the cropped long document, all of it used
    vocab = (tmp_path / "t.vocab").read_text()
    assert "привет" in vocab  # learned from the long line (dropped before: only byte pieces for Cyrillic)
    small = TokenizerSettings(vocab_size=280, max_chars_per_doc=200_000)
    alone = train_tokenizer(iter([Document(line, "long.txt:1")]), small, tmp_path / "alone")
    assert alone["sample"]["documents_sampled"] == 1
