"""Errors a user of `parcae prep` can act on: the area's subclass of the project's one error root."""

from parcae_errors import ParcaeError


class PrepError(ParcaeError):
    """Corpus, tokenizer, shard, manifest or storage problems, named by file, line or URL."""
