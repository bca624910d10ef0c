"""A simulated night, scaled down 60×: a scripted LLM answering in 20–90 s (0.33–1.5 s here), a
train.py that trains for 300 s (5 s here) and an evaluator that scores for --eval-s seconds, through
the real driver, with and without pipelining.

    python bench/simulated_night.py [--experiments 20] [--scale 60] [--eval-s 0]

Two shares of the wall-clock are reported, both from the driver's own timing of each process in the
ledger: in train.py alone (train_s), and in train.py plus the evaluator (train_s + eval_s: the time
the accelerator is busy with the experiment).
"""
import argparse
import random
import tempfile
import time
from datetime import datetime
from pathlib import Path

import git

from common import header
from driver_helpers import ledger, make_research_repo, run_agent
from fake_llm import FakeLLM


def night(pipeline: bool, experiments: int, scale: float, seed: int, compatible: bool, eval_s: float) -> dict:
    rng = random.Random(seed)
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research")
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", f"SLEEP_S = {300 / scale}"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("a 300 s training run, scaled")
    llm = FakeLLM(default_factor=lambda: rng.choice([0.97, 1.03]), latency=0, alternate=compatible)
    llm.latency_fn = lambda: rng.uniform(20, 90) / scale
    env = {"STANDIN_EVAL_SLEEP": str(eval_s / scale)}  # the stand-in evaluator's scoring time, scaled
    try:
        run_agent(repo, llm.url, "--max-experiments", "0", **env)  # the baseline, not part of the measured night
        start = time.perf_counter()
        done = run_agent(repo, llm.url, "--max-experiments", str(experiments), *([] if pipeline else ["--no-pipeline"]),
                         timeout=3600, **env)
        wall = time.perf_counter() - start
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo).iloc[1:]
    stamps = rows["timestamp"].map(lambda t: datetime.fromisoformat(t).timestamp())  # each written as its experiment ends
    steady = rows["train_s"].iloc[1:].sum() / (stamps.iloc[-1] - stamps.iloc[0])
    return {"wall": wall, "train": rows["train_s"].sum(), "eval": rows["eval_s"].fillna(0).sum(), "n": len(rows),
            "steady": steady}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--scale", type=float, default=60)
    parser.add_argument("--eval-s", type=float, default=0.0,
                        help="seconds one scoring run takes on the real machine (scaled like the rest); 0: the "
                             "stand-in evaluator's own time, a bare Python process")
    args = parser.parse_args()
    runs = {(False, True): "--no-pipeline", (True, True): "pipelined (default), proposals touch different lines",
            (True, False): "pipelined, every proposal edits the same line (a kept change forces a re-ask)"}
    results = {key: night(key[0], args.experiments, args.scale, seed=0, compatible=key[1], eval_s=args.eval_s)
               for key in runs}
    print(header("A simulated night: share of wall-clock spent training"))
    print(f"{args.experiments} experiments each, LLM latency uniform 20–90 s, 300 s training runs and "
          f"{args.eval_s:g} s scoring runs" + (" (0: the stand-in evaluator's own start-up only)" if not args.eval_s else "")
          + f", all scaled down {args.scale:g}×; driver start-up and exit included\n")
    print("| mode | wall-clock s | in train.py s | in evaluator s | training share, all | ratio | "
          "training share, steady state | training + scoring share, all |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = results[(False, True)]["train"] / results[(False, True)]["wall"]
    for key, r in results.items():
        share = r["train"] / r["wall"]
        print(f"| {runs[key]} | {r['wall']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | {share:.2f} | {share / base:.2f} "
              f"| {r['steady']:.2f} | {(r['train'] + r['eval']) / r['wall']:.2f} |")
    print("\n'training share' is the time inside train.py alone (the ledger's train_s, process start-up included); "
          "'training + scoring' adds the evaluator's real time (eval_s). 'all' counts the driver's start-up (about "
          "2 s, unscaled: 0.1 % of a real night); 'steady state' is train.py's time over the wall-clock between the "
          "first and the last experiment's end (1 s timestamps).")


if __name__ == "__main__":
    main()
