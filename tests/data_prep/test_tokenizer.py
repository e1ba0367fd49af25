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
