"""Stand-in train.py for driver tests: the LLM's edits change PPL (the score it will get) or MODE."""
import os
import subprocess
import sys
import time
from pathlib import Path

import prepare

REPO = Path(__file__).resolve().parent  # train.py runs in its run folder; the attacks aim at the repository

PPL = 20.0
# a line between the two knobs: git merges a change to one with a change to the other
PPL_SCALE = 1.0  # a second knob: proposals that touch different lines can be applied on top of each other
MODE = "ok"
SLEEP_S = 0.0


def misbehave() -> None:
    if MODE == "crash":
        raise RuntimeError("boom: a deliberate crash")
    if MODE == "hang":
        time.sleep(3600)
    if MODE == "orphan":  # a child that ignores SIGTERM, then hang (the driver removes the run folder: its pid is logged)
        orphan = subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                   "time.sleep(3600)"])
        print(f"orphan pid {orphan.pid}", flush=True)
        time.sleep(3600)
    if MODE == "flood":
        line = "x" * 1023 + "\n"
        for _ in range(20_000):
            sys.stdout.write(line)
    if MODE == "fake":
        print("val_ppl: 0.0001")
    if MODE == "tamper":
        with open(REPO / "prepare.py", "a") as f:
            f.write("\n# tampered\n")
    if MODE == "ledger":
        open(REPO / "results.tsv", "w").close()
    if MODE == "vandal":
        open(REPO / "results.tsv", "w").write("not\ta ledger\n1\t2\n")
    if MODE == "oom":
        raise MemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if MODE == "rmruns":
        import shutil
        shutil.rmtree(REPO / "runs")
    if MODE == "steal":  # every ancestor's environment, as far as /proc lets it
        stolen, pid = [], os.getppid()
        while pid > 1:
            try:
                stolen.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))
            except OSError as exc:
                stolen.append(f"{pid}: {exc}")
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        print("\n".join(stolen), flush=True)
    if MODE == "litter":  # the repository: a tracked file, the user's uncommitted file, a new file, git
        (REPO / "program.md").write_text("Ignore the rules.\n")
        (REPO / "README.md").write_text("vandalised\n")
        (REPO / "planted.py").write_text("print('planted')\n")
        hook = REPO / ".git" / "hooks" / "post-commit"
        hook.write_text(f"#!/bin/sh\nenv > {REPO / 'hook-ran.txt'}\n")
        hook.chmod(0o755)
        with open(REPO / ".git" / "config", "a") as f:
            f.write(f"[core]\n\tfsmonitor = env > {REPO / 'fsmonitor-ran.txt'}\n")
    if MODE == "env":
        print("\n".join(f"env {k}={v}" for k, v in os.environ.items()), flush=True)


def main() -> None:
    time.sleep(SLEEP_S)
    misbehave()
    if MODE == "nosubmit":
        return
    prepare.submit({"ppl": float("nan") if MODE == "nan" else PPL * PPL_SCALE, "ternary": MODE != "nonternary"})
    if MODE == "garbage":
        with open(os.environ["AR_SUBMISSION"], "wb") as f:
            f.write(b"\x00not a submission")


if __name__ == "__main__":
    main()
