"""The driver's guards around an untrusted train.py: sandbox modes, secrets, git hooks, the working
tree restored after a run, one driver per repository, leftovers of a killed driver, SIGTERM/SIGHUP,
and git failures. The real driver against stand-in train.py/prepare.py and a scripted LLM."""
import json
import os
import signal
import subprocess
import sys

import git
import pytest

from driver.common import TEMP_NAME, temp_path
from driver_helpers import (TAG, check_invariants, edit, held_in, ledger, processes_in, release, run_agent,
                            start_agent, state, wait_for_phase, wait_for_train_py)
from test_agent import mode


# ---------------------------------------------------------------- sandbox modes
def test_sandbox_require_refuses_without_landlock(repo, llm):
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--sandbox", "require", AR_TEST_LANDLOCK_ABI="0")
    assert done.returncode == 2 and "--sandbox require" in done.stdout and "Landlock" in done.stdout, done.stdout
    assert not (repo / "results.tsv").exists() and len(llm.requests) == 0  # nothing ran, nothing asked


def test_sandbox_auto_without_landlock_warns_once_and_the_ledger_says_unsandboxed(repo, llm):
    done = run_agent(repo, llm.url, "--max-experiments", "1", AR_TEST_LANDLOCK_ABI="0")
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("UNSANDBOXED") == 1
    rows = ledger(repo)
    assert len(rows) == 2 and rows["reason"].str.startswith("unsandboxed").all(), rows["reason"].tolist()
    assert "unsandboxed: no Landlock" in (repo / "runs" / TAG / "1" / "train.log").read_text()


def test_sandboxed_rows_do_not_say_unsandboxed(repo, llm):
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    assert not ledger(repo)["reason"].fillna("").str.contains("unsandboxed").any()
    assert "sandbox: Landlock ABI" in (repo / "runs" / TAG / "1" / "train.log").read_text()


# ---------------------------------------------------------------- secrets and the repository, unsandboxed
def test_unsandboxed_child_cannot_read_the_drivers_environment(repo, llm):
    """The driver is non-dumpable: /proc/<driver>/environ (with the API key) is closed to train.py even
    without Landlock. (Ancestors above the driver, such as the user's shell, need the sandbox.)"""
    llm.push(mode("steal"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--sandbox", "off")
    assert done.returncode == 0, done.stdout
    stolen = (repo / "runs" / TAG / "1" / "train.log").read_text()
    assert "sk-test-secret-key" not in stolen and "Permission denied" in stolen, stolen[:500]


def test_a_run_that_litters_the_repository_is_undone(repo, llm):
    """Unsandboxed: tracked files back to the commit, the user's uncommitted README.md back to the user's
    version, new files removed, .git/config restored; git hooks never run in the driver."""
    llm.push(mode("litter"), edit("PPL = 20.0", "PPL = 19.0", "a normal change after the littering"))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--sandbox", "off", "--no-pipeline")
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "discard", "keep"], rows
    assert "restored" in rows.iloc[1]["reason"] and "planted.py" in rows.iloc[1]["reason"], rows.iloc[1]["reason"]
    assert not (repo / "planted.py").exists()
    assert (repo / "program.md").read_text() == git.Repo(repo).head.commit.tree["program.md"].data_stream.read().decode()
    assert b"fsmonitor" not in (repo / ".git" / "config").read_bytes()
    # the hook stayed in .git/hooks (the driver does not own it) but never ran: hooks are off for its git
    assert (repo / ".git" / "hooks" / "post-commit").exists()
    assert not (repo / "hook-ran.txt").exists() and not (repo / "fsmonitor-ran.txt").exists()
    assert check_invariants(repo) == []  # includes the user's README.md line and notes.txt


# ---------------------------------------------------------------- processes
def test_a_second_driver_on_the_same_repository_refuses(repo, llm, tmp_path):
    llm.push(edit("PPL = 20.0", "PPL = 21.0", "worse"))
    first = start_agent(repo, llm.url, "--max-experiments", "1", AR_TEST_PAUSE=held_in("training", tmp_path, 0))
    wait_for_phase(repo, "training", experiment=1)
    second = run_agent(repo, llm.url, "--max-experiments", "1", "--tag", "other")
    assert first.poll() is None, "the first driver should still be running"
    assert second.returncode == 2 and "already running" in second.stdout and str(first.pid) in second.stdout
    release(tmp_path, 1)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and ledger(repo)["status"].tolist() == ["baseline", "discard"], out


def test_leftovers_of_a_stale_pid_file_are_only_the_runs_own(repo, llm):
    """A pid file from before a reboot (or any stale one) must not kill a process that is not the run's."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    private = repo / ".git" / "autoresearch" / TAG
    private.mkdir(parents=True)
    (private / "child.pid").write_text(str(bystander.pid))  # the old format: a bare process group id
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "0")
        assert done.returncode == 0, done.stdout
        assert bystander.poll() is None, "the driver killed a process that was not its run"
        (private / "child.pid").write_text(json.dumps({"run_id": "abc", "boot": 0}))  # another boot
        done = run_agent(repo, llm.url, "--max-experiments", "0")
        assert done.returncode == 0 and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_temp_files_of_writes_a_kill_cut_short_are_removed_on_restart(baseline_repo, llm):
    """A driver killed between an atomic write's temp file and its rename (a kill_resume run found one) leaves
    .NAME.tmpPID behind: the next start removes it, in its private folder and in runs/, and nothing else; a run's
    work/ is not searched (the start must not walk a tree deeper than the recursion limit)."""
    repo = baseline_repo
    private = repo / ".git" / "autoresearch" / TAG
    left = [private / ".child.pid.tmp14760", private.parent / ".results.tsv.tmp3", repo / "runs" / TAG / "0" / ".eval.json.tmp77"]
    work = repo / "runs" / TAG / "0" / "work"
    kept = [private / "notes.tmp", repo / "runs" / TAG / "0" / ".hidden.tmpfile"]  # not the driver's temp names
    fd = os.open(repo / "runs" / TAG / "0", os.O_RDONLY)  # a killed run's work/ with a tree deeper than glob walks
    for name in ["work"] + ["d"] * 1100:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    for path in left + kept:
        path.write_text("half")
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "0")
        assert done.returncode == 0, done.stdout[-2000:]
        assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)
        assert "half-written when the driver was stopped" in done.stdout
        assert not work.exists()  # a killed run's work/ is removed at start, however deep
    finally:  # pytest's own cleanup of old temp folders recurses, and a tree this deep crashed a later session's end
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_every_temp_file_the_driver_writes_is_one_its_start_removes(tmp_path):
    for name in ("results.tsv", "child.pid", "submission.pt", "a.b.c"):
        assert TEMP_NAME.fullmatch(temp_path(tmp_path / name).name), name


def test_leftovers_of_a_killed_driver_are_ended_on_restart(repo, llm):
    llm.push(edit("SLEEP_S = 0.0", "SLEEP_S = 30.0", "slow"))
    proc = start_agent(repo, llm.url, "--max-experiments", "1")
    wait_for_phase(repo, "training", experiment=1)
    wait_for_train_py(repo)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert processes_in(repo), "train.py should outlive a SIGKILLed driver"
    llm.push(edit("SLEEP_S = 30.0", "SLEEP_S = 0.0", "unused"))
    done = run_agent(repo, llm.url, "--max-experiments", "0", "--timeout", "2")
    assert "left running by an earlier driver" in done.stdout, done.stdout
    assert processes_in(repo) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_stops_now_and_takes_the_run_along(repo, llm, sig):
    llm.push(edit("SLEEP_S = 0.0", "SLEEP_S = 30.0", "slow"))
    proc = start_agent(repo, llm.url, "--max-experiments", "1")
    wait_for_phase(repo, "training", experiment=1)
    wait_for_train_py(repo)
    assert processes_in(repo)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopping now" in out, out
    assert processes_in(repo) == [] and state(repo)["phase"] == "training"
    llm.push(edit("SLEEP_S = 30.0", "SLEEP_S = 0.0", "unused"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--timeout", "2")
    assert "resuming experiment 1" in done.stdout, done.stdout


# ---------------------------------------------------------------- git failures
def test_a_stale_index_lock_stops_cleanly_with_train_py_at_head(baseline_repo, llm):
    repo = baseline_repo
    (repo / ".git" / "index.lock").write_text("")
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 2 and "index.lock" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert not git.Repo(repo).is_dirty(path="train.py")
    (repo / ".git" / "index.lock").unlink()
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["description"].tolist() == ["baseline: unmodified train.py", "lower"]
    assert check_invariants(repo) == []


def test_git_without_an_identity_gets_the_fallback(repo, llm, tmp_path):
    """GitPython's config reader and git disagree when HOME/GIT_CONFIG_GLOBAL differ: git's view decides."""
    g = git.Repo(repo)
    with g.config_writer() as cfg:
        cfg.remove_section("user")
    home = tmp_path / "empty-home"
    home.mkdir()
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", HOME=str(home), GIT_CONFIG_GLOBAL=str(home / "none"),
                     GIT_CONFIG_NOSYSTEM="1", EMAIL="", GIT_AUTHOR_NAME="", GIT_COMMITTER_NAME="")
    assert done.returncode == 0, done.stdout
    assert g.head.commit.author.name == "autoresearch" and ledger(repo)["status"].tolist() == ["baseline", "keep"]


def test_a_manual_run_during_the_night_is_not_blamed_on_the_experiment(baseline_repo, llm, tmp_path):
    """A `python train.py` by hand appends a `manual` row while an experiment trains: the row stays, and
    the experiment is not reported as having changed results.tsv."""
    import prepare
    repo = baseline_repo
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower"))
    proc = start_agent(repo, llm.url, "--max-experiments", "1", AR_TEST_PAUSE=held_in("training", tmp_path))
    wait_for_phase(repo, "training", experiment=1)
    prepare.append_ledger_rows([{"timestamp": "2026-11-27T00:00:00+00:00", "branch": "main", "status": "manual",
                                 "val_ppl": 21.0, "description": "manual run"}], repo / "results.tsv")
    release(tmp_path, 1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "manual", "keep"], rows
    assert "changed by the experiment" not in rows.iloc[-1]["reason"] and "manual" in out
