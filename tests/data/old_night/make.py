"""Writes the old-night fixture test_old_night.py resumes: a short night of the stand-in world (the helpers' research
repo, tests/standin/train.py and prepare.py, tests/fake_llm.py), written by the driver of the commit named in
manifest.json ("written_by"). The first fixture was written by agent.py as of commit e04ccd7 (the single-file
driver, before its move into driver/): it must keep resuming under every later driver, so do NOT regenerate it to make
a failing test pass. Regenerate only on purpose (a deliberate change of the on-disk format, said in the commit):

    . /work/main/.venv/bin/activate && python tests/data/old_night/make.py

Two cases, each a folder here:
  stopped/  the night after `--max-experiments 2` ended cleanly (baseline 0, keep 1, discard 2): state phase `done`.
  killed/   then a third experiment (lower PPL, and SLEEP_S = 3 so it is still training) SIGKILLed while its train.py
            ran: state phase `training`, committed, never scored; child.pid, tree-before-run.json and its run folder
            as the dead driver left them (its orphaned train.py is ended here, as a reboot would).
Each holds repo.bundle (every ref: the branch, main, refs/autoresearch/<tag>/discarded/*), files.tar.gz (the working
tree files git does not hold: results.tsv, runs/, the user's uncommitted README.md and untracked notes.txt, and all
of .git/autoresearch/: state.json, the ledger's copy, the lock, the snapshots) and, in manifest.json, HEAD, the
checked-out branch and the command line the night ran with (the same one must resume it: the protocol is in it).
"""
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
sys.path.insert(0, str(TESTS))

from driver_helpers import (TAG, edit, kill_agent, make_research_repo, processes_in, run_agent,  # noqa: E402
                            start_agent, wait_for_phase, wait_for_train_py)
from fake_llm import FakeLLM  # noqa: E402

NIGHT_ARGS = ["--no-pipeline"]  # besides agent_cmd's own (--tag t --timeout 10 --baseline-runs 1 ...)
IN_FLIGHT_SLEEP_S = 3.0         # the killed experiment's run: long enough to kill it mid-run, short to redo
USER_FILES = ["README.md", "notes.txt", "results.tsv", "runs"]


def capture(repo: Path, case: str) -> dict:
    """repo.bundle + files.tar.gz into HERE/case; returns what a restore needs to know."""
    out = HERE / case
    out.mkdir(exist_ok=True)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "bundle", "create", str(out / "repo.bundle"), "--all"], check=True, capture_output=True)
    with tarfile.open(out / "files.tar.gz", "w:gz") as tar:
        for name in USER_FILES:
            tar.add(repo / name, arcname=name)
        tar.add(repo / ".git" / "autoresearch", arcname=".git/autoresearch")
    refs = subprocess.run([*git, "for-each-ref", "--format=%(refname) %(objectname)"], check=True,
                          capture_output=True, text=True).stdout.split("\n")
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    branch = subprocess.run([*git, "symbolic-ref", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return {"head": head, "branch": branch, "refs": dict(line.split() for line in refs if line)}


def end_orphans(repo: Path) -> None:
    """The killed driver's train.py (its own process group) outlives it: end it, as a reboot would."""
    procs = processes_in(repo)
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def main() -> None:
    code = subprocess.run(["git", "-C", str(TESTS.parent), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(TESTS.parent), "status", "--porcelain", "agent.py", "pool.py",
                            "prepare.py", "sandbox.py", "worker.py"], capture_output=True, text=True).stdout.strip()
    manifest = {"written_by": code + (" (with uncommitted changes)" if dirty else ""), "tag": TAG,
                "args": NIGHT_ARGS, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_research_repo(Path(tmp) / "research")
        llm = FakeLLM()
        try:
            llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"), edit("PPL = 18.0", "PPL = 19.0", "higher"))
            done = run_agent(repo, llm.url, "--max-experiments", "2", *NIGHT_ARGS)
            assert done.returncode == 0, done.stdout[-3000:]
            manifest["cases"]["stopped"] = capture(repo, "stopped")

            llm.push(f"DESCRIPTION: lower again, slowly\n<<<<<<< SEARCH\nPPL = 18.0\n=======\nPPL = 17.0\n>>>>>>> REPLACE\n"
                     f"<<<<<<< SEARCH\nSLEEP_S = 0.0\n=======\nSLEEP_S = {IN_FLIGHT_SLEEP_S}\n>>>>>>> REPLACE\n")
            proc = start_agent(repo, llm.url, "--max-experiments", "1", *NIGHT_ARGS)
            try:
                wait_for_phase(repo, "training", experiment=3)
                wait_for_train_py(repo)
            finally:
                kill_agent(proc)
            end_orphans(repo)
            st = json.loads((repo / ".git" / "autoresearch" / TAG / "state.json").read_text())
            assert st["phase"] == "training" and st["experiment"] == 3, st
            manifest["cases"]["killed"] = capture(repo, "killed")
        finally:
            llm.close()
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {', '.join(manifest['cases'])} into {HERE} ({size // 1024} KB)")


if __name__ == "__main__":
    main()
