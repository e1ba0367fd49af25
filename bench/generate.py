"""Generation speed with and without the KV cache, and what the cache holds per token.

configs/demo-tiny.yaml's model shape (d=64, 1/1/1 blocks) with a 512-token context, random weights (speed
does not depend on them), one process: a 256-token prompt, 256 new greedy tokens, at T = 1, 4 and 8 loops,
cached (`ParcaeLM.generate`, the default) against uncached (`use_cache=False`, the whole sequence again for
every token), alternating, the median of --rounds. The cache's bytes per token are measured from the cache
and compared with (prelude + coda + T x core) x 2 x d x 4 bytes (fp32 keys and values).

    .venv/bin/python bench/generate.py [--rounds 3] [--new 256] [--prompt 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=256)
    args = parser.parse_args()
    from model import build_model
    from model.cache import KVCache
    from pipeline.jobspec import load_spec

    cfg = dataclasses.replace(load_spec(REPO / "configs" / "demo-tiny.yaml").spec.model.build(), max_seq_len=512)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(
        f"d={cfg.d_model}, {cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda} blocks, {args.prompt}-token prompt, "
        f"{args.new} new tokens, threads {torch.get_num_threads()}"
    )
    for loops in (1, 4, 8):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for cached in (True, False):
                start = time.perf_counter()
                out = model.generate(prompt, args.new, loops=loops, use_cache=cached)
                times[cached].append(time.perf_counter() - start)
                if cached:
                    tokens = out
                else:
                    assert torch.equal(out, tokens), "cached and uncached greedy tokens differ"
        rates = {c: args.new / statistics.median(t) for c, t in times.items()}
        cache = KVCache(torch.ones(1, args.prompt + args.new, dtype=torch.bool))
        model.forward_cached(tokens[:, : args.prompt + args.new], cache, loops)
        per_token = cache.nbytes() / (args.prompt + args.new)
        formula = (cfg.n_prelude + cfg.n_coda + loops * cfg.n_core) * 2 * cfg.d_model * 4
        print(
            f"  T={loops}: cached {rates[True]:7.1f} tokens/s, uncached {rates[False]:7.1f} tokens/s: "
            f"{rates[True] / rates[False]:5.1f}x; cache {per_token:.0f} bytes/token (formula {formula})"
        )


if __name__ == "__main__":
    main()
