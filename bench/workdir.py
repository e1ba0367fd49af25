"""What the benches that train share: `parcae` as a subprocess, and the embedded corpus's tokenizer and
shards prepared once in a work directory (kept, reused when a bench is rerun)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parcae(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, check=True)


def prepare_corpus(work: Path, seq_len: int, vocab_size: int = 2048, shard_size: str = "256MB") -> tuple[Path, Path]:
    """WORK/tokenizer/tok.model and WORK/shards/{train,val} of the embedded corpus; returns (tokenizer, shards)."""
    tok = work / "tokenizer" / "tok"
    if not Path(f"{tok}.model").is_file():
        parcae("prep", "tokenizer", "--out", str(tok), "--vocab-size", str(vocab_size))
    shards = work / "shards"
    if not (shards / "val" / "manifest.json").is_file():
        parcae("prep", "shards", "--tokenizer", f"{tok}.model", "--out", str(shards), "--seq-len", str(seq_len),
               "--val-fraction", "0.02", "--shard-size", shard_size, "--progress", "lines")  # fmt: skip
    return Path(f"{tok}.model"), shards
