"""A short real night: the real driver, prepare.py and train.py on a tiny Llama built here, a scripted
LLM proposing real train.py changes; then `agent.py report` and `agent.py plot`.

    python bench/demo_night.py [--out DIR]
"""
import argparse
import tempfile
from pathlib import Path

from common import ROOT  # noqa: F401  (puts the repo and tests on sys.path)
from conftest import build_tiny_model, data_sha256, write_text
from driver_helpers import make_research_repo, run_agent
from fake_llm import FakeLLM


def edit(search: str, replace: str, description: str) -> str:
    return f"DESCRIPTION: {description}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


CHANGES = [edit('LR = 3e-4', "LR = 1e-3", "raise LR to 1e-3"),
           edit('GROUP_SIZE = "row"              # 32 | 64 | 128 | 256 | "row" (per output row) | "tensor"', "GROUP_SIZE = 64", "group size 64"),
           edit('LAMBDA_WARMUP_STEPS = 50        # steps from λ=0 to λ=1 (a 135M model barely needs warmup)', "LAMBDA_WARMUP_STEPS = 5", "shorter lambda warmup (5 steps)"),
           edit('KD_WEIGHT = 1.0                 # logits distillation from the frozen full-precision teacher', "KD_WEIGHT = 0.0", "no logits distillation"),
           edit('GRAD_CLIP = 1.0', "GRAD_CLIP = 1.0 +", "a syntax error the driver must reject")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=tempfile.mkdtemp())
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("wiki.train.raw", 150, 1), ("wiki.valid.raw", 60, 2), ("wiki.test.raw", 60, 3)):
        write_text(data / name, n, seed)
    build_tiny_model(out / "model", data / "wiki.train.raw")
    repo = make_research_repo(out / "research", real=True)
    env = {"AR_MODEL": str(out / "model"), "AR_DATA": str(data), "AR_DATA_SHA256": data_sha256(data),
           "AR_CACHE": str(out / "cache")}
    llm = FakeLLM(CHANGES * 3)  # a rejected reply is followed by repair turns
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "5", "--timeout", "30", "--eval-windows", "2",
                         "--baseline-runs", "2", "--repair-turns", "0", "--no-pipeline", timeout=1800, **env)
        print(done.stdout[-2500:])
        print(run_agent(repo, llm.url, "report", **env).stdout)
        run_agent(repo, llm.url, "plot", **env)
    finally:
        llm.close()
    print(f"ledger: {repo / 'results.tsv'}\nplot:   {repo / 'progress.png'}")


if __name__ == "__main__":
    main()
