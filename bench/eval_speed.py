"""Evaluator throughput: prepare.perplexity (batched, inference mode) against a naive loop (one window
at a time through HF's own loss, autograd on), on the same model and windows, interleaved.

    python bench/eval_speed.py [--windows 4] [--repeats 2]
"""
import argparse
import math

import torch

from common import Timer, header, use_real_assets


def naive_ppl(model, tokens, windows: int, window: int = 2048) -> float:
    nll = 0.0
    for i in range(windows):
        ids = tokens[i * window:(i + 1) * window][None]
        nll += model(input_ids=ids, labels=ids).loss.item()
    return math.exp(nll / windows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    use_real_assets()
    import prepare
    model = prepare.load_model().eval()
    tokens = prepare.load_tokens("validation")
    tok_count = args.windows * 2047
    ours, naive = [], []
    for _ in range(args.repeats):
        with Timer() as t:
            result = prepare.perplexity(model, tokens, max_windows=args.windows)
        ours.append(t.seconds)
        with Timer() as t:
            reference = naive_ppl(model.float(), tokens, args.windows)
        naive.append(t.seconds)
    print(header("Evaluator vs a naive one-window loop"))
    print(f"SmolLM2-135M-Instruct (GGUF, float32 on CPU), first {args.windows} validation windows, "
          f"{args.repeats} interleaved repeats, best of each\n")
    print("| evaluator | tokens/s | ppl | ratio |\n| --- | ---: | ---: | ---: |")
    print(f"| naive loop (batch 1, autograd on, HF loss) | {tok_count / min(naive):,.0f} | {reference:.3f} | 1.00 |")
    print(f"| prepare.perplexity (batch {prepare.EVAL_BATCH_CPU}, inference mode) | {tok_count / min(ours):,.0f} | "
          f"{result['ppl']:.3f} | {min(naive) / min(ours):.2f} |")


if __name__ == "__main__":
    main()
