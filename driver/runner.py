"""One host's processes: the driver hardened against its experiments, a run started in its own process group,
watched (time limit, tasks, memory, disk), its output capped, and the whole tree killed, strays included.

No git, no LLM, no pandas: the Ray task (worker.py) runs experiments with this file alone."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

import psutil

from driver.common import atomic_write, log, open_new

KILL_GRACE_S = float(os.environ.get("AR_TEST_KILL_GRACE_S", 10))  # SIGTERM → this long → SIGKILL;
# tests whose children ignore SIGTERM shorten it: the escalation is the same, 1 s or 10
# What one run (train.py or the evaluator, and all they start) may take of the machine: the driver's watchdog
# reads them every WATCH_INTERVAL_S and kills the whole tree at once past one of them (a fork bomb, a run that
# eats the memory or fills the disk), a `crash` row naming which. Set in the environment to tune a machine.
WATCH_INTERVAL_S = 0.2
MAX_RUN_TASKS = int(os.environ.get("AR_MAX_RUN_TASKS", "4096"))  # processes and threads: pids are machine-wide
RUN_MEMORY_MB = int(os.environ.get("AR_RUN_MEMORY_MB", "0"))    # the run's summed RSS; 0: no limit of its own
# MemAvailable below this: the run is killed before the kernel's OOM killer picks among the machine's processes
MEMORY_RESERVE_MB = int(os.environ.get("AR_MEMORY_RESERVE_MB", "1024"))
# free space of the run folder's filesystem below this: killed; the rest is the driver's (ledger, state, copies)
DISK_RESERVE_MB = int(os.environ.get("AR_DISK_RESERVE_MB", "1024"))
LOG_TAIL_BYTES = 3000          # tail of a crashed run's log shown to the LLM
LOG_CAP_BYTES = 2_000_000      # train.log beyond this keeps only its tail: floods cannot fill a disk
# never passed to train.py, the evaluator or git: keys and tokens, and the sockets of credential agents
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL|^OPENAI_|^ANTHROPIC_|^AWS_|^AZURE_|_AUTH_SOCK$|"
                        r"^SSH_|^GPG_|^DBUS_SESSION_BUS_ADDRESS$|^KRB5CCNAME$|_ASKPASS$", re.I)
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
RAY_AUTH: dict[str, str] = {}  # a Ray cluster's token settings, taken out of the environment by harden_process


def harden_process() -> None:
    """train.py runs as the same user. Non-dumpable: it cannot read this process's memory or
    /proc/<pid>/environ (the API key). Subreaper: a daemon it double-forks is reparented here, where
    kill_tree finds it. The secrets leave os.environ too (the client already holds the key), so no
    git or other child of the driver inherits them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for option in (PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER):
        value = 0 if option == PR_SET_DUMPABLE else 1
        if libc.prctl(option, value, 0, 0, 0) != 0:
            log(f"warning: prctl({option}) failed (errno {ctypes.get_errno()})")
    for key in [k for k in os.environ if SECRET_ENV.search(k)]:
        if key.startswith("RAY_AUTH"):  # for cluster.start_ray alone, which connects to the cluster with it
            RAY_AUTH[key] = os.environ[key]
        del os.environ[key]
        if key.endswith("_AUTH_SOCK"):  # Landlock (ABI <= 7) cannot stop a connect() to a pathname socket
            log(f"warning: {key} is set: it is not passed on, but a train.py that finds the agent's socket "
                "(/proc/net/unix lists socket paths) could still use it. Start the night without an agent")


def clean_env(**extra: str) -> dict:
    """train.py's and the evaluator's environment: no API keys or tokens."""
    env = {k: v for k, v in os.environ.items() if not SECRET_ENV.search(k)}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def kill_tree(proc: subprocess.Popen, known: set[int] = frozenset(), grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group, every descendant (even ones that left the group) and the run's orphans
    (daemons reparented to this subreaper driver: its children other than `known`), a grace period,
    then SIGKILL. grace 0: SIGKILL at once, for what outlives a clean exit (strays get no time to change
    the submission) and for a run the watchdog stops (a fork bomb must not grow during a grace period)."""
    me = psutil.Process()
    if not grace:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group in one call, before the slower search below

    def orphans() -> list:
        with contextlib.suppress(psutil.Error):
            return [c for c in me.children() if c.pid not in known and c.pid != proc.pid]
        return []

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []

    def alive() -> list:
        group = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(p.pid) == proc.pid:
                    group.append(p)
        lost = orphans()
        for p in list(lost):
            with contextlib.suppress(psutil.Error):
                lost += p.children(recursive=True)
        procs = {p.pid: p for p in group + family + lost}.values()
        running = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
        return running

    for sig in (signal.SIGTERM, signal.SIGKILL) if grace else (signal.SIGKILL,):
        targets = alive()
        for p in targets:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        until = time.time() + (grace if sig == signal.SIGTERM else 5)
        while targets and time.time() < until:
            proc.poll()  # reap our own child so it stops counting as alive
            targets = alive()
            time.sleep(0.05)
        if not targets:
            break
    proc.wait()
    kill_strays(known | {proc.pid})


def own_children() -> set[int]:
    """This driver's children, read straight from /proc (fast: a stray that forks away is reparented here)."""
    pids = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split())
    return pids


def kill_strays(known: set[int]) -> None:
    """SIGKILL every child of this driver it did not start itself, and reap it, until none is left for a
    while. A process that keeps forking away (a new pid each generation) escapes a list of pids taken once,
    but every generation whose parent dies is reparented to this subreaper and killed on the next pass."""
    quiet, until = 0, time.time() + 30
    while quiet < 20 and time.time() < until:
        strays = own_children() - known
        quiet = 0 if strays else quiet + 1
        for pid in strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        if not strays:
            time.sleep(0.001)


def kill_leftovers(pid_file: Path) -> None:
    """A driver killed mid-run leaves its train.py (own process group) running: end that group. Only
    processes that carry the run's marker, on the same boot, are touched: a stale pid after a reboot
    may belong to anything, even the user's shell. pid_file: what run_process wrote."""
    if not pid_file.exists():
        return
    try:
        record = json.loads(pid_file.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict):  # the old format (a bare process group id) cannot be verified
        record = {}
    if record.get("boot") == psutil.boot_time() and record.get("run_id"):
        marker = f"AR_RUN_ID={record['run_id']}"
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                env = p.environ()
                if env.get("AR_RUN_ID") == record["run_id"]:
                    p.kill()
                    log(f"killed process {p.pid} ({marker}) left running by an earlier driver")
    pid_file.unlink()


def pump_output(stream, log_path: Path) -> None:
    """Copy a child's output to its log: \\r progress becomes lines, a flood keeps its head and tail."""
    written, dropped, tail = 0, 0, b""
    with open_new(log_path) as out:
        for chunk in iter(lambda: stream.read1(65536), b""):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if written + len(chunk) <= LOG_CAP_BYTES // 2:
                out.write(chunk)
                written += len(chunk)
            else:
                dropped += len(chunk)
                tail = (tail + chunk)[-LOG_CAP_BYTES // 2:]
            out.flush()
        if dropped:
            out.write(f"\n[... {dropped - len(tail):,} bytes of output dropped ...]\n".encode())
            out.write(tail)


def run_table() -> dict[int, tuple[int, int, int, int]]:
    """Every process of the machine, from /proc/<pid>/stat: pid -> (parent, process group, threads, RSS bytes)."""
    table, page = {}, os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()
                table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[17]), int(fields[21]) * page)
    return table


def run_members(table: dict, root: int, known: set[int]) -> list[int]:
    """The run's processes in `table`: root's group, its descendants, and the orphans reparented to this
    subreaper (this process's children other than `known`) with theirs."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    queue = [pid for pid, (_, group, _, _) in table.items() if group == root]
    queue += [root] + [pid for pid in children.get(os.getpid(), []) if pid not in known]
    found: set[int] = set()
    while queue:
        pid = queue.pop()
        if pid not in found:
            found.add(pid)
            queue += children.get(pid, [])
    return [pid for pid in found if pid in table]


def meminfo_mb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) // 1024
    return 0


def resource_problem(root: int, known: set[int], folder: Path) -> str:
    """Why a run must be stopped now ('' if it may go on): too many processes, too much memory, a full disk."""
    table = run_table()
    members = run_members(table, root, known)
    tasks = sum(table[pid][2] for pid in members)
    if tasks > MAX_RUN_TASKS:
        return (f"the run had {tasks} processes and threads, over the limit of {MAX_RUN_TASKS} (AR_MAX_RUN_TASKS): "
                "a fork bomb?; killed")
    held = sum(table[pid][3] for pid in members) // 2**20
    if RUN_MEMORY_MB and held > RUN_MEMORY_MB:
        return f"the run's processes held {held} MiB of memory, over its limit of {RUN_MEMORY_MB} MiB (AR_RUN_MEMORY_MB); killed"
    available = meminfo_mb("MemAvailable")
    if available < MEMORY_RESERVE_MB:
        return (f"the machine ran out of memory: {available} MiB available, under the {MEMORY_RESERVE_MB} MiB the driver "
                f"keeps (AR_MEMORY_RESERVE_MB), while the run's processes held {held} MiB; killed")
    return disk_problem(folder)


def disk_problem(folder: Path) -> str:
    while not folder.is_dir() and folder != folder.parent:  # an unsandboxed run may delete its own folder
        folder = folder.parent
    disk = os.statvfs(folder)
    free = disk.f_bavail * disk.f_frsize // 2**20
    if free < DISK_RESERVE_MB:
        return (f"the disk ran full: {free} MiB free on the run folder's filesystem, under the {DISK_RESERVE_MB} MiB the "
                "driver keeps for its ledger and state (AR_DISK_RESERVE_MB); killed, its files removed")
    return ""


def watch_run(proc: subprocess.Popen, timeout: float, known: set[int], folder: Path) -> tuple[int | None, str]:
    """Wait for proc to exit, at most `timeout` s, looking at the run's resources meanwhile: (its exit code or
    None, why the watchdog stopped it or ''). Woken by a pidfd the instant proc exits, where Popen.wait would
    sleep up to 50 ms between polls: what it left behind has no time of its own."""
    end = time.time() + timeout
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # Linux < 5.3
        pidfd = None
    try:
        while True:
            wait = max(min(WATCH_INTERVAL_S, end - time.time()), 0)
            if pidfd is not None:
                select.select([pidfd], [], [], wait)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout=0 if pidfd is not None else wait), ""
            if time.time() >= end:
                return None, ""
            problem = resource_problem(proc.pid, known, folder)
            if problem:
                return None, problem
    finally:
        if pidfd is not None:
            os.close(pidfd)


def writable_fd(pid: int, fd: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:", 1)[1].split()[0]
        return int(flags, 8) & os.O_ACCMODE != os.O_RDONLY
    return False


def held_files(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every file the process can change: open for writing, or mapped shared."""
    paths = set()
    with contextlib.suppress(OSError):
        paths |= {f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd") if writable_fd(pid, fd)}
    with contextlib.suppress(OSError):  # a mapping outlives the fd it was made from
        fields = [line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines()]
        paths |= {f[5] for f in fields if len(f) == 6 and f[1].endswith("s") and f[5].startswith("/")}
    held = set()
    for path in paths:
        with contextlib.suppress(OSError):
            info = os.stat(path)
            held.add((info.st_dev, info.st_ino))
    return held


def freeze_strays(root: int, known: set[int]) -> set[tuple[int, int]]:
    """SIGSTOP what outlived root's clean exit (nothing of the run moves any more) and return the files those
    processes can change: a submission among them could have changed after the exit, through pages a shared
    mapping had already dirtied (no ctime moves) or in the instant before this stop."""
    with contextlib.suppress(OSError):
        os.killpg(root, signal.SIGSTOP)  # the group at once
    stopped: set[int] = set()
    for _ in range(100):  # what left the group, until a pass finds nothing new (a stopped process cannot fork)
        new = set(run_members(run_table(), root, known)) - stopped
        if not new:
            break
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    return set().union(*map(held_files, stopped))


class ProcessOwner(Protocol):
    """What run_process keeps of the one run it watches: the driver's Session or a Ray worker's Runner."""
    pid_file: Path
    known_children: set
    child: subprocess.Popen | None
    child_exited: float
    child_killed_for: str
    stray_files: set


def run_process(runner: ProcessOwner, cmd: list[str], log_path: Path, timeout: float, env: dict,
                cwd: Path) -> tuple[int | None, float]:
    """(exit code or None when killed: at its limit, or by the watchdog, which says why in
    runner.child_killed_for), seconds; the whole process tree is gone when this returns.
    The child carries a marker (AR_RUN_ID) by which a restarted driver recognises its leftovers."""
    start = time.time()
    runner.known_children = {c.pid for c in psutil.Process().children()}
    code, runner.child_killed_for = None, ""
    run_id = os.urandom(8).hex()
    atomic_write(runner.pid_file, json.dumps({"run_id": run_id, "boot": psutil.boot_time()}))
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "AR_RUN_ID": run_id}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    runner.child = proc
    pump = threading.Thread(target=pump_output, args=(proc.stdout, log_path), daemon=True)
    pump.start()
    try:
        code, runner.child_killed_for = watch_run(proc, timeout, runner.known_children, log_path.parent)
    finally:
        runner.child_exited = time.time()
        runner.stray_files = freeze_strays(proc.pid, runner.known_children) if code == 0 else set()
        # a grace period only for the main process at its limit; strays after a clean exit, a run the watchdog
        # stopped: SIGKILL now
        at_limit = code is None and not runner.child_killed_for
        kill_tree(proc, runner.known_children, KILL_GRACE_S if at_limit else 0)
        # a run that filled the disk between two looks, or ended on ENOSPC: its files go all the same
        runner.child_killed_for = runner.child_killed_for or disk_problem(log_path.parent)
        runner.child = None
        runner.pid_file.unlink(missing_ok=True)
    pump.join(timeout=10)
    return code, time.time() - start


def log_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The end of a log the driver wrote; nothing if it is gone or is no longer a plain file (a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        f.seek(max(os.fstat(fd).st_size - limit, 0))
        return f.read(limit).decode("utf-8", errors="replace")
