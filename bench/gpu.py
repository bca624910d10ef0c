"""ONE prepared script for a lent GPU (no network, no weights needed): SmolLM-135M's architecture from
bench/smollm_135m_config.json with random weights, train.py's own step and prepare.py's own scorer.

    python bench/gpu.py            # prints one markdown table
    python bench/gpu.py --smoke    # a tiny config on CPU, to check the script runs before using device time

Rows: tokens/s of the training step (full precision and ternary, eager and torch.compile), seconds from
process start to the end of the process's first optimizer step (full precision, eager), seconds to
score a full validation split's worth of windows (131 × 2048 with SmolLM's tokenizer), peak memory,
and tokens a 300 s run would train.
"""
import argparse
import copy
import json
import time

START = time.time()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import CONFIG, header  # noqa: E402


def build(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = json.loads(CONFIG.read_text())
    if smoke:
        config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config))


def measure(model, batch, steps: int, dev) -> tuple[float, float, float]:
    """(tokens/s over `steps` timed steps after 2 warm-up steps, seconds of the warm-up incl. compile,
    time.time() at the end of the first step)."""
    import train
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def step():
        with amp:
            loss = train.training_loss(model, None, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first_done = time.time()
    step()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch[:, :-1].numel() * steps / (time.perf_counter() - t0), warm, first_done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import prepare
    import train
    dev = prepare.device()
    train.KD_WEIGHT = 0.0  # the step of the model under training; KD adds one teacher forward
    base = build(args.smoke).to(dev)
    vocab = base.config.vocab_size
    batch = torch.randint(0, vocab, (train.BATCH_SIZE if not args.smoke else 2,
                                     (train.SEQ_LEN if not args.smoke else 64) + 1), device=dev)
    rows, first_step = [], None
    for name, quantized in (("full precision", False), ("ternary", True)):
        for compiled in (False, True):
            if compiled and dev.type != "cuda":
                continue
            model = copy.deepcopy(base)
            if quantized:
                train.quantize_model(model, torch.ones((), device=dev))
            run = torch.compile(model) if compiled else model
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tok_s, warm, first_done = measure(run, batch, args.steps if not args.smoke else 2, dev)
            first_step = first_step or first_done - START  # the process's first optimizer step, not its 22nd
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            rows.append((name, compiled, tok_s, warm, peak))
            del model, run
    windows = 131 if not args.smoke else 2
    tokens = torch.randint(0, vocab, (windows * prepare.EVAL_WINDOW,))
    t0 = time.perf_counter()
    prepare.perplexity(copy.deepcopy(base), tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    score_s = time.perf_counter() - t0
    fp_eager = rows[0][2]
    print(header("Throughput on the GPU (SmolLM-135M architecture, random weights)"))
    print(f"batch {batch.shape[0]}×{batch.shape[1] - 1}, bf16 autocast, fused AdamW, KD off; seconds from process start "
          f"to the end of its first optimizer step (full precision, eager; imports and building the model included): "
          f"{first_step:.1f}; scoring {windows} windows of 2048: "
          f"{score_s:.1f} s\n")
    print("| model | torch.compile | tokens/s | ratio to FP eager | warm-up s | peak GiB | tokens in a 300 s run |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, compiled, tok_s, warm, peak in rows:
        print(f"| {name} | {'yes' if compiled else 'no'} | {tok_s:,.0f} | {tok_s / fp_eager:.2f} | {warm:.1f} | "
              f"{peak:.1f} | {tok_s * (300 - 15 - warm):,.0f} |")


if __name__ == "__main__":
    main()
