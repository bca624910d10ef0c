"""What the Landlock sandbox costs a run: start-up (`python -c "import torch"` directly vs through
sandbox.wrap(), interleaved) and training step time inside vs outside (the SmolLM-135M
architecture, fewer layers, with train.py's BitLinear, the same script run directly and wrapped, alternating).

    python bench/sandbox_cost.py [--starts 10] [--layers 4] [--batch 2] [--seq 128] [--steps 3] [--rounds 2]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, SHARED_DATA, header

import sandbox


def child_step_seconds(layers: int, batch: int, seq: int, steps: int) -> None:
    """Inside the measured process: best ternary training step, printed as the last line."""
    import json
    import torch
    import train
    from common import CONFIG
    from step_ratio import step_time
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**{**json.loads(CONFIG.read_text()), "num_hidden_layers": layers})
    model = train.quantize_model(LlamaForCausalLM(config), torch.ones(()))
    torch.set_num_threads(1)  # one thread: less at the mercy of the other users of a shared machine
    cpu = time.process_time()
    wall = step_time(model, torch.randint(0, 49152, (batch, seq + 1)), steps)
    print(wall, (time.process_time() - cpu) / (steps + 1))


def timed_run(argv: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4, help="of SmolLM-135M's 30, to stay within 2 minutes on CPU")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_step_seconds(args.layers, args.batch, args.seq, args.steps)
    with tempfile.TemporaryDirectory() as run:
        # What the driver would give: the repository and the data to read, a run folder to write.
        env = {**os.environ, "TMPDIR": run}
        wrapped = lambda cmd: sandbox.wrap(cmd, [ROOT, SHARED_DATA], [run])  # noqa: E731
        start_cmd, true_cmd = [sys.executable, "-c", "import torch"], ["true"]
        direct_s, inside_s, true_s, true_inside_s = [], [], [], []
        for _ in range(args.starts):
            direct_s.append(timed_run(start_cmd, env)[0])
            inside_s.append(timed_run(wrapped(start_cmd), env)[0])
            true_s.append(timed_run(true_cmd, env)[0])
            true_inside_s.append(timed_run(wrapped(true_cmd), env)[0])
        step_cmd = [sys.executable, __file__, "--child", f"--layers={args.layers}", f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={args.steps}"]
        direct_step, inside_step = [], []  # (best wall s, mean CPU s) per step, per run
        for _ in range(args.rounds):
            direct_step.append([float(x) for x in timed_run(step_cmd, env)[1].split()[-2:]])
            inside_step.append([float(x) for x in timed_run(wrapped(step_cmd), env)[1].split()[-2:]])
    print(header("Landlock sandbox cost"))
    print(f"Landlock ABI {sandbox.landlock_abi()}; wrap(read=[repository, WikiText-2 folder], write=[run folder]); "
          f"start-up: median of {args.starts} interleaved runs each; step: SmolLM-135M architecture cut to {args.layers} layers, with BitLinear (λ=1), "
          f"batch {args.batch}×{args.seq}, 1 thread, {args.steps} steps per run, best of {args.rounds} alternating runs each\n")
    direct, inside = statistics.median(direct_s), statistics.median(inside_s)
    bare, bare_inside = statistics.median(true_s), statistics.median(true_inside_s)
    print("| measure | outside | inside | extra | ratio inside/outside |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| set-up alone: `true` (s) | {bare:.3f} | {bare_inside:.3f} | {bare_inside - bare:+.3f} | {bare_inside / bare:.1f} |")
    print(f"| start-up: `python -c \"import torch\"` (s) | {direct:.3f} | {inside:.3f} | {inside - direct:+.3f} | {inside / direct:.2f} |")
    for i, what in enumerate(("best wall-clock", "CPU time")):
        out, ins = min(r[i] for r in direct_step), min(r[i] for r in inside_step)
        print(f"| ternary training step, {what} (s) | {out:.3f} | {ins:.3f} | {ins - out:+.3f} | {ins / out:.2f} |")


if __name__ == "__main__":
    main()
