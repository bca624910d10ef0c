"""Git and the working tree: the night's branch, an experiment's commit, a discard (reset, the commit kept
under a ref), and the tree restored after a run or a killed driver."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import git

from driver.common import FatalError, atomic_write, log, one_line, remove_temp_files, remove_tree, sha256_file
from driver.records import ExperimentState
from driver.ledger import reconcile_ledger
from driver.runner import kill_leftovers
from driver.scoring import remove_shm_created
from driver.session import Session, take_lock

def tree_changes(session: Session) -> dict[str, bytes | None]:
    """Tracked files that differ from HEAD and untracked files outside runs/, with their content
    (None: deleted or too large to keep)."""
    out = session.repo.git.status("--porcelain=v1", "-z", "--untracked-files=all", "--no-renames")
    changes = {}
    for entry in filter(None, out.split("\0")):
        path = entry[3:]
        if path.startswith("runs/"):
            continue
        full = session.root / path
        changes[path] = full.read_bytes() if full.is_file() and full.stat().st_size < 50_000_000 else None
    return changes


def save_tree_snapshot(session: Session, before: dict[str, bytes | None]) -> None:
    """What tree_changes() found before a run, on disk: a driver killed during the run must not take the
    run's changes for the user's own at its restart."""
    atomic_write(session.tree_snapshot, json.dumps(
        {path: None if data is None else base64.b64encode(data).decode() for path, data in before.items()}))


def restore_after_a_kill(session: Session) -> None:
    """At start: a run that was going on when the driver died is undone against the snapshot taken before it."""
    try:
        saved = json.loads(session.tree_snapshot.read_text())
    except (OSError, ValueError):
        return
    before = {path: None if data is None else base64.b64decode(data) for path, data in saved.items()}
    restored = restore_tree(session, before, session.repo.head.commit.hexsha)
    if restored:
        log(f"a run interrupted by the driver's stop had changed {', '.join(restored)}: restored")
    session.tree_snapshot.unlink()


def restore_tree(session: Session, before: dict[str, bytes | None], commit: str) -> list[str]:
    """Undo what a run did to the working tree: tracked files back to `commit` (or to the user's own
    uncommitted version), files it created removed, .git/config restored. Returns what was restored."""
    restored = []
    after = tree_changes(session)
    for path in sorted(set(before) | set(after)):
        if before.get(path, b"\0absent") == after.get(path, b"\0absent") and (path in before) == (path in after):
            continue
        full = session.root / path
        if path in before and before[path] is not None:  # the user's own uncommitted version
            full.parent.mkdir(parents=True, exist_ok=True)
            if full.is_symlink() or full.is_file():
                full.unlink()  # never write through a link the run put there
            full.write_bytes(before[path])
        elif path in before:
            continue  # too large to have kept a copy of: left as it is
        elif session.repo.git.ls_files("--", path):
            session.repo.git.checkout(commit, "--", path)
        elif full.is_dir() and not full.is_symlink():
            shutil.rmtree(full)
        else:
            full.unlink(missing_ok=True)
        restored.append(path)
    config = Path(session.repo.git_dir) / "config"
    if session.git_config and config.read_bytes() != session.git_config:
        config.write_bytes(session.git_config)
        restored.append(".git/config")
    return restored


def setup_branch(session: Session) -> None:
    take_lock(session)
    # the lock is ours: no writer is left. Never a run's work/ (a run may leave a tree deeper than glob can walk)
    private = Path(session.repo.git_dir) / "autoresearch"
    for folder, pattern in ((private, "**/.*.tmp*"), (session.runs, ".*.tmp*"), (session.runs, "*/.*.tmp*")):
        for path in remove_temp_files(folder, pattern):
            log(f"removed {path}, half-written when the driver was stopped")
    restore_after_a_kill(session)
    repo, state = session.repo, session.state()
    session.git_config = (Path(repo.git_dir) / "config").read_bytes()
    if state.get("phase") in ("applying", "discarding", "moving") and repo.is_dirty(path="train.py"):
        repo.git.checkout("HEAD", "--", "train.py")  # half-written by the driver when it was stopped: ours
        log("restored train.py, half-written when the driver was stopped")
    dirty = [f for f in ("train.py", "prepare.py") if repo.is_dirty(path=f)]
    if dirty:
        raise FatalError(f"uncommitted changes to {', '.join(dirty)}: commit them (git commit {' '.join(dirty)}) or "
                         "set them aside (git stash) before starting, so no experiment mixes with your work")
    for name in ("train.py", "prepare.py", "program.md"):
        if not (session.root / name).exists():
            raise FatalError(f"{name} is missing from {session.root}: the driver needs train.py, prepare.py and program.md")
    if session.branch in repo.heads:
        if repo.head.is_detached or repo.active_branch.name != session.branch:
            repo.git.checkout(session.branch)
        log(f"resuming branch {session.branch}")
    else:
        repo.git.checkout("-b", session.branch)
        log(f"created branch {session.branch}")
    session.runs.mkdir(parents=True, exist_ok=True)
    if (session.runs / "STOP").exists():
        (session.runs / "STOP").unlink()
        log("removed a STOP file left from an earlier run")
    kill_leftovers(session.pid_file)
    for work in [*session.runs.glob("*/work"), *session.runs.glob("*/work-*")]:  # of runs a killed driver left
        remove_tree(work)
    with contextlib.suppress(OSError, ValueError, TypeError):  # the same run's /dev/shm files, its processes ended
        remove_shm_created({(name, inode) for name, inode in json.loads(session.shm_snapshot.read_text())})
    session.shm_snapshot.unlink(missing_ok=True)
    session.prepare_hash = sha256_file(session.root / "prepare.py")
    for note in reconcile_ledger(session.ledger, session.ledger_backup):  # before anything reads the ledger
        log(note)


def git_identity(session: Session) -> dict:
    """A fallback identity when git itself has none (git's view, not GitPython's config reader: they
    differ when HOME or GIT_CONFIG_GLOBAL point elsewhere)."""
    try:
        session.repo.git.var("GIT_COMMITTER_IDENT")
        session.repo.git.var("GIT_AUTHOR_IDENT")
        return {}
    except git.GitCommandError:
        return {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
                "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}


def commit_train_py(session: Session, message: str) -> str:
    repo = session.repo
    with repo.git.custom_environment(**git_identity(session)):
        repo.git.commit("--no-verify", "-m", message, "--", "train.py")  # --only train.py: nothing else staged goes in
    return repo.head.commit.hexsha


def git_failure(session: Session, exc: git.GitCommandError) -> FatalError:
    """A git command failed (stale index.lock, full disk, ...): put train.py back at HEAD and say how to fix it."""
    with contextlib.suppress(Exception):
        head = session.repo.head.commit.tree["train.py"].data_stream.read()
        if (session.root / "train.py").read_bytes() != head:
            (session.root / "train.py").write_bytes(head)
    detail = one_line(exc.stderr or exc.stdout or str(exc), 300)
    hint = ("remove .git/index.lock if no other git command is running" if "index.lock" in detail
            else "free some disk space" if "space" in detail.lower()
            else "fix the repository (git status) so that the command works")
    words = [str(w) for w in exc.command[1:] if not str(w).startswith(("-c", "core."))][:3]
    return FatalError(f"git {' '.join(words)} failed: {detail}. train.py is back at HEAD; {hint}, "
                      "then run the same command again to resume")


def discard(session: Session, n: int, commit: str, parent: str, st: ExperimentState | None = None) -> None:
    """Reset the branch to the parent, touching only train.py; the commit stays under a ref. With st, the
    phase `discarding` lets a restart restore train.py left between the reset and the checkout."""
    repo = session.repo
    if st is not None:
        session.save_state(**{**st, "phase": "discarding"})
    repo.git.update_ref(f"refs/autoresearch/{session.args.tag}/discarded/{n}", commit)
    if repo.head.commit.hexsha == commit:
        repo.git.reset("--soft", parent)
    repo.git.checkout(parent, "--", "train.py")


def merge(base: str, ours: str, theirs: str) -> str | None:
    """git merge-file: `theirs` (a change made on `base`) applied to `ours`; None where they conflict."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, text in (("best", ours), ("base", base), ("change", theirs)):
            (Path(tmp) / name).write_text(text)
            paths.append(str(Path(tmp) / name))
        done = subprocess.run(["git", "merge-file", "-p", *paths], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None
