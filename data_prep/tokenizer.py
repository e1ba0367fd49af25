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


MAX_LINE_BYTES = 1 << 16  # SentencePiece's max_sentence_length: longer lines it would drop, silently


def split_long_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """``line`` in pieces of at most ``max_bytes`` UTF-8 bytes, cut at a space where one is near the end of a
    piece (a piece of max_bytes / 4 characters fits whatever the characters)."""
    if len(line) * 4 <= max_bytes or len(line.encode("utf-8")) <= max_bytes:
        return [line]
    step = max_bytes // 4
    pieces = []
    while line:
        head = line[:step]
        if len(head) < len(line):
            cut = head.rfind(" ")
            if cut > step // 2:
                head = line[:cut]  # the space starts the next piece, as SentencePiece's pieces do
        pieces.append(head)
        line = line[len(head) :]
    return pieces


def train_tokenizer(
    documents: Iterable[Document], settings: TokenizerSettings, out_prefix: str | Path
) -> dict[str, object]:
    """Train on a sample of ``documents``; write <prefix>.model, <prefix>.vocab and <prefix>.json (the card)."""
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    check_writable(LocalStore(str(out_prefix.parent)))  # before minutes of training, not after
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(settings.seed)
    stats = {
        "documents_seen": 0,
        "documents_sampled": 0,
        "documents_truncated": 0,
        "long_lines_split": 0,
        "sample_chars": 0,
    }
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
                # SentencePiece reads one sentence per line (keep a document's lines apart) and drops any line
                # over max_sentence_length bytes: a longer line is cut into pieces that it keeps.
                lines = []
                for line in text.splitlines():
                    pieces = split_long_line(line)
                    stats["long_lines_split"] += len(pieces) > 1
                    lines += [piece for piece in pieces if piece.strip()]
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
                max_sentence_length=MAX_LINE_BYTES,
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


# ------------------------------------------------------------------------------------------------
# Any tokenizer a shard set may be made with: ours (SentencePiece) or a Hugging Face tokenizer.json
BOS_NAMES = ("<|bos|>", "<bos>", "<s>", "<|begin_of_text|>")
EOS_NAMES = ("<|eos|>", "<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")
PAD_NAMES = ("<|pad|>", "<pad>")


class TextTokenizer:
    """What the pipeline needs of a tokenizer, whatever its kind: plain ids of texts, documents framed by
    the tokenizer's own special tokens, decoding, and the UTF-8 bytes each piece stands for.

    ``kind`` "sentencepiece" (ours: documents end with ``<eos>``) or "huggingface" (a ``tokenizer.json``;
    documents start with its BOS token when it has one, and end with its EOS token)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(
                f"{path}: no such tokenizer model (train one with `parcae prep tokenizer`, or give a tokenizer.json)"
            )
        head = self.path.read_bytes()[:1].lstrip()
        if head == b"{":
            self._hf_init()
        else:
            self.kind = "sentencepiece"
            self.sp = load_tokenizer(self.path)
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id, self.eos_id, self.pad_id = None, EOS_ID, PAD_ID  # our shards: no <bos>, <eos> after each

    def _hf_init(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"{self.path}: a tokenizer.json needs the `tokenizers` library ([hf] extra)") from None
        try:
            self.hf = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises its own Exception type for a file it cannot read
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json: {exc}") from None
        self.kind = "huggingface"
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        vocab = self.hf.get_vocab(with_added_tokens=True)

        def special(names: tuple[str, ...]) -> int | None:
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id, self.eos_id, self.pad_id = special(BOS_NAMES), special(EOS_NAMES), special(PAD_NAMES)
        if self.eos_id is None:
            raise TokenizerError(
                f"{self.path}: no end-of-document token (one of {', '.join(EOS_NAMES)}); documents are packed with it"
            )
        self.special_ids = {i for i, token in self.hf.get_added_tokens_decoder().items() if token.special}

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Plain ids of each text (no special tokens)."""
        if self.kind == "sentencepiece":
            return self.sp.encode(texts, num_threads=1)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def row_start_id(self) -> int:
        """The token every document starts with under bos-aligned packing (ours: <bos>, id 2)."""
        if self.kind == "sentencepiece":
            return BOS_ID
        if self.bos_id is None:
            raise TokenizerError(
                f"{self.path}: no beginning-of-document token (one of {', '.join(BOS_NAMES)}); bos-aligned packing "
                "starts every row with it (use --packing concat)"
            )
        return self.bos_id

    def documents(self, texts: list[str], bos: int | None = None) -> list[list[int]]:
        """Each text as a packed document: ``[<bos>] + ids + [<eos>]`` (<bos> when the tokenizer has one
        and is not ours, or when ``bos`` is given: bos-aligned packing)."""
        bos = self.bos_id if bos is None else bos
        head = [bos] if bos is not None else []
        return [[*head, *ids, self.eos_id] for ids in self.encode(texts)]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def piece_bytes(self) -> tuple[list[int], list[bool], bool]:
        """(bytes per id, whether the piece starts with a word-initial space marker, whether a document's
        first word gets a marker that is not in its text): special tokens count no bytes."""
        if self.kind == "sentencepiece":
            sizes, space_led = [0] * self.vocab_size, [False] * self.vocab_size
            for i in range(self.vocab_size):
                if self.sp.is_control(i) or self.sp.is_unknown(i):
                    continue
                piece = self.sp.id_to_piece(i)
                sizes[i] = 1 if self.sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
                space_led[i] = piece.startswith("\u2581")
            return sizes, space_led, self.sp.encode("a", out_type=str)[0].startswith("\u2581")
        sizes = [0] * self.vocab_size
        byte_level = "ByteLevel" in type(self.hf.decoder).__name__ or "ByteLevel" in str(self.hf.decoder)
        to_byte = {c: b for b, c in _byte_level_alphabet().items()}
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if i in self.special_ids or token is None:
                continue
            if byte_level and all(c in to_byte for c in token):  # a piece of a UTF-8 sequence counts its bytes
                sizes[i] = len(token)
            else:
                sizes[i] = len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return sizes, [False] * self.vocab_size, False


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (byte-level BPE token strings are
    made of these, one character per byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
