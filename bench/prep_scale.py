"""Prep at scale: resuming after a late crash against a full run, and 1 task against 2 on Slurm.

resume: the embedded corpus repeated to --megabytes of JSON Lines, `parcae prep shards` (2 workers) run
whole, then run again into a new output and SIGKILLed while its next-to-last train
shard fills, then rerun: the rerun's time and tokens tokenized against the full run's.

slurm (--slurm): the same corpus as 8 files, `parcae prep plan` + `prep submit --tasks 1` and `--tasks 2`
(1 worker each) on the two-node local Slurm cluster (slurm/local_cluster.sh, started and stopped here),
each timed from the submission to the end of its merge job; tokens/s and the ratio.

    python bench/prep_scale.py [--megabytes 24] [--slurm] [--work runs/prep-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from workdir import REPO, prepare_corpus


def corpus(work: Path, megabytes: int) -> list[Path]:
    """8 JSON Lines files holding the embedded corpus repeated to about ``megabytes`` MB."""
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents

    files = [work / "corpus" / f"part{k}.jsonl" for k in range(8)]
    if all(f.is_file() for f in files):
        return files
    files[0].parent.mkdir(parents=True, exist_ok=True)
    docs = [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]
    lines, size, copy = [], 0, 0
    while size < megabytes * 1e6:
        for text in docs:
            line = json.dumps({"text": text if copy == 0 else f"({copy}) {text}"})
            lines.append(line)
            size += len(line) + 1
        copy += 1
    for k, path in enumerate(files):
        path.write_text("\n".join(lines[k::8]) + "\n")
    return files


def resume_bench(work: Path, tokenizer: Path, files: list[Path]) -> None:
    from data_prep.shards import ShardSettings, build_shards

    settings = ShardSettings(seq_len=2048, shard_bytes=1_000_000, val_fraction=0.005)
    sources = [str(f) for f in files]
    for name in ("full", "crashed"):
        subprocess.run(["rm", "-rf", str(work / name)], check=True)
    started = time.perf_counter()
    full = build_shards(sources, str(tokenizer), str(work / "full"), settings, workers=2, progress=False)
    full_s = time.perf_counter() - started
    total = full["train"]["shards"]
    code = textwrap.dedent(f"""
        import os
        from data_prep import resume, shards
        from data_prep.shards import ShardSettings, build_shards
        save, add, armed = resume.save, shards.ShardBuilder.add, []
        def saving(store, fingerprint, chunks, builder, *rest):
            save(store, fingerprint, chunks, builder, *rest)
            if builder.splits["train"].shard_index == {total - 2}:
                armed.append(0)
        def adding(self, split, tokens, lengths):
            if armed:
                os.kill(os.getpid(), 9)  # SIGKILL
            add(self, split, tokens, lengths)
        resume.save, shards.ShardBuilder.add = saving, adding
        settings = ShardSettings(seq_len=2048, shard_bytes=1_000_000, val_fraction=0.005)
        build_shards({sources!r}, {str(tokenizer)!r}, {str(work / "crashed")!r}, settings, workers=2, progress=False)
    """)
    died = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert died.returncode == -9, died.returncode
    started = time.perf_counter()
    again = build_shards(sources, str(tokenizer), str(work / "crashed"), settings, workers=2, progress=False)
    again_s = time.perf_counter() - started
    same = all(
        (work / "full" / split / s["name"]).read_bytes() == (work / "crashed" / split / s["name"]).read_bytes()
        for split in ("train", "val")
        for s in json.loads((work / "full" / split / "manifest.json").read_text())["shards"]
    )
    print(f"resume: full run {full_s:.1f} s, {full['tokens_encoded']} tokens tokenized, {total} train shards")
    print(
        f"resume: killed while shard {total - 1} of {total} filled; the rerun took {again_s:.1f} s "
        f"({again_s / full_s:.2f}x the full run) and tokenized {again['tokens_encoded']} tokens "
        f"({again['tokens_encoded'] / full['tokens_encoded']:.1%}); shards identical: {same}"
    )


def slurm_bench(work: Path, tokenizer: Path, files: list[Path]) -> None:
    state = work / "slurm-state"
    script = REPO / "slurm" / "local_cluster.sh"
    subprocess.run(["bash", str(script), "start", str(state)], check=True, capture_output=True)
    env = {**os.environ, "SLURM_CONF": str(state / "etc" / "slurm.conf")}
    try:
        results = {}
        for tasks in (1, 2):
            out = work / f"array{tasks}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            parcae = [sys.executable, "-m", "pipeline", "prep"]
            subprocess.run([*parcae, "plan", "--input", str(files[0].parent), "--tokenizer", str(tokenizer),
                            "--out", str(out), "--seq-len", "2048", "--shard-size", "4MB"],
                           check=True, cwd=REPO, env=env, capture_output=True)  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run([*parcae, "submit", str(out), "--tasks", str(tasks), "--workers", "1",
                                   "--log-dir", str(work / f"logs{tasks}")],
                                  check=True, cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
            merge_job = done.stdout.split()[-1]
            while True:
                shown = subprocess.run(["scontrol", "show", "job", merge_job, "--oneliner"], env=env,
                                       capture_output=True, text=True).stdout  # fmt: skip
                state_now = dict(x.split("=", 1) for x in shown.split() if "=" in x).get("JobState", "GONE")
                if state_now in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
                    break
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            assert state_now == "COMPLETED", state_now
            manifest = json.loads((out / "train" / "manifest.json").read_text())
            tokens = manifest["totals"]["tokens_produced"]
            val = json.loads((out / "val" / "manifest.json").read_text())["totals"]["tokens_produced"]
            results[tasks] = (tokens + val) / seconds
            print(f"slurm: {tasks} task(s) x 1 worker: {seconds:.1f} s from submission to merged, "
                  f"{results[tasks] / 1e6:.2f}M tokens/s")  # fmt: skip
        print(f"slurm: 2 tasks / 1 task: {results[2] / results[1]:.2f}x")
    finally:
        subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=24)
    parser.add_argument("--slurm", action="store_true", help="also 1 task against 2 on the local Slurm cluster")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "prep-bench")
    args = parser.parse_args()
    work = args.work.resolve()
    tokenizer, _ = prepare_corpus(work, 2048, vocab_size=8192)
    files = corpus(work, args.megabytes)
    resume_bench(work, tokenizer, files)
    if args.slurm:
        slurm_bench(work, tokenizer, files)


if __name__ == "__main__":
    main()
