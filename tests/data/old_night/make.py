"""Writes the old-night fixture test_old_night.py resumes: a short night of the stand-in world (the helpers' research
repo, tests/standin/train.py and prepare.py, tests/fake_llm.py), written by the driver of the commit named in
manifest.json ("written_by": the project's HEAD, and the last commit that changed the driver's files). The first
fixture was written by the driver of commit e04ccd7 (the single-file agent.py, before its move into driver/): it must
keep resuming under every later driver, so do NOT regenerate it to make a failing test pass. Regenerate only on purpose (a deliberate change of the on-disk format, said in the commit):

    . /work/main/.venv/bin/activate && python tests/data/old_night/make.py

Three cases, each a folder here:
  stopped/  the night after `--max-experiments 2` ended cleanly (baseline 0, keep 1, discard 2): state phase `done`.
  killed/   then a third experiment (lower PPL, and SLEEP_S = 3 so it is still training) SIGKILLed while its train.py
            ran: state phase `training`, committed, never scored; child.pid, tree-before-run.json and its run folder
            as the dead driver left them (its orphaned train.py is ended here, as a reboot would).
  pool_killed/  another repository: `--workers 2` (a local Ray instance) after its baseline, its process group
            SIGKILLed with experiments 1 and 2 training: inflight/<n>.json and refs/autoresearch/<tag>/inflight/<n>
            (their worktrees runs/<tag>/<n>/tree are left out: git's records of them name absolute paths, and a
            resumed experiment checks its tree out again).
Each holds repo.bundle (every ref: the branch, main, refs/autoresearch/<tag>/discarded/*), files.tar.gz (the working
tree files git does not hold: results.tsv, runs/, the user's uncommitted README.md and untracked notes.txt, and all
of .git/autoresearch/: state.json, the ledger's copy, the lock, the snapshots) and, in manifest.json, HEAD, the
checked-out branch and the arguments the night ran with besides driver_helpers.agent_cmd's (the same ones must
resume it: the protocol is in them). stopped/ and pool_killed/ also keep what `agent.py status` and `agent.py report`
printed of them (status.txt, report.txt): the same ledger must read the same.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
sys.path.insert(0, str(TESTS))

from driver_helpers import (AGENT, TAG, agent_env, edit, kill_agent, make_research_repo, processes_in, run_agent,  # noqa: E402
                            start_agent, wait_for_phase, wait_for_train_py)
from fake_llm import FakeLLM  # noqa: E402

NIGHT_ARGS = ["--no-pipeline"]  # besides agent_cmd's own (--tag t --timeout 10 --baseline-runs 1 ...)
POOL_ARGS = ["--workers", "2", "--timeout", "20"]
POOL_SLEEP_S = 6.0              # each pool run: both still training when the driver is killed
IN_FLIGHT_SLEEP_S = 3.0         # the killed experiment's run: long enough to kill it mid-run, short to redo
USER_FILES = ["README.md", "notes.txt", "results.tsv", "runs"]
CLI_READERS = ["status", "report"]  # their output of the stopped and the pool night is kept, to be printed the same
DRIVER_FILES = ["agent.py", "driver", "pool.py", "worker.py", "prepare.py", "sandbox.py", "train.py", "program.md"]


def outside_worktrees(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """The pool's runs/<tag>/<n>/tree worktrees are left out (see pool_killed above)."""
    return None if info.name.split("/")[3:4] == ["tree"] else info


def capture(repo: Path, case: str, args: list[str]) -> dict:
    """repo.bundle + files.tar.gz into HERE/case; returns what a restore needs to know."""
    out = HERE / case
    out.mkdir(exist_ok=True)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "bundle", "create", str(out / "repo.bundle"), "--all"], check=True, capture_output=True)
    with tarfile.open(out / "files.tar.gz", "w:gz") as tar:
        for name in USER_FILES:
            tar.add(repo / name, arcname=name, filter=outside_worktrees)
        tar.add(repo / ".git" / "autoresearch", arcname=".git/autoresearch")
    refs = subprocess.run([*git, "for-each-ref", "--format=%(refname) %(objectname)"], check=True,
                          capture_output=True, text=True).stdout.split("\n")
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    branch = subprocess.run([*git, "symbolic-ref", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    return {"head": head, "branch": branch, "refs": dict(line.split() for line in refs if line), "args": args}


def read_back(repo: Path, case: str) -> None:
    """What `agent.py status` and `agent.py report` print of the night, into HERE/case/<command>.txt (run on a copy:
    the report writes runs/<tag>/report.md)."""
    copy = repo.parent / f"read-back-{case}"
    shutil.copytree(repo, copy, symlinks=True)
    for command in CLI_READERS:
        done = subprocess.run([sys.executable, str(AGENT), command, "--repo", str(copy), "--tag", TAG], env=agent_env(),
                              capture_output=True, text=True, timeout=120, check=True)
        (HERE / case / f"{command}.txt").write_text(done.stdout)
    shutil.rmtree(copy)


def end_orphans(repo: Path) -> None:
    """The killed driver's train.py (its own process group) outlives it: end it, as a reboot would."""
    procs = processes_in(repo)
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


def inflight(repo: Path) -> list[str]:
    folder = repo / ".git" / "autoresearch" / TAG / "inflight"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []


def kill_pool_night(repo: Path, llm: FakeLLM) -> None:
    """`--workers 2` on a local Ray instance, its process group SIGKILLed while two experiments train (as
    test_pool_kill does); whatever of its session outlives it is ended before the capture."""
    path = repo / "train.py"
    path.write_text(path.read_text().replace("SLEEP_S = 0.0", f"SLEEP_S = {POOL_SLEEP_S}"))
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", f"stand-in train.py sleeps {POOL_SLEEP_S} s"], check=True)
    scale = next(line for line in path.read_text().splitlines() if line.startswith("PPL_SCALE = 1.0"))
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"), edit(scale, scale.replace("1.0", "0.95", 1), "scale"))
    proc = start_agent(repo, llm.url, "--max-experiments", "2", *POOL_ARGS)
    try:
        end = time.time() + 120
        while not (len(inflight(repo)) >= 2 and sum("/tree/train.py" in " ".join(p.cmdline())
                                                   for p in psutil.process_iter() if alive_in(p, repo)) >= 2):
            assert time.time() < end and proc.poll() is None, "the pool night never had two experiments training"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    leftovers = [p for p in psutil.process_iter() if session_of(p) == proc.pid]
    for p in leftovers:
        p.kill()
    psutil.wait_procs(leftovers, timeout=10)


def alive_in(p: psutil.Process, repo: Path) -> bool:
    try:
        return str(repo) in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_of(p: psutil.Process) -> int | None:
    try:
        return os.getsid(p.pid)
    except OSError:
        return None


def main() -> None:
    project = ["git", "-C", str(TESTS.parent)]
    head = subprocess.run([*project, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    driver = subprocess.run([*project, "log", "-1", "--format=%H", "--", *DRIVER_FILES], check=True,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*project, "status", "--porcelain", "--", *DRIVER_FILES], check=True, capture_output=True,
                           text=True).stdout.strip()
    manifest = {"written_by": {"head": head, "driver_last_changed_in": driver,
                               "uncommitted_driver_changes": bool(dirty)}, "tag": TAG, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_research_repo(Path(tmp) / "research")
        llm = FakeLLM()
        try:
            llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"), edit("PPL = 18.0", "PPL = 19.0", "higher"))
            done = run_agent(repo, llm.url, "--max-experiments", "2", *NIGHT_ARGS)
            assert done.returncode == 0, done.stdout[-3000:]
            manifest["cases"]["stopped"] = capture(repo, "stopped", NIGHT_ARGS)
            read_back(repo, "stopped")

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
            manifest["cases"]["killed"] = capture(repo, "killed", NIGHT_ARGS)

            pool_repo = make_research_repo(Path(tmp) / "pool" / "research")
            kill_pool_night(pool_repo, llm)
            manifest["cases"]["pool_killed"] = capture(pool_repo, "pool_killed", POOL_ARGS)
            read_back(pool_repo, "pool_killed")
        finally:
            llm.close()
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {', '.join(manifest['cases'])} into {HERE} ({size // 1024} KB)")


if __name__ == "__main__":
    main()
