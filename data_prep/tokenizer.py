"""SentencePiece tokenizer training, with fixed special-token ids and a small JSON card.

Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the learned pieces. Byte fallback is on
by default, so any UTF-8 text round-trips, including characters never seen in the training sample.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from data_prep.corpus import Document
from data_prep.errors import PrepError
from data_prep.storage import LocalStore, check_writable, write_atomic

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIALS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


class TokenizerError(PrepError):
    """A tokenizer that cannot be trained or loaded."""


@dataclass(frozen=True)
class TokenizerSettings:
    vocab_size: int = 32768
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    split_digits: bool = True
    character_coverage: float = 0.9995
    max_chars_per_doc: int = 100_000
    max_sample_chars: int = 200_000_000
    sample_fraction: float = 1.0
    seed: int = 0


def train_tokenizer(
    documents: Iterable[Document], settings: TokenizerSettings, out_prefix: str | Path
) -> dict[str, object]:
    """Train on a sample of ``documents``; write <prefix>.model, <prefix>.vocab and <prefix>.json (the card)."""
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    check_writable(LocalStore(str(out_prefix.parent)))  # before minutes of training, not after
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    stats = {"documents_seen": 0, "documents_sampled": 0, "documents_truncated": 0, "sample_chars": 0}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.txt"
        with sample.open("w", encoding="utf-8") as f:
            for doc in documents:
                stats["documents_seen"] += 1
                if settings.sample_fraction < 1.0 and rng.random() >= settings.sample_fraction:
                    continue
                text = doc.text
                if len(text) > settings.max_chars_per_doc:
                    text = text[: settings.max_chars_per_doc]
                    stats["documents_truncated"] += 1
                # SentencePiece reads one sentence per line: keep a document's lines apart.
                lines = [line for line in text.splitlines() if line.strip()]
                if not lines:
                    continue
                f.write("\n".join(lines) + "\n")
                stats["documents_sampled"] += 1
                stats["sample_chars"] += sum(len(line) for line in lines)
                if stats["sample_chars"] >= settings.max_sample_chars:
                    break
        if stats["sample_chars"] == 0:
            raise TokenizerError("the corpus gave no text to train the tokenizer on")
        try:
            spm.SentencePieceTrainer.train(
                input=str(sample),
                model_prefix=str(out_prefix),
                vocab_size=settings.vocab_size,
                model_type=settings.model_type,
                byte_fallback=settings.byte_fallback,
                split_digits=settings.split_digits,
                character_coverage=settings.character_coverage,
                # lossless: no NFKC, whitespace kept as it is (tabs, runs of spaces, newlines via bytes)
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece="<pad>",
                unk_piece="<unk>",
                bos_piece="<bos>",
                eos_piece="<eos>",
                input_sentence_size=0,
                shuffle_input_sentence=False,
                max_sentence_length=1 << 16,
                num_threads=1,  # one thread keeps the trained model byte-identical run to run
                minloglevel=2,
            )
        except RuntimeError as exc:
            message = str(exc).splitlines()[-1] if str(exc) else "training failed"
            raise TokenizerError(f"SentencePiece: {message} (vocab_size={settings.vocab_size})") from None
    card = {
        "model": f"{out_prefix.name}.model",
        "sha256": file_sha256(Path(f"{out_prefix}.model")),
        "vocab_size": settings.vocab_size,
        "special_ids": SPECIALS,
        "settings": asdict(settings),
        "sample": stats,
    }
    card_text = json.dumps(card, indent=2) + "\n"
    write_atomic(Path(f"{out_prefix}.json"), lambda tmp: tmp.write_text(card_text))
    return card


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer(path: str | Path):
    """A SentencePieceProcessor, with the special ids checked."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer model (train one with `parcae prep tokenizer`)")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"{path}: not a SentencePiece model: {exc}") from None
    actual = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if actual != SPECIALS:
        raise TokenizerError(f"{path}: special ids {actual} differ from the pipeline's {SPECIALS}")
    return sp
