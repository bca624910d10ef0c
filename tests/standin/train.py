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
GO_FILE = ""  # when set, the run waits until this file exists: a test's barrier, for runs that must overlap
# ("{n}" in it: the experiment's number, its run folder's name: a barrier per experiment)
# what train.py says of itself in its submission (steps, tokens, peak_mem_gb)
META = {}


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


def hostile() -> dict:
    """What a run reports, at its worst: bytes that are no UTF-8 in its log, odd files in its folder, and a
    submission whose every field but the score is hostile (the stand-in evaluator passes them on as they are)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(b"\xff\xfe\x00\ttab\r\x1c\x85 \xe2\x80\xa8 line\n" * 50 + b"z" * 100_000 + b"\n")
    sys.stdout.buffer.flush()
    folder = Path(os.environ["AR_SUBMISSION"]).parent  # its work/, the one folder it may write
    (folder / "eval.json").write_text('{"ppl": 0.001}')  # a fake result where the driver keeps its own
    (folder / "new\nline\tname").write_bytes(b"\xff\x00")
    os.mkfifo(folder / "fifo")
    os.symlink("loop", folder / "loop")
    odd = ["a\tb\nc", float("nan"), float("inf"), "1e400", [[1.5, 2.5], [3.5, 4.5]], {"x": [1, {"y": None}]},
           "\ud800\x00\u2028", "x" * 5000, 10 ** 400, True]
    meta = {"steps": float("nan"), "tokens": "1e400", "peak_mem_gb": [[1.0, 2.0], [3.0, 4.0]],
            "train_seconds": float("-inf"), "tab\tname\n": odd, **{f"k{i}": v for i, v in enumerate(odd)}}
    return {"meta": meta, "meta_dropped": odd, "bits_per_weight": float("inf"), "ternary": True}


def main() -> None:
    time.sleep(SLEEP_S)
    go = GO_FILE.replace("{n}", REPO.parent.name)  # REPO: runs/<tag>/<n>/tree in a --workers night
    while go and not Path(go).exists():
        time.sleep(0.05)
    misbehave()
    if MODE == "nosubmit":
        return
    payload = hostile() if MODE == "hostile" else {"ternary": MODE != "nonternary", "meta": META}
    prepare.submit({"ppl": float("nan") if MODE == "nan" else PPL * PPL_SCALE, **payload})
    if MODE == "garbage":
        with open(os.environ["AR_SUBMISSION"], "wb") as f:
            f.write(b"\x00not a submission")


if __name__ == "__main__":
    main()
