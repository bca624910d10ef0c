"""The driver's own cost per experiment: wall-clock per experiment minus the time inside the LLM call,
train.py and the evaluator, with an instant scripted LLM and stand-in train.py/prepare.py; and the CPU time the
night took (driver and its children), against another checkout's driver in the same run.

    python bench/driver_overhead.py [--experiments 20] [--against OTHER_CHECKOUT]
"""
import argparse
import resource
import tempfile
import time
from pathlib import Path

from common import ROOT, header
import driver_helpers  # noqa: E402 (common puts tests/ on the path)
from driver_helpers import ledger, make_research_repo, run_agent
from fake_llm import FakeLLM


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def night(checkout: Path, experiments: int) -> dict:
    """A baseline, then `experiments` kept experiments, driven by checkout's agent.py."""
    driver_helpers.AGENT = checkout / "agent.py"
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research")
    llm = FakeLLM(default_factor=0.99)
    try:
        run_agent(repo, llm.url, "--max-experiments", "0")  # the baseline, and the driver's own start-up
        start, cpu = time.perf_counter(), children_cpu()
        done = run_agent(repo, llm.url, "--max-experiments", str(experiments), timeout=1800)
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo).iloc[1:]
    assert len(rows) == experiments == sum("training (" in line for line in done.stdout.splitlines())
    return {"wall": wall, "cpu": cpu, "inside": rows["train_s"].sum() + rows["eval_s"].sum()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--against", type=Path, help="another checkout (e.g. a git worktree of an older commit): "
                        "its driver is the baseline of the ratios")
    args = parser.parse_args()
    n = args.experiments
    mine = night(ROOT, n)
    print(header("Driver overhead per experiment"))
    print(f"{n} experiments (all kept), scripted LLM on 127.0.0.1 answering at once, stand-in "
          "train.py/prepare.py (each a bare Python process)\n")
    print("| measure | seconds per experiment | share |\n| --- | ---: | ---: |")
    print(f"| wall-clock | {mine['wall'] / n:.3f} | 1.00 |")
    print(f"| inside train.py + evaluator processes (start-up included) | {mine['inside'] / n:.3f} | "
          f"{mine['inside'] / mine['wall']:.2f} |")
    per = (mine["wall"] - mine["inside"]) / n
    print(f"| driver overhead (LLM round trip, git, checks, ledger; one-time start-up included) | {per:.3f} | "
          f"{per * n / mine['wall']:.2f} |")
    if args.against:
        base = night(args.against.resolve(), n)
        print(f"\nAgainst {args.against} in the same run (ratio: its figure over this checkout's)\n")
        print("| driver | wall-clock s per experiment | CPU s per experiment (driver and children) | ratio, CPU |")
        print("| --- | ---: | ---: | ---: |")
        print(f"| {args.against.name} | {base['wall'] / n:.3f} | {base['cpu'] / n:.3f} | 1.00 |")
        print(f"| this checkout | {mine['wall'] / n:.3f} | {mine['cpu'] / n:.3f} | {base['cpu'] / mine['cpu']:.2f} |")


if __name__ == "__main__":
    main()
