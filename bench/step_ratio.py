"""Ternary / full-precision training step time on the SmolLM-135M architecture (random weights):
the same model, batch and optimizer, with and without train.py's BitLinear (λ = 1), interleaved.

    python bench/step_ratio.py [--batch 4] [--seq 256] [--steps 4]
"""
import argparse
import copy

import torch
import torch.nn.functional as F

from common import Timer, header, smollm_architecture


def step_time(model, batch, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=batch.is_cuda)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators/kernels
        if batch.is_cuda:
            torch.cuda.synchronize()
        with Timer() as t, torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.is_cuda):
            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if batch.is_cuda:
                torch.cuda.synchronize()
        if i:
            times.append(t.seconds)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import train
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp = smollm_architecture().to(dev)
    ternary = train.quantize_model(copy.deepcopy(fp), torch.ones((), device=dev))
    batch = torch.randint(0, 49152, (args.batch, args.seq + 1), device=dev)
    fp_s, tern_s = [], []
    for _ in range(args.rounds):
        fp_s.append(step_time(fp, batch, args.steps))
        tern_s.append(step_time(ternary, batch, args.steps))
    tokens = args.batch * args.seq
    print(header("Ternary vs full-precision training step"))
    print(f"SmolLM-135M architecture (random init), batch {args.batch}×{args.seq}, AdamW, "
          f"GROUP_SIZE={train.GROUP_SIZE!r}, best step of {args.steps}×{args.rounds} each, interleaved\n")
    print("| model | s/step | tokens/s | ratio |\n| --- | ---: | ---: | ---: |")
    print(f"| full precision | {min(fp_s):.3f} | {tokens / min(fp_s):,.0f} | 1.00 |")
    print(f"| ternary (BitLinear, λ=1) | {min(tern_s):.3f} | {tokens / min(tern_s):,.0f} | {min(tern_s) / min(fp_s):.2f} |")


if __name__ == "__main__":
    main()
