"""The driver's own cost per experiment: wall-clock per experiment minus the time inside the LLM call,
train.py and the evaluator, with an instant scripted LLM and stand-in train.py/prepare.py.

    python bench/driver_overhead.py [--experiments 20]
"""
import argparse
import tempfile
import time
from pathlib import Path

from common import header
from driver_helpers import ledger, make_research_repo, run_agent
from fake_llm import FakeLLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=20)
    args = parser.parse_args()
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research")
    llm = FakeLLM(default_factor=0.99)
    try:
        run_agent(repo, llm.url, "--max-experiments", "0")  # the baseline, and the driver's own start-up
        start = time.perf_counter()
        done = run_agent(repo, llm.url, "--max-experiments", str(args.experiments), timeout=1800)
        wall = time.perf_counter() - start
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo).iloc[1:]
    stamps = [line for line in done.stdout.splitlines() if "training (" in line]
    assert len(rows) == args.experiments == len(stamps)
    inside = rows["train_s"].sum() + rows["eval_s"].sum()
    per = (wall - inside) / args.experiments
    print(header("Driver overhead per experiment"))
    print(f"{args.experiments} experiments (all kept), scripted LLM on 127.0.0.1 answering at once, stand-in "
          "train.py/prepare.py (each a bare Python process)\n")
    print("| measure | seconds per experiment | share |\n| --- | ---: | ---: |")
    print(f"| wall-clock | {wall / args.experiments:.3f} | 1.00 |")
    print(f"| inside train.py + evaluator processes (start-up included) | {inside / args.experiments:.3f} | "
          f"{inside / wall:.2f} |")
    print(f"| driver overhead (LLM round trip, git, checks, ledger; one-time start-up included) | {per:.3f} | "
          f"{per * args.experiments / wall:.2f} |")


if __name__ == "__main__":
    main()
