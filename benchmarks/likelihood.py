"""Likelihood-scorer benchmark (not a test): `likelihood` vs `rating` mode on the same LLM and requests, in one run.

    .venv/bin/python benchmarks/likelihood.py        # tiny Llama on CPU, 16 prompts x 8 labels
    .venv/bin/python benchmarks/likelihood.py --model lmsys/vicuna-7b-v1.5 --device cuda --dtype float16

Both modes score the same (prompt, label set)s with the same model, side by side:
1. likelihood mode, the rating-token probabilities of every (prompt, label) pair, `--batch-size` rows per forward,
   two ways: with the shared prefix (each prompt's question prefix once, then the labels' suffixes against its KV
   cache: the default) and without it (every pair's whole question in its own row, `share_prefix=False`);
2. rating mode, the paper's protocol: one sampled `tag:score` reply per prompt, at two reply budgets: the paper's
   512 new tokens, and a realistic reply length (6 tokens per label + 16) for an LLM that stops after its list.
An untrained tiny model never emits its end token, so rating mode generates exactly its budget (and its replies do
not parse); a real LLM stops earlier, which the realistic budget stands for. Each case runs after a warm-up call;
the figure is the median of `--repeats` calls. Goals: likelihood mode (shared) >= 10x faster than the realistic
rating budget and >= 20x faster than the paper's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# This checkout's services/, not an installed copy's (the script's own folder is what Python puts on sys.path).
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "a cozy kitchen with a kettle on the stove",
    "two green dogs in the city",
    "a whale jumping out of the ocean at sunset",
    "a child reading a book under a tree",
    "a red sports car parked in front of a castle",
    "a bowl of ramen on a wooden table",
    "an astronaut riding a horse on the moon",
    "a crowded market street in the rain",
    "three cats sleeping on a sofa",
    "a lighthouse on a cliff during a storm",
    "a chef slicing vegetables in a restaurant kitchen",
    "a snowy mountain village at night",
    "a group of people playing football on a beach",
    "an old library with tall bookshelves",
    "a vase of sunflowers next to a window",
    "a train crossing a bridge over a river",
]
LABELS = [
    "cup", "dog", "car", "tree", "person", "bench", "boat", "bird", "chair", "dining table", "book", "clock",
    "umbrella", "horse", "bicycle", "potted plant", "bottle", "bowl", "traffic light", "couch", "sky", "mountain",
    "building", "volcano",
]  # fmt: skip


def requests(n_prompts: int, n_labels: int) -> list[tuple[str, list[str]]]:
    """`n_prompts` distinct prompts with `n_labels` labels each (a rotating window of LABELS): no duplicate pairs."""
    prompts = [PROMPTS[i % len(PROMPTS)] + (f" (variant {i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
               for i in range(n_prompts)]  # fmt: skip
    return [(p, [LABELS[(3 * i + j) % len(LABELS)] for j in range(n_labels)]) for i, p in enumerate(prompts)]


def measure(scorer, reqs, repeats: int) -> tuple[float, list, int]:
    """(median seconds per call, results of the last call, model forward passes per call)."""
    calls = []
    # On the decoder: every forward runs it, with the LM head or (the shared path's rating rows) without.
    hook = scorer.model.get_decoder().register_forward_hook(lambda module, args, output: calls.append(1))
    scorer.score(reqs[:1])  # warm-up
    times, results = [], []
    for _ in range(repeats):
        calls.clear()
        start = time.perf_counter()
        results = scorer.score(reqs)
        times.append(time.perf_counter() - start)
    hook.remove()
    return statistics.median(times), results, len(calls)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local directory (default: the tiny seeded Llama)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=16, help="(prompt, label set) requests per call")
    parser.add_argument("--labels", type=int, default=8, help="labels per prompt")
    parser.add_argument("--batch-size", type=int, default=64, help="LLMConfig.batch_size of both modes")
    parser.add_argument(
        "--rating-max-new-tokens",
        type=int,
        nargs="+",
        default=None,
        help="rating-mode reply budgets (default: the paper's 512 and a realistic 6 per label + 16)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    import torch

    from services.llm_prompts import likelihood_inputs
    from services.llm_scorer import LikelihoodScorer, LLMConfig
    from services.reward import SampleFailure
    from trainer.local_models.tiny import save_tiny_models

    torch.set_num_threads(args.threads)
    model = args.model or str(save_tiny_models()["llama"])
    name = args.model or "tiny Llama (2 layers, 32 wide, BERT vocab)"
    reqs = requests(args.prompts, args.labels)
    n_pairs = sum(len(labels) for _, labels in reqs)
    realistic = 6 * args.labels + 16
    budgets = args.rating_max_new_tokens or [512, realistic]

    common = dict(model=model, dtype=args.dtype, batch_size=args.batch_size)
    cases = [
        ("likelihood", "shared prefix", LLMConfig(**common)),
        ("likelihood", "whole questions (full path)", LLMConfig(**common, share_prefix=False)),
    ]
    for budget in budgets:
        tag = "paper" if budget == 512 else "realistic" if budget == realistic else "custom"
        config = LLMConfig(**common, mode="rating", rating_max_new_tokens=budget)
        cases.append(("rating", f"{budget} new tokens ({tag})", config))

    # One loaded model, shared by every case (only the config differs), so the modes see the same weights.
    loaded = LikelihoodScorer(cases[0][2])
    loaded.load(args.device)
    rows, results_of = [], {}
    for mode, setting, config in cases:
        scorer = LikelihoodScorer(config, model=loaded.model, tokenizer=loaded.tokenizer)
        scorer.load(args.device)
        seconds, results, forwards = measure(scorer, reqs, args.repeats)
        parsed = sum(not isinstance(r, SampleFailure) for r in results)
        rows.append((mode, setting, seconds, forwards, parsed))
        results_of[setting] = results

    print(f"{name}, {args.device} {args.dtype}, {args.prompts} prompts x {args.labels} labels, "
          f"batch size {args.batch_size}, torch threads {args.threads}, median of {args.repeats}")  # fmt: skip
    print(f"{'mode':<11}{'setting':<30}{'s/call':>9}{'ms/prompt':>11}{'labels/s':>10}{'forwards':>10}{'scored':>8}")
    for mode, setting, seconds, forwards, parsed in rows:
        print(
            f"{mode:<11}{setting:<30}{seconds:>9.3f}{seconds / args.prompts * 1000:>11.1f}"
            f"{n_pairs / seconds:>10.1f}{forwards:>10}{f'{parsed}/{args.prompts}':>8}"
        )
    # Where likelihood mode's time goes: tokenization (each prefix and suffix once) and the tokens the model reads.
    pairs = [(p, label) for p, labels in reqs for label in labels]
    tokenize = statistics.median(
        _timed(lambda: likelihood_inputs(loaded.tokenizer, pairs)) for _ in range(args.repeats)
    )
    inputs = likelihood_inputs(loaded.tokenizer, pairs)
    prefix_tokens = sum(len(ids) for ids in inputs.prefixes)
    suffix_tokens = sum(len(inputs.suffixes[s]) for _, s in inputs.pairs)
    whole_tokens = sum(len(inputs.sequence(i)) for i in range(len(pairs)))
    print(f"likelihood mode: tokenization {tokenize * 1000:.1f} ms of {rows[0][2] * 1000:.0f} ms; "
          f"{prefix_tokens / len(inputs.prefixes):.0f} prefix tokens per prompt + "
          f"{suffix_tokens / len(pairs):.1f} suffix tokens per pair: {prefix_tokens + suffix_tokens} tokens read "
          f"shared, {whole_tokens} as whole questions")  # fmt: skip
    shared = [v for r in results_of["shared prefix"] for v in r.values()]
    full = [v for r in results_of["whole questions (full path)"] for v in r.values()]
    worst = max(abs(a - b) for a, b in zip(shared, full, strict=True))
    print(f"likelihood shared vs full path: largest absolute difference {worst:.1e}")
    for label, fast in (("shared", rows[0][2]), ("full", rows[1][2])):
        for _, setting, seconds, _, _ in rows[2:]:
            goal = 20 if "512" in setting else 10
            ratio = seconds / fast
            verdict = "met" if ratio >= goal else "not met"
            print(f"likelihood ({label}) vs rating, {setting}: {ratio:.1f}x faster   (goal >= {goal}x: {verdict})")


if __name__ == "__main__":
    main()
