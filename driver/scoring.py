"""One run of train.py and its score: how train.py runs on this host (the Landlock plan), the files it may
read and write, the submission taken at exit, and the evaluator (`python prepare.py eval`) in a fresh process.

Used by the local slot and by the Ray task alike: no git, no LLM, no pandas here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import prepare
import sandbox
from driver.common import (GIT_SAFE_CONFIG, FatalError, atomic_write, one_line, open_new, remove_tree,
                           sha256_file, temp_path)
from driver.records import RunResult
from driver.runner import clean_env, log_tail, run_process

EVAL_TIMEOUT_S = 900           # prepare.py eval's own limit
EXIT_GRACE_S = 1.0             # past AR_DEADLINE before the run is killed: the interpreter's own exit (torch's)
# never readable by train.py, though in the repository: other experiments' folders and the kept submission
# (a warm start would make a kept score irreproducible from its commit), and git's internals (a remote URL
# in .git/config may hold a credential; the objects hold every experiment of the night)
REPO_PRIVATE = ("runs", ".git")
SHM_DIR = Path(sandbox.SHM)


def sandbox_info(root: Path) -> tuple[dict | None, str]:
    """`python prepare.py sandbox-info --json` of the harness in `root`: (its answer, or None and the last line
    it printed on failure)."""
    done = subprocess.run([sys.executable, "-I", "prepare.py", "sandbox-info", "--json"], cwd=root,
                          env=clean_env(), capture_output=True, text=True, timeout=EVAL_TIMEOUT_S)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None, (done.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(lines[-1]), ""


def sandbox_plan(mode: str, info: dict, root: Path) -> tuple[int, list[str]]:
    """How train.py runs on this host: (the Landlock ABI, 0 for unsandboxed; warnings to show). info: the
    harness's sandbox-info. Raises FatalError where --sandbox require cannot be met."""
    abi = sandbox.landlock_abi()
    if mode == "off":
        return 0, ["--sandbox off: train.py runs unsandboxed (see README, Known limits)"]
    if abi == 0:
        if mode == "require":
            raise FatalError("--sandbox require: this kernel offers no Landlock (Linux 5.13+ with landlock in "
                             "the lsm= boot list). Run on such a kernel, or pass --sandbox auto to run unsandboxed")
        return 0, ["this kernel offers no Landlock: train.py runs UNSANDBOXED; the ledger and report say so. "
                   "Use a Linux 5.13+ kernel with Landlock enabled (--sandbox require refuses to start without it)"]
    train_read = [Path(p) for p in info.get("train_read", [])]
    readable = [root, *train_read, *map(Path, sandbox.python_paths() + sandbox.system_read())]
    exposed = [p for p in map(Path, info.get("eval_private", []))
               if any(p.resolve().is_relative_to(r.resolve()) for r in readable if r.is_dir())]
    if exposed:
        message = (f"the evaluation data {exposed[0]} lies under a folder train.py may read; move AR_DATA and "
                   "AR_CACHE outside the repository and the Python installation")
        if mode == "require":
            raise FatalError(message)
        return 0, [f"{message}. train.py runs UNSANDBOXED"]
    if abi < 6:
        return abi, [f"Landlock ABI {abi}: files are confined, but " + ("TCP and " if abi < 4 else "")
                     + "signals to other processes are not (they need ABI 6, Linux 6.12)"]
    return abi, []


def take_submission(written: Path, kept: Path, exited: float, stray_files: set) -> tuple[str, str]:
    """Copy the submission out of train.py's folder as train.py left it (its leftovers are dead by now) into a
    new file of the driver's: a process that kept the old file open or mapped cannot reach the copy. Returns
    ('' or why it cannot be scored, the copy's sha256). stray_files: what the leftovers held at the exit."""
    try:
        fd = os.open(written, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block the driver
    except FileNotFoundError:
        return "train.py exited cleanly without writing a submission", ""
    except OSError:  # a link
        return "the submission is not a plain file (a link, a folder or a device); not scored", ""
    digest, tmp = hashlib.sha256(), temp_path(kept)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "the submission is not a plain file (a link, a folder or a device); not scored", ""
        if info.st_ctime > exited:  # ctime cannot be set back, unlike mtime
            return ("the submission was written after train.py exited, by a process it left behind (training past "
                    "the limit); not scored"), ""
        if (info.st_dev, info.st_ino) in stray_files:
            return ("a process train.py left behind held the submission open for writing or mapped shared when train.py "
                    "exited: it could change it after the exit; not scored"), ""
        with open_new(tmp) as out:
            for chunk in iter(lambda: os.read(fd, 1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        os.replace(tmp, kept)
    except OSError as exc:  # a full disk
        tmp.unlink(missing_ok=True)
        return f"the driver could not copy the submission: {one_line(exc, 120)}; not scored", ""
    finally:
        os.close(fd)
    os.unlink(written)  # the copy is the submission now
    return "", digest.hexdigest()


def clear_work(runner, work: Path) -> None:
    """After train.py: its temp files and compile caches (GBs, read by nobody) go; all of work/ when the
    watchdog stopped the run (a disk it filled is freed before the driver writes again)."""
    remove_tree(work if runner.child_killed_for else work / "tmp")


def train_env(work: Path, timeout: float) -> dict:
    """train.py's environment: no secrets; its temp files and compile caches inside `work`."""
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return clean_env(AR_DEADLINE=str(time.time() + timeout), AR_SUBMISSION=str(work / "submission.pt"), AR_EVAL="external",
                     TMPDIR=str(tmp), TRITON_CACHE_DIR=str(tmp / "triton"), TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"),
                     CUDA_CACHE_PATH=str(tmp / "cuda"), MPLCONFIGDIR=str(tmp / "matplotlib"),
                     PYTHONDONTWRITEBYTECODE="1")


def repository_reads(root: Path) -> list[Path]:
    """What train.py may read of the repository: its tracked top-level entries (every entry of a worker's
    copy, which is not a git checkout), without REPO_PRIVATE and links. Untracked files (your notes, a .env)
    are not read; the names in root stay listable (Python lists the folder of train.py to import prepare)."""
    if (root / ".git").exists():
        listed = subprocess.run(["git", *[a for c in GIT_SAFE_CONFIG for a in ("-c", c)], "ls-files", "-z"], cwd=root,
                                env=clean_env(), capture_output=True, check=True).stdout.decode(errors="surrogateescape")
        names = {path.split("/")[0] for path in listed.split("\0") if path}
    else:
        names = set(os.listdir(root))
    return [root / name for name in sorted(names - set(REPO_PRIVATE))
            if os.path.lexists(root / name) and not (root / name).is_symlink()]


def train_command(root: Path, work: Path, abi: int, train_read: list) -> list[str]:
    """train.py's command line: in the sandbox when there is one (abi > 0), writing only `work` (its
    submission, temp files and compile caches), reading the repository's own files without following links."""
    cmd = [sys.executable, str(root / "train.py")]
    if abi:
        return sandbox.wrap(cmd, read=train_read, write=[work], read_nofollow=repository_reads(root), list_only=[root])
    return sandbox.wrap_unconfined(cmd)


def shm_entries() -> set[tuple[str, int]]:
    """(name, inode) of what /dev/shm holds now: taken before a run, to know afterwards what it created."""
    try:
        return {(entry.name, entry.inode()) for entry in os.scandir(SHM_DIR)}
    except OSError:
        return set()


def shm_in_use() -> set[str]:
    """The /dev/shm files that a living process holds open or mapped (another worker's run, another program)."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        with contextlib.suppress(OSError):
            held.update(line.split(None, 5)[-1].removesuffix(" (deleted)") for line in
                        Path(f"/proc/{pid}/maps").read_text().splitlines() if f" {SHM_DIR}/" in line)
    return {path for path in held if path.startswith(f"{SHM_DIR}/")}


def remove_run_files(work: Path, shm_before: set[tuple[str, int]]) -> None:
    """After a run, once every process it started has ended: its work folder (the submission was taken out of
    it) and what it created in /dev/shm, so that nothing carries over to the next experiment and the disk does
    not fill over a night."""
    remove_tree(work)
    remove_shm_created(shm_before)


def remove_shm_created(shm_before: set[tuple[str, int]]) -> None:
    """What appeared in /dev/shm since `shm_before`; a file that another user owns or a living process holds
    is not the run's."""
    held = shm_in_use()
    for name, inode in shm_entries() - shm_before:
        path = SHM_DIR / name
        with contextlib.suppress(OSError):
            info = path.lstat()
            if info.st_ino == inode and info.st_uid == os.geteuid() and str(path) not in held:
                remove_tree(path)


def run_outcome(runner, root: Path, folder: Path, label: str, code: int | None, timeout: float, model_digests: Path,
                tokens_expected: str, eval_windows: int | None, eval_timeout: float) -> RunResult:
    """How a train.py run ended (its exit `code`, None: killed at its limit) and, when it submitted, its score
    from root's prepare.py in a fresh process. runner: what run_process needs (a Session, or a worker's).
    Ledger fields, the failure's status and reason included."""
    if runner.child_killed_for:
        return {"status": "crash", "reason": runner.child_killed_for}
    if code is None:
        return {"status": "timeout", "reason": f"train.py ran past its {timeout:.0f} s limit; killed"}
    if code == -signal.SIGKILL:
        return {"status": "crash", "reason": "train.py was killed by SIGKILL, not by the driver: by the kernel's "
                                             "out-of-memory killer, most likely (the machine ran out of memory)"}
    if code != 0:
        last = [ln for ln in log_tail(folder / f"train{label}.log").splitlines() if ln.strip()]
        return {"status": "crash", "reason": f"train.py exited with {code}: {one_line(last[-1] if last else '', 160)}"}
    submission = folder / "submission.pt"
    problem, digest = take_submission(folder / f"work{label}" / "submission.pt", submission, runner.child_exited,
                                      runner.stray_files)
    if problem:
        return {"status": "crash", "reason": problem}
    # -I: the evaluator must not import modules that train.py may have dropped next to it
    cmd = [sys.executable, "-I", "prepare.py", "eval", str(submission), "--json", "--expect-model", str(model_digests)]
    if tokens_expected:
        cmd += ["--expect-tokens", tokens_expected]
    if eval_windows:
        cmd += ["--max-windows", str(eval_windows)]
    eval_env = clean_env(AR_EVAL="", AR_SUBMISSION="", AR_DEADLINE="")
    code, eval_s = run_process(runner, cmd, folder / f"eval{label}.log", eval_timeout, eval_env, cwd=root)
    result = {"eval_s": round(eval_s, 1)}
    lines = log_tail(folder / f"eval{label}.log", 20000).strip().splitlines()
    if runner.child_killed_for:
        return {**result, "status": "crash", "reason": f"the evaluator: {runner.child_killed_for}"}
    if code is None:
        return {**result, "status": "crash", "reason": f"the evaluator ran past its {eval_timeout} s limit"}
    if code != 0:
        return {**result, "status": "crash", "reason": one_line(lines[-1] if lines else f"evaluator exited {code}", 200)}
    try:
        score = json.loads(lines[-1])
    except (ValueError, IndexError):
        score = None
    if not isinstance(score, dict):
        return {**result, "status": "crash", "reason": "the evaluator's output has no JSON result; see eval.log"}
    if prepare.finite_number(score.get("ppl")) is None:
        return {**result, "status": "crash", "reason": f"the evaluator returned val_ppl {one_line(score.get('ppl'), 40)}: "
                                                       "not finite"}
    try:
        protocol = one_line(prepare.protocol_label(score), 40)
    except (KeyError, TypeError, ValueError):
        return {**result, "status": "crash", "reason": "the evaluator's JSON result names no protocol; see eval.log"}
    if sha256_file(submission) != digest:  # the scored file is the copy taken at exit, or the score is void
        return {**result, "status": "crash", "reason": "the submission changed while it was scored; not scored"}
    atomic_write(folder / f"eval{label}.json", json.dumps(score, indent=1))
    return {**result, "val_ppl": float(score["ppl"]), "protocol": protocol, "submission_sha256": digest,
            **reported_numbers(score)}
# the eval JSON's numbers a row takes: (ledger column, where in the JSON); meta is what train.py says of itself
SCORE_NUMBERS = (("eval_windows", ("windows",)), ("bits_per_weight", ("bits_per_weight",)),
                 ("steps", ("meta", "steps")), ("train_tokens", ("meta", "tokens")),
                 ("peak_mem_gb", ("meta", "peak_mem_gb")))


def reported_numbers(score: dict) -> RunResult:
    """The eval JSON's numbers for the row: each a finite real number or None. The evaluator sanitises meta, but
    its JSON passes through a log file: checked again here. What is dropped (here, or by the evaluator, its
    meta_dropped) is named in `dropped`, for the row's reason; nothing else of meta reaches a row or a state file."""
    fields, dropped = {}, []
    for column, keys in SCORE_NUMBERS:
        value = score
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        fields[column] = prepare.finite_number(value)
        if fields[column] is None and value is not None:
            dropped.append(".".join(keys))
    named = score.get("meta_dropped")
    dropped += [f"meta.{one_line(name, 40)}" for name in (named if isinstance(named, list) else [named] if named else [])[:10]]
    if dropped:
        fields["dropped"] = f"not finite numbers, left empty: {one_line(', '.join(dropped), 200)}; "
    return fields
