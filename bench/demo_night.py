"""A short real night: the real driver, prepare.py and train.py on a tiny Llama built here, a scripted
LLM proposing real train.py changes (or the built-in sweep, no LLM); then `agent.py report` and `agent.py plot`.

    python bench/demo_night.py [--out DIR] [--proposer llm|sweep|both] [--experiments N]
both: an LLM night (tag llm) and a sweep night (tag sweep) of the same length from the same commit, and
their overlay plot.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import tiny_world  # puts the repo and tests on sys.path
import git
from driver_helpers import AGENT, agent_env
from fake_llm import FakeLLM


def edit(search: str, replace: str, description: str) -> str:
    return f"DESCRIPTION: {description}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


CHANGES = [edit('LR = 3e-4', "LR = 1e-3", "raise LR to 1e-3"),
           edit('GROUP_SIZE = "row"              # 32 | 64 | 128 | 256 | "row" (per output row) | "tensor"', "GROUP_SIZE = 64", "group size 64"),
           edit('LAMBDA_WARMUP_STEPS = 50        # steps from λ=0 to λ=1 (a 135M model barely needs warmup)', "LAMBDA_WARMUP_STEPS = 5", "shorter lambda warmup (5 steps)"),
           edit('KD_WEIGHT = 1.0                 # logits distillation from the frozen full-precision teacher', "KD_WEIGHT = 0.0", "no logits distillation"),
           edit('GRAD_CLIP = 1.0', "GRAD_CLIP = 1.0 +", "a syntax error the driver must reject")]


# what the sweep tries on this tiny model (the real program.md's values suit a 135M model and 5 minutes): two
# coarse steps known to help a lot here, then a finer pass around them, as a researcher's second night
# would be. The finer values move val_ppl by about the run-to-run noise, which is what the confirmation run
# of the keep rule is for.
DEMO_SPACE = """LR = [3e-3]
KD_WEIGHT = [0.0]
LR_WARMUP_STEPS = [5, 20]
GRAD_CLIP = [0.5, 2.0]
MIN_LR_FRAC = [0.05, 0.2]
THRESHOLD = [0.45, 0.55]
"""
NIGHT = ["--timeout", "30", "--eval-windows", "2", "--baseline-runs", "2", "--no-pipeline"]


def agent(repo: Path, env: dict, *args: str) -> str:
    """agent.py on the research repo (OPENAI_API_KEY set only with a --base-url); its output."""
    env = agent_env(**env)
    if "--base-url" not in args:
        env.pop("OPENAI_API_KEY")
    done = subprocess.run([sys.executable, str(AGENT), "--repo", str(repo), *args], env=env, capture_output=True,
                          text=True, timeout=3600)
    return done.stdout + done.stderr


def sweep_night(repo: Path, env: dict, experiments: int) -> None:
    program = (repo / "program.md").read_text()
    (repo / "program.md").write_text(re.sub(r"```search-space\n.*?```", f"```search-space\n{DEMO_SPACE}```", program,
                                            flags=re.S))
    g = git.Repo(repo)
    g.index.add(["program.md"])
    g.index.commit("demo search space")
    print(agent(repo, env, "--tag", "sweep", "--max-experiments", str(experiments), *NIGHT)[-2500:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=tempfile.mkdtemp())
    parser.add_argument("--proposer", default="llm", choices=["llm", "sweep", "both"])
    parser.add_argument("--experiments", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    repo, env = tiny_world(out)
    llm = FakeLLM(CHANGES * 3)  # a rejected reply is followed by repair turns
    try:
        tags = []
        if args.proposer in ("llm", "both"):
            print(agent(repo, env, "--tag", "llm", "--base-url", llm.url, "--model", "fake", "--max-experiments",
                        str(args.experiments), *NIGHT, "--repair-turns", "0")[-2500:])
            tags.append("llm")
            git.Repo(repo).git.checkout("main")  # the next night starts from the same commit
        if args.proposer in ("sweep", "both"):
            sweep_night(repo, env, args.experiments)
            tags.append("sweep")
        for tag in tags:
            print(agent(repo, env, "report", "--tag", tag))
        print(agent(repo, env, "plot", *[a for tag in tags for a in ("--tag", tag)])[-500:])
    finally:
        llm.close()
    print(f"ledger: {repo / 'results.tsv'}\nplot:   {repo / 'progress.png'}")


if __name__ == "__main__":
    main()
