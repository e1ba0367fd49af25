"""`parcae generate SOURCE --prompt TEXT`: text from a model, with its tokenizer, through the KV cache."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.cli.args import add_endpoint, add_overrides, loop_count


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from any model `parcae eval` reads (KV-cached, every core layer once per loop)",
    )
    p.add_argument("source", help="run directory, checkpoint directory, .safetensors or released model directory")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a file of prompts, one per line")
    p.add_argument(
        "--loops",
        type=loop_count,
        help="loops per token (default: the model's mean recurrence; the maximum with --adaptive)",
    )
    p.add_argument(
        "--adaptive",
        type=float,
        metavar="KL",
        help="stop a token's loops once two successive loops' next-token distributions are within KL "
        "(--loops is then the maximum); e.g. 5e-4",
    )
    p.add_argument(
        "--cache-slots",
        type=int,
        metavar="K",
        help="keep K loops' keys and values per core layer (bounded memory, approximate; default: every loop)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", help="tokenizer (.model or tokenizer.json; default: the model's)")
    p.add_argument("--spec", help="job spec for reference-format weights (the model section)")
    add_overrides(p)
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    add_endpoint(p)
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence for every token (slow)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt, no streaming")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.jobs.evaluate import load_source
    from pipeline.jobs.generate import read_prompts, run_generate
    from pipeline.jobspec import load_spec

    prompts = read_prompts(args.prompt, args.prompt_file)
    given = load_spec(args.spec, args.overrides).spec if args.spec else None

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    made = run_generate(
        load_source(args.source, given, args.tag, args.endpoint_url),
        source_arg=str(args.source),
        prompts=prompts,
        loops=args.loops,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        tokenizer=args.tokenizer,
        endpoint_url=args.endpoint_url,
        on_text=None if args.json else show,
        use_cache=not args.no_cache,
        core_slots=args.cache_slots,
        adaptive=args.adaptive,
    )
    if args.json:
        for result in made.results:
            print(json.dumps({**result, **made.stats}))
        return 0
    if made.streamed:
        print()
    else:
        for result in made.results:
            print(f"{result['prompt']}{result['completion']}\n")
    print(made.line, file=sys.stderr)
    return 0
