"""Where text meets tokens outside training's data path: opening a run's tokenizer (local or s3://), the
token every prompt starts with (the way the model saw documents start), and the text that generated
tokens add to a prompt. Downstream scoring, `parcae generate` and training's samples share them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.inspect import packing_of
from data_prep.storage import S3Options, StorageError, is_s3, open_store
from data_prep.tokenizer import BOS_ID, TextTokenizer
from parcae_errors import ParcaeError
from pipeline.evaluation.token_bytes import special_ids


def prompt_start(tokenizer: TextTokenizer) -> int:
    """The token a prompt starts with when no shard set tells how the model saw documents start: the
    tokenizer's BOS (ours, SentencePiece, has <bos>: the paper's protocol, as the reference scores CORE); a
    tokenizer without one, its EOS."""
    if tokenizer.bos_id is not None:
        return tokenizer.bos_id
    return BOS_ID if tokenizer.kind == "sentencepiece" else tokenizer.eos_id


@dataclass(frozen=True)
class PromptStart:
    """The token every prompt starts with, and why: recorded in the eval report."""

    id: int
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "why": self.why}


def document_start(tokenizer: TextTokenizer, manifest: dict[str, Any] | None) -> PromptStart:
    """Prompts start the way the model's training data started documents (``manifest``: the run's shard set):
    a model trained on concat-packed shards of our tokenizer never saw <bos>, and sees every document
    follow <eos>. Without a shard set (released weights), the tokenizer's BOS."""
    if manifest is None:
        return PromptStart(prompt_start(tokenizer), "no shard set to read the packing from: the tokenizer's BOS")
    start, eos = special_ids(manifest)
    if packing_of(manifest) == "bos-aligned":
        return PromptStart(start, "the run's shards are bos-aligned: every document starts with <bos>")
    if start != eos:
        return PromptStart(start, "the run's shards (concat) start every document with the tokenizer's BOS")
    return PromptStart(start, "the run's shards (concat) hold no <bos>: every document follows <eos>")


def open_tokenizer(location: str, options: S3Options, tmp: Path) -> TextTokenizer:
    """A tokenizer file, local or s3:// (copied into ``tmp``)."""
    if is_s3(location):
        parent, _, name = location.rpartition("/")
        try:
            data = open_store(parent, options).get_bytes(name)
        except StorageError as exc:
            raise ParcaeError(f"tokenizer {location}: {exc}") from None
        (tmp / name).write_bytes(data)
        location = str(tmp / name)
    return TextTokenizer(location)


def completion(text: TextTokenizer, prompt_ids: list[int], new: list[int]) -> str:
    """The text new tokens add to a prompt (``prompt_ids`` with its start token first), decoded together with
    the prompt so a word-initial piece keeps its space."""
    prompt = text.decode(prompt_ids[1:])
    return text.decode([*prompt_ids[1:], *new])[len(prompt) :]
