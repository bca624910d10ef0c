"""Disk use of a night: what each experiment leaves, what a run holds while it runs, and a 50-experiment
night extrapolated.

    python bench/disk_use.py [--experiments N] [--out DIR]

A short real night (the real driver, prepare.py and train.py on the tiny Llama of the tests, a scripted LLM)
is measured: the bytes each experiment's folder keeps once decided (prompt, reply, diff, logs, eval JSON;
no work/, no submission), the kept submission, the peak of work/ during a run (sampled every 0.2 s), what the
runs left in /dev/shm and the growth of .git. Then SmolLM2-135M's submission is written once (round-to-nearest
ternary, as the hostile corpus does) for its size: a night keeps one, the best.
"""
import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from common import header, tiny_world, use_real_assets  # puts the repo and tests on sys.path
from demo_night import CHANGES, NIGHT, agent
from fake_llm import FakeLLM

NIGHT_EXPERIMENTS = 50
SHM = Path("/dev/shm")


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


class PeakWork:
    """Samples the size of every work folder under `runs` while the night runs."""

    def __init__(self, runs: Path):
        self.runs, self.peak, self.running = runs, 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, sum(size(w) for w in self.runs.glob("*/*/work*")))
            except OSError:  # a folder removed while it was measured
                pass
            time.sleep(0.2)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def smollm2_submission_bytes(out: Path) -> int:
    """The size of SmolLM2-135M's submission (int8 codes, per-row scales, the rest in the model's dtype)."""
    import torch
    use_real_assets(str(out / "smollm2-cache"))
    os.environ["AR_SUBMISSION"] = str(out / "smollm2-submission.pt")
    import prepare
    from hostile.template import Ternary  # noqa: E402  (tests/ is on sys.path)
    model = prepare.load_model()
    for name in prepare.targeted_linears(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Ternary(model.get_submodule(name)))
    with torch.no_grad():
        path = prepare.submit(model, {"steps": 0})
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=tempfile.mkdtemp())
    parser.add_argument("--experiments", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=120, help="train.py's limit (a loaded machine needs more than 30 s)")
    args = parser.parse_args()
    out = Path(args.out)
    repo, env = tiny_world(out)
    git_before, shm_before = size(repo / ".git"), set(os.listdir(SHM))
    llm = FakeLLM(CHANGES * 3)
    peak = PeakWork(repo / "runs")
    try:
        agent(repo, env, "--tag", "disk", "--base-url", llm.url, "--model", "fake", "--max-experiments",
              str(args.experiments), *NIGHT, "--repair-turns", "0", "--timeout", str(args.timeout))
    finally:
        llm.close()
        work_peak = peak.stop()
    runs = repo / "runs" / "disk"
    folders = [f for f in runs.iterdir() if f.is_dir()]
    kept = [f / "submission.pt" for f in folders if (f / "submission.pt").exists()]
    per_folder = [size(f) - size(f / "submission.pt") for f in folders]
    left_work = list(runs.glob("*/work*"))
    shm_left = sorted(set(os.listdir(SHM)) - shm_before)
    git_growth = size(repo / ".git") - git_before
    smollm2 = smollm2_submission_bytes(out)
    mean = sum(per_folder) / len(per_folder)
    night = NIGHT_EXPERIMENTS * (mean + git_growth / len(folders)) + smollm2
    print(header("Disk use of a night"))
    print(f"a tiny-model night of {len(folders)} experiment folders (baselines included), "
          f"`--timeout {args.timeout} --eval-windows 2`\n")
    print("| what | bytes |\n| --- | ---: |")
    print(f"| an experiment's folder once decided (logs, prompt, reply, diff, eval JSON), mean | {mean:,.0f} |")
    print(f"| the same, largest | {max(per_folder):,} |")
    print(f"| .git growth per experiment (commits, refs, the driver's state) | {git_growth / len(folders):,.0f} |")
    print(f"| submissions kept at the end (the best only): {len(kept)} of the tiny model | "
          f"{sum(size(k) for k in kept):,} |")
    print(f"| peak of work/ during a run (tiny model: submission, temp files) | {work_peak:,} |")
    print(f"| work/ folders left after the night | {len(left_work)} |")
    print(f"| /dev/shm entries left after the night | {len(shm_left)} |")
    print(f"| SmolLM2-135M's submission (int8 codes, per-row scales, fp parameters) | {smollm2:,} |")
    print(f"| **a {NIGHT_EXPERIMENTS}-experiment SmolLM2 night: {NIGHT_EXPERIMENTS} × (folder + .git) + one "
          f"submission** | **{night:,.0f}** |")


if __name__ == "__main__":
    main()
