"""`parcae export SOURCE --format hf --out DIR`: a model the Hugging Face ecosystem loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

DIR holds ``config.json`` (the model config, ``loops`` and ``h0`` for a forward, ``auto_map`` naming the
two remote-code files), ``configuration_parcae.py`` and ``modeling_parcae.py`` (self-contained: torch and
transformers only, copied from ``model/hf_template/``), ``model.safetensors`` (fp32, our parameter names) and
the tokenizer: a SentencePiece model as ``tokenizer.model`` with a ``tokenizer_config.json`` that
`AutoTokenizer` reads, or a Hugging Face ``tokenizer.json`` as it is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_prep.storage import make_dir, write_atomic, write_text
from data_prep.tokenizer import BOS_ID, EOS_ID, PAD_ID, TextTokenizer, TokenizerError
from model import ParcaeLM
from parcae_errors import ParcaeError, UsageError

TEMPLATE = Path(__file__).resolve().parents[2] / "model" / "hf_template"  # the model's remote-code copy
REMOTE_CODE = ("configuration_parcae.py", "modeling_parcae.py")


def export_hf(model: ParcaeLM, out: Path, tokenizer: str | None, loops: int | None = None, h0: str = "zeros") -> Path:
    """Write ``out``; ``loops`` is the exported forward's default loop count (the mean recurrence if None)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file; name a directory")
    if h0 not in ("zeros", "like_init"):
        raise UsageError(f"--h0 {h0!r}: zeros or like_init")
    cfg = model.cfg
    text_tokenizer = _read_tokenizer(Path(tokenizer)) if tokenizer else None
    bos, eos, pad = (
        (text_tokenizer.bos_id, text_tokenizer.eos_id, text_tokenizer.pad_id)
        if text_tokenizer
        else (BOS_ID, EOS_ID, PAD_ID)
    )
    make_dir(out)
    config = {
        **dataclasses.asdict(cfg),
        "loops": loops or cfg.mean_recurrence,
        "h0": h0,
        "model_type": "parcae",
        "architectures": ["ParcaeForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_parcae.ParcaeHFConfig",
            "AutoModelForCausalLM": "modeling_parcae.ParcaeForCausalLM",
        },
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    for name in REMOTE_CODE:
        write_text(out / name, (TEMPLATE / name).read_text())
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in model.state_dict().items()}
    write_atomic(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    if text_tokenizer:
        _tokenizer_files(text_tokenizer, out)
    return out


def _read_tokenizer(path: Path) -> TextTokenizer:
    try:
        return TextTokenizer(path)
    except TokenizerError as exc:
        raise ParcaeError(f"--tokenizer {exc}") from None


def _tokenizer_files(tokenizer: TextTokenizer, out: Path) -> None:
    if tokenizer.kind == "huggingface":  # PreTrainedTokenizerFast reads it as it is; name its specials
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key, token_id in (
            ("bos_token", tokenizer.bos_id),
            ("eos_token", tokenizer.eos_id),
            ("pad_token", tokenizer.pad_id),
        ):
            if token_id is not None:
                settings[key] = tokenizer.hf.id_to_token(token_id)
    else:  # SentencePiece (ours: <pad> 0, <unk> 1, <bos> 2, <eos> 3); transformers' Llama tokenizer reads it
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
        settings = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": False,
        }
    write_text(out / "tokenizer_config.json", json.dumps(settings, indent=2) + "\n")


def check_loads(out: Path, model: ParcaeLM, loops: int) -> float:
    """Load ``out`` with transformers in this process and return the largest relative logit difference
    from ``model`` at ``loops`` loops (h_0 = 0) on a short sequence: the export's own check."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True)
    ids = torch.arange(1, 17).remainder(model.cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        theirs = exported(ids, loops=loops).logits
        kwargs = {"loops": loops, "h0": torch.zeros(1, 16, model.cfg.d_model)} if model.cfg.looped else {}
        ours = model(ids, **kwargs)[..., : model.cfg.vocab_size]
    return float((theirs - ours).abs().max() / ours.abs().max())
