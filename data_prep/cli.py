"""`parcae prep tokenizer | shards | inspect`: the argument parsers and what each command runs.

The entry point (pipeline/cli/) mounts these under ``parcae prep``; nothing here imports the pipeline.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from data_prep.corpus import BUILTIN
from data_prep.storage import S3Options
from parcae_errors import UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "kib": 1024,
    "m": 1e6,
    "mb": 1e6,
    "mib": 1 << 20,
    "g": 1e9,
    "gb": 1e9,
    "gib": 1 << 30,
    "t": 1e12,
    "tb": 1e12,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 256MB, 64MiB, 1GB, 1048576)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction in [0, 1)")
    return value


def _nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        metavar="SRC",
        help=f"file, directory, glob or s3:// prefix (.txt, .jsonl[.gz|.zst], .parquet); repeatable; "
        f"default: {BUILTIN}, the embedded corpus",
    )
    p.add_argument("--text-field", default="text", help="JSON / Parquet field holding the text (default: text)")
    p.add_argument(
        "--txt-mode",
        choices=["file", "line", "paragraph"],
        default="file",
        help="plain text: one document per file (default), per line, or per blank-line paragraph",
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="unreadable files, bad JSON lines, empty documents: count and report them (skip, the "
        "default) or stop at the first one",
    )
    _s3_args(p)


def _s3_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        help="S3 endpoint (MinIO, Ceph, a local server); default: AWS, or "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. Credentials come from the AWS environment variables.",
    )
    p.add_argument("--region", help="S3 region (default: AWS_DEFAULT_REGION or us-east-1)")


def _shard_args(p: argparse.ArgumentParser) -> None:
    _corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="a SentencePiece .model or a Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="local directory or s3://bucket/prefix (gets train/ and val/)")
    p.add_argument("--seq-len", type=_positive, default=2048, help="tokens per training sequence (rows hold one more)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("256MB"), help="target shard size (256MB)")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.005,
        help="share of documents held out for validation, chosen by a hash of the text (0.005)",
    )
    p.add_argument(
        "--packing",
        choices=["bos-aligned", "concat"],
        default="bos-aligned",
        help="bos-aligned (default; the Parcae reference's and nanochat's packing, and how CORE prompts start): "
        "every row starts at a document with <bos>, filled best-fit, cropping what does not fit (counted); "
        "concat: documents run across rows with <eos> between them, nothing lost but the last partial row",
    )
    p.add_argument(
        "--pack-buffer",
        type=_positive,
        default=1000,
        help="bos-aligned: documents the best fit chooses from (default 1000; more crops less, holds more in memory)",
    )


def add_prep_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """``parcae prep ...``; returns its subcommands (the pipeline adds ``prep submit``, which needs Slurm)."""
    prep = sub.add_parser("prep", help="prepare data: train a tokenizer, write shards, inspect shards")
    commands = prep.add_subparsers(dest="prep_command", metavar="PREP_COMMAND", required=True)

    p = commands.add_parser("tokenizer", help="train a SentencePiece tokenizer on a sample of the corpus")
    _corpus_args(p)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model, PREFIX.vocab, PREFIX.json")
    p.add_argument("--vocab-size", type=_positive, default=32768)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk> instead of bytes")
    p.add_argument("--no-split-digits", action="store_true", help="let pieces span several digits")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-chars-per-doc", type=_positive, default=100_000, help="longer documents are cut")
    p.add_argument("--max-sample-chars", type=_positive, default=200_000_000, help="stop sampling after this much text")
    p.add_argument("--sample-fraction", type=float, default=1.0, help="keep each document with this probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a tokenizer already at PREFIX (refused without it)")
    p.set_defaults(func=cmd_tokenizer)

    p = commands.add_parser("shards", help="tokenize, pack into rows of seq_len + 1 and write WebDataset shards")
    _shard_args(p)
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: in the main process)")
    p.add_argument("--progress", choices=["auto", "bar", "lines"], default="auto")
    p.set_defaults(func=cmd_shards)

    p = commands.add_parser(
        "plan",
        help="split the inputs into work units (one per file) for `prep run` / `prep submit` on many machines",
    )
    _shard_args(p)
    p.add_argument(
        "--row-groups-per-unit",
        type=int,
        default=0,
        metavar="K",
        help="split Parquet files into units of K row groups (default 0: a unit per file)",
    )
    p.set_defaults(func=cmd_plan)

    p = commands.add_parser("run", help="prepare a plan's units that are not done (all, or one task's share)")
    p.add_argument("out", help="the plan's output location (holds plan.json)")
    p.add_argument("--task", type=int, default=0, help="this task's index (default 0; a Slurm array task's id)")
    p.add_argument("--tasks", type=_positive, default=1, help="how many tasks share the units (default 1: all)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: in the main process)")
    p.add_argument("--tokenizer", help="the plan's tokenizer file as this machine sees it (default: its path)")
    _s3_args(p)
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("merge", help="check every unit's shards and write the train and val manifests")
    p.add_argument("out", help="the plan's output location")
    p.add_argument("--sizes-only", action="store_true", help="check shard sizes, not their sha256 (no reading)")
    _s3_args(p)
    p.set_defaults(func=cmd_merge)

    p = commands.add_parser("status", help="a plan's units: done, running, stalled, pending; tokens so far")
    p.add_argument("out", help="the plan's output location")
    _s3_args(p)
    p.set_defaults(func=cmd_status)

    p = commands.add_parser(
        "inspect", help="summarise shard sets (packing, rows at document starts), decode samples, or verify them"
    )
    p.add_argument(
        "urls",
        nargs="+",
        metavar="URL",
        help="shard sets: directories or s3:// prefixes holding manifest.json (e.g. OUT/train); several: one "
        "summary line each (the sources of a mixture side by side)",
    )
    p.add_argument(
        "--samples", type=_nonnegative, default=3, help="samples to decode from a single URL (default 3; 0: none)"
    )
    p.add_argument("--shard", type=_nonnegative, default=0, help="which shard to decode from (0, 1, ...)")
    p.add_argument("--tokenizer", help="the .model or tokenizer.json (default: the path recorded in the manifest)")
    p.add_argument("--verify", action="store_true", help="check every shard's presence, size and sha256; name extras")
    _s3_args(p)
    p.set_defaults(func=cmd_inspect)
    return commands


def _options(args: argparse.Namespace) -> S3Options:
    return S3Options.from_env(args.endpoint_url, args.region)


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.corpus import CorpusSpec, Problems, iter_documents
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    existing = [f"{args.out}{ext}" for ext in (".model", ".vocab", ".json") if Path(f"{args.out}{ext}").exists()]
    if existing and not args.force:
        raise UsageError(
            f"--out {args.out}: {', '.join(existing)} already there (shard sets and runs made with that tokenizer "
            "depend on it); pass --force to replace it, or choose another prefix"
        )
    corpus = CorpusSpec(tuple(args.inputs or [BUILTIN]), args.text_field, args.txt_mode)
    problems = Problems(policy=args.on_error)
    settings = TokenizerSettings(
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback,
        split_digits=not args.no_split_digits,
        character_coverage=args.character_coverage,
        max_chars_per_doc=args.max_chars_per_doc,
        max_sample_chars=args.max_sample_chars,
        sample_fraction=args.sample_fraction,
        seed=args.seed,
    )
    card = train_tokenizer(iter_documents(corpus, problems, _options(args)), settings, args.out)
    sample = card["sample"]
    print(
        f"tokenizer {args.out}.model: vocab {card['vocab_size']}, trained on {sample['documents_sampled']} documents "
        f"({sample['sample_chars']} characters); card {args.out}.json"
    )
    _report(problems.report())
    return 0


def _settings(args: argparse.Namespace):
    from data_prep.shards import ShardSettings

    return ShardSettings(
        seq_len=args.seq_len,
        shard_bytes=args.shard_size,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        txt_mode=args.txt_mode,
        packing=args.packing,
        pack_buffer=args.pack_buffer,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from data_prep.units import make_plan

    plan = make_plan(
        list(args.inputs or [BUILTIN]),
        args.tokenizer,
        args.out,
        _settings(args),
        on_error=args.on_error,
        options=_options(args),
        command=["parcae", *sys.argv[1:]],
        row_groups_per_unit=args.row_groups_per_unit,
    )
    print(
        f"plan {args.out}/plan.json: {len(plan['units'])} units; prepare them with "
        f"`parcae prep run {args.out}` here or `parcae prep submit {args.out} --tasks N` on Slurm, then "
        f"`parcae prep merge {args.out}`"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from data_prep.units import run_units

    done = run_units(args.out, args.task, args.tasks, args.workers, _options(args), args.tokenizer)
    print(
        f"task {args.task} of {args.tasks}: {done['done_now']} units prepared ({done['tokens']} tokens), "
        f"{done['already_done']} already done"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from data_prep.units import merge

    summary = merge(args.out, _options(args), checksums=not args.sizes_only)
    for split in ("train", "val"):
        t = summary[split]
        rows = f"{t['samples']} rows ({t['tokens']} tokens) from {t['documents']} documents"
        print(f"{split}: {t['shards']} shards, {rows}")
    print(f"merged {summary['units']} units: {args.out}/train/manifest.json, {args.out}/val/manifest.json")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from data_prep.units import status

    s = status(args.out, _options(args))
    print(
        f"{args.out}: {len(s['done'])} of {s['units']} units done, {len(s['running'])} running, "
        f"{len(s['stalled'])} stalled, {len(s['pending'])} pending; {s['tokens']} tokens so far; "
        f"{'merged' if s['merged'] else 'not merged'}"
    )
    for kind in ("running", "stalled"):
        for line in s[kind]:
            print(f"  {kind}: {line}")
    return 1 if s["stalled"] else 0


def cmd_shards(args: argparse.Namespace) -> int:
    from data_prep.shards import build_shards

    settings = _settings(args)
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    summary = build_shards(
        list(args.inputs or [BUILTIN]),
        args.tokenizer,
        args.out,
        settings,
        workers=args.workers,
        on_error=args.on_error,
        options=_options(args),
        command=["parcae", *sys.argv[1:]],
        progress=progress,
    )
    for split in ("train", "val"):
        t = summary[split]
        print(
            f"{split}: {t['shards']} shards, {t['samples']} rows of {args.seq_len + 1} tokens ({t['tokens']} tokens) "
            f"from {t['documents']} documents; final partial row dropped: {t['remainder_tokens_dropped']} tokens"
            + (
                f"; {t['cropped_tokens']} tokens cropped from {t['cropped_documents']} documents"
                if args.packing == "bos-aligned"
                else f"; {t['rows_at_document_start']} rows start at a document"
            )
        )
    tokens = summary["train"]["tokens_produced"] + summary["val"]["tokens_produced"]
    rate = tokens / max(summary["seconds"], 1e-9) / 1e6
    kept = f"; kept {summary['kept_shards']} shards from the interrupted run" if summary["kept_shards"] else ""
    if summary["resumed_after_chunks"]:
        kept += (
            f"; resumed after {summary['resumed_after_chunks']} chunks of input at the last shard boundary "
            f"({summary['tokens_encoded']} tokens tokenized again)"
        )
    print(f"wrote {args.out} in {summary['seconds']:.1f} s ({rate:.2f}M tokens/s){kept}")
    _warn_cropping(summary, args.seq_len, args.packing)
    _report(summary["problem_report"])
    return 0


CROPPED_WARNING_SHARE = 0.25


def _warn_cropping(summary: dict, seq_len: int, packing: str) -> None:
    """bos-aligned packing crops what does not fit a row: above a quarter of the tokens, say so with the fix."""
    cropped = summary["train"].get("cropped_tokens", 0) + summary["val"].get("cropped_tokens", 0)
    produced = summary["train"]["tokens_produced"] + summary["val"]["tokens_produced"]
    if packing != "bos-aligned" or not produced or cropped / produced <= CROPPED_WARNING_SHARE:
        return
    print(
        f"warning: bos-aligned packing cropped {cropped / produced:.0%} of the tokens ({cropped} of {produced}): "
        f"the documents are long for rows of {seq_len} tokens; a longer --seq-len keeps more, --packing concat "
        "keeps all",
        file=sys.stderr,
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect import decode_samples, read_manifest, summary, summary_line, verify
    from data_prep.storage import open_store

    options = _options(args)
    failed = False
    for url in args.urls:
        print(summary_line(summary(url, options)))
        if args.verify:
            manifest = read_manifest(open_store(url, options))
            problems = verify(url, options)
            total = manifest.get("totals", {})
            if problems:
                print(f"{url}: {len(problems)} problem(s) against the manifest:", file=sys.stderr)
                for line in problems:
                    print(f"  {line}", file=sys.stderr)
                failed = True
                continue
            print(
                f"{url}: all {len(manifest['shards'])} shards present and intact "
                f"({total.get('samples', '?')} samples, {total.get('tokens', '?')} tokens)"
            )
        elif len(args.urls) == 1:
            for text in decode_samples(url, args.tokenizer, args.samples, options, args.shard):
                print(text)
    return 1 if failed else 0


def _report(lines: list[str]) -> None:
    if lines:
        print("corpus problems (counted, not silently dropped):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)
