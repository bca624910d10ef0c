"""A simulated night, scaled down 60×: a scripted LLM answering in 20–90 s (0.33–1.5 s here), a
train.py that trains for 300 s (5 s here) and an evaluator that scores for --eval-s seconds, through
the real driver, with and without pipelining.

    python bench/simulated_night.py [--experiments 20] [--scale 60] [--eval-s 0]
    python bench/simulated_night.py --workers [1 2 4] [--per-worker 10] [--scale 60]

With --workers (issue 13) the nights compare worker counts instead: 1 is the one-GPU path (no Ray,
pipelined, the default), N > 1 is `agent.py --workers N` (driver/pool.py: one driver, N Ray tasks on a local
Ray instance, one logical GPU each). Each night runs --per-worker × N experiments, so every night lasts
about as long and the start-up and the drain at the end weigh the same. Reported per worker count:
experiments per hour (scaled back to real time), the ratio to 1 worker measured in the same run, the
training share of each worker, and how the stale-parent wins ended.

Two shares of the wall-clock are reported, both from the driver's own timing of each process in the
ledger: in train.py alone (train_s), and in train.py plus the evaluator (train_s + eval_s: the time
the accelerator is busy with the experiment).
"""
import argparse
import random
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

import git

from common import header
from driver_helpers import ledger, make_research_repo, run_agent
from fake_llm import FakeLLM


def night(pipeline: bool, experiments: int, scale: float, seed: int, compatible: bool, eval_s: float,
          workers: int = 1, raw: bool = False, factors: tuple = (0.97, 1.03)) -> dict:
    """One measured night after a baseline night (one-GPU path). raw: the measured night's ledger rows, the
    driver's log and the LLM's request count instead of the pipelining summary."""
    rng = random.Random(seed)
    repo = make_research_repo(Path(tempfile.mkdtemp()) / "research")
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", f"SLEEP_S = {300 / scale}"))
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("a 300 s training run, scaled")
    llm = FakeLLM(default_factor=lambda: rng.choice(factors), latency=0, alternate=compatible)
    llm.latency_fn = lambda: rng.uniform(20, 90) / scale
    env = {"STANDIN_EVAL_SLEEP": str(eval_s / scale)}  # the stand-in evaluator's scoring time, scaled
    # limits that a scaled run on shared cores cannot hit by accident (driver_helpers passes 10 s and 5 s)
    limits = ["--timeout", str(max(10, round(3 * 300 / scale))), "--llm-timeout", str(max(5, round(3 * 90 / scale)))]
    try:
        baseline = run_agent(repo, llm.url, "--max-experiments", "0", *limits, **env)  # not part of the measured night
        assert baseline.returncode == 0, baseline.stdout
        start = time.perf_counter()
        done = run_agent(repo, llm.url, "--max-experiments", str(experiments), *limits,
                         *([] if pipeline else ["--no-pipeline"]), *(["--workers", str(workers)] if workers > 1 else []),
                         timeout=3600, **env)
        wall = time.perf_counter() - start
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout + done.stderr
    if raw:
        (repo.parent / "driver.log").write_text(done.stdout)  # for a look at where the time went
        return {"repo": repo, "wall": wall, "rows": ledger(repo).iloc[1:], "log": done.stdout, "requests": len(llm.requests)}
    rows = ledger(repo).iloc[1:]
    stamps = rows["timestamp"].map(lambda t: datetime.fromisoformat(t).timestamp())  # each written as its experiment ends
    steady = rows["train_s"].iloc[1:].sum() / (stamps.iloc[-1] - stamps.iloc[0])
    return {"wall": wall, "train": rows["train_s"].sum(), "eval": rows["eval_s"].fillna(0).sum(), "n": len(rows),
            "steady": steady}


# gains of two sizes: with one size a change measured on a stale parent can only tie the best (score = PPL ×
# PPL_SCALE, and the best already holds one such step), never beat it, and no stale-parent win could happen
FACTORS = (0.95, 0.98, 1.02, 1.05)
RAN = ["keep", "discard", "crash", "timeout"]  # a training run happened (invalid: the proposal was never run)


def worker_of(reason: str) -> str:
    match = re.search(r"worker (\S+); ", reason or "")
    return match.group(1) if match else "the GPU"


def stale_wins(rows, log_text: str) -> dict:
    """Each stale-parent win (a discard re-applied as experiment M) and how M ended."""
    ends = {"re-applied and kept": 0, "re-applied and discarded": 0, "conflict → re-proposed": 0,
            "already in the best": 0, "not run": 0}
    detail = []
    by_n = {int(r["experiment"]): r for _, r in rows.iterrows() if r["experiment"] == r["experiment"]}
    for _, row in rows[rows["reason"].fillna("").str.contains("stale parent:", regex=False)].iterrows():
        n = int(row["experiment"])
        m = int(re.search(r"re-applied on it as experiment (\d+)", row["reason"]).group(1))
        reproposed = f"experiment {n}: its change conflicts with the best" in log_text
        mine = by_n.get(m)
        if reproposed:
            end = "conflict → re-proposed"
            detail.append(f"{n}→{m} re-proposed: {mine['status'] if mine is not None else 'no row'}")
        elif f"experiment {n}: its change is already in the best" in log_text:
            end = "already in the best"
        elif mine is None or mine["status"] not in RAN:
            end = "not run"
        else:
            end = f"re-applied and {'kept' if mine['status'] == 'keep' else 'discarded'}"
        ends[end] += 1
    return {"ends": ends, "detail": detail}


def worker_night(workers: int, experiments: int, scale: float, seed: int) -> dict:
    r = night(True, experiments, scale, seed, compatible=True, eval_s=0.0, workers=workers, raw=True, factors=FACTORS)
    rows, wall = r["rows"], r["wall"]
    assert not (rows["status"] == "baseline").any(), "the measured night re-ran the baseline"
    confirmation = rows["description"].fillna("").str.startswith("confirmation run: ")
    ran = rows[rows["status"].isin(RAN) & ~confirmation]
    stamps = rows["timestamp"].map(lambda t: datetime.fromisoformat(t).timestamp())
    span = stamps.max() - stamps.min()  # between the first and the last row: 1 s timestamps
    steady = (len(ran) - 1) / span if span else float("nan")  # experiments after the first one, per second
    per_worker = rows.assign(worker=rows["reason"].map(worker_of)).groupby("worker")["train_s"].sum()
    per_worker = per_worker[per_worker.index != "the GPU"] if workers > 1 else per_worker
    shares = per_worker / wall
    return {"workers": workers, "wall": wall, "ran": len(ran), "invalid": int((rows["status"] == "invalid").sum()),
            "confirmations": int(confirmation.sum()), "kept": int((rows["status"] == "keep").sum()),
            "rate": len(ran) / wall, "steady": steady, "shares": shares, "stale": stale_wins(rows, r["log"]),
            "requests": r["requests"], "repo": r["repo"]}


def compare_workers(counts: list[int], per_worker: int, scale: float, seed: int) -> None:
    results = [worker_night(n, per_worker * n, scale, seed) for n in counts]
    base = next((r for r in results if r["workers"] == 1), None)
    print(header("A simulated night with N workers: experiments per hour"))
    print(f"{per_worker} experiments per worker (N × {per_worker} a night), LLM latency uniform 20–90 s (scripted "
          f"FakeLLM, one thread per proposal), 300 s training runs, the stand-in evaluator, all scaled down {scale:g}×; "
          f"proposals alternate between two knobs that git merges cleanly, each scaling the score by one of {FACTORS} (uniform choice); "
          "1 worker = the one-GPU path (no Ray, pipelined), N > 1 = `--workers N` (a local Ray instance, N logical "
          "GPUs); driver and Ray start-up included\n")
    print("| workers | experiments run | invalid | wall-clock s | experiments/hour, real time | ratio to 1 worker "
          "| steady state, real time | steady ratio | training share per worker, mean | min | stale-parent wins: "
          "re-applied and kept / re-applied and discarded / conflict → re-proposed / already in the best / not run |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        hourly, steady = r["rate"] * 3600 / scale, r["steady"] * 3600 / scale
        ratio = f"{r['rate'] / base['rate']:.2f}" if base else "–"
        steady_ratio = f"{r['steady'] / base['steady']:.2f}" if base else "–"
        e = r["stale"]["ends"]
        wins = sum(e.values())
        print(f"| {r['workers']} | {r['ran']} | {r['invalid']} | {r['wall']:.1f} | {hourly:.1f} | {ratio} | {steady:.1f} "
              f"| {steady_ratio} | {r['shares'].mean():.2f} | {r['shares'].min():.2f} | {wins}: "
              + " / ".join(str(v) for v in e.values()) + " |")
    print("\nexperiments run: ledger rows of the measured night that trained (keep, discard, crash, timeout; the "
          "baseline night and `invalid` rows excluded, re-applied stale wins included as experiments of their own). "
          f"experiments/hour, real time = experiments run / wall-clock s × 3600 / {scale:g} (the scale), i.e. as if "
          f"every second of the simulated night were {scale:g} s; fixed costs that do not scale (driver and Ray "
          "start-up, git and Ray bookkeeping per experiment) are inflated by the same factor, so this is pessimistic "
          "for N > 1. steady state: (experiments run − 1) over the time between the first and the last ledger row "
          "(1 s timestamps), start-up excluded. training share per worker: that worker's train_s (from `worker <name>; ` "
          "in each row's reason) / the night's wall-clock.")
    for r in results:
        extra = f"; re-proposed: {', '.join(r['stale']['detail'])}" if r["stale"]["detail"] else ""
        print(f"- {r['workers']} worker(s): {r['kept']} kept, {r['confirmations']} confirmation runs, "
              f"{r['requests']} LLM requests, per-worker shares "
              + ", ".join(f"{w} {v:.2f}" for w, v in r["shares"].items()) + extra
              + f"; driver log {r['repo'].parent / 'driver.log'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="*", metavar="N",
                        help="compare these worker counts (no values: 1 2 4) instead of the pipelining modes")
    parser.add_argument("--per-worker", type=int, default=10, help="with --workers: experiments per worker and night")
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--scale", type=float, default=60)
    parser.add_argument("--eval-s", type=float, default=0.0,
                        help="seconds one scoring run takes on the real machine (scaled like the rest); 0: the "
                             "stand-in evaluator's own time, a bare Python process")
    args = parser.parse_args()
    if args.workers is not None:
        compare_workers(args.workers or [1, 2, 4], args.per_worker, args.scale, seed=0)
        return
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
