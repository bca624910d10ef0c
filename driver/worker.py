"""One experiment on one GPU of any host: the Ray task behind --workers and --ray (pool.py schedules it).

It receives the experiment's train.py: in its git worktree when the host shares the driver's disk (a
local Ray instance), else as text, written to a folder of its own on the host. It checks the host's
prepare.py against the driver's digest, prepares the host's model and data once (`python prepare.py`
when the caches are missing), runs train.py in the Landlock sandbox and the evaluator in a fresh
process, and returns the ledger fields, the worker's name, the tails of the logs and the submission's
digest. The submission stays on the host; read_submission() fetches it when it is kept.
"""
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from driver.common import FatalError, atomic_write, one_line, remove_tree, sha256_file
from driver.records import RunResult
from driver.runner import clean_env, harden_process, kill_leftovers, kill_strays, log_tail, run_process
from driver.scoring import (EXIT_GRACE_S, clear_work, remove_run_files, run_outcome, sandbox_info, sandbox_plan,
                            shm_entries, train_command, train_env)

HOST_DIR = Path(os.environ.get("AR_WORKER_DIR") or Path.home() / ".cache" / "ternary-autoresearch")
LOG_RETURN_BYTES = 200_000     # of each log, sent back to the driver from a host that does not share its disk
PREPARE_TIMEOUT_S = 3600       # the first task on a host downloads the model and tokenizes the data
_HOST_INFO: dict[str, dict] = {}  # per prepare.py digest: the host's sandbox-info (asked once per worker process)
_RUNNING: list = []               # the Runner of the experiment this process runs now, for watch_parent


class HostError(Exception):
    """This host cannot run the experiment (its harness differs, its model cannot be prepared)."""


@dataclass
class Runner:
    """What runner.run_process needs of a driver session: one process at a time in this worker process."""
    pid_file: Path
    known_children: set = field(default_factory=set)
    child: subprocess.Popen | None = None
    child_exited: float = 0.0
    child_killed_for: str = ""
    stray_files: set = field(default_factory=set)


def watch_parent() -> None:
    """Once per worker process: when its parent (Ray's raylet) dies, as it does with a driver that is killed,
    kill the run now (no grace: nobody will read its result) and exit; else a reused worker waits on it."""
    if _RUNNING:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        runner = _RUNNING[0]
        if runner.child is not None:
            with contextlib.suppress(OSError):
                os.killpg(runner.child.pid, signal.SIGKILL)  # train.py or the evaluator: its own process group
            kill_strays(runner.known_children)  # what left the group, reparented to this subreaper
        os._exit(1)
    _RUNNING.append(None)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def worker_name(driver_host: str) -> str:
    """gpu<id> on the driver's host, <host>/gpu<id> elsewhere: no spaces or semicolons (the ledger's
    reason column carries it as `worker <name>; `)."""
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(",", "+") or f"cpu{os.getpid()}"
    name = gpus if gpus.startswith("cpu") else f"gpu{gpus}"
    host = socket.gethostname()
    return name if host == driver_host else f"{host.replace(' ', '_').replace(';', '_')}/{name}"


def node_id() -> str:
    """The Ray node this task runs on; '' outside Ray, where get_runtime_context() would start a local Ray instance."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # run outside Ray (tests call run_experiment directly)
        return ""


def host_tree(spec: dict) -> Path:
    """The experiment's files on this host: the driver's worktree when the disk is shared, else a folder
    of this host's own, written from the spec (only relative paths inside it)."""
    if spec["shared_disk"]:
        return Path(spec["tree"])
    tree = HOST_DIR / spec["key"] / str(spec["experiment"]) / "tree"
    remove_tree(tree)
    for name, text in spec["files"].items():
        path = (tree / name).resolve()
        if not path.is_relative_to(tree.resolve()):
            raise HostError(f"the experiment names a file outside its folder: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tree


def harness(tree: Path) -> dict:
    """This host's sandbox-info (train.py's read paths, the model's digests), preparing the model and the
    data first when they are missing. One task per host prepares; the others wait on the lock."""
    digest = sha256_file(tree / "prepare.py")
    if digest in _HOST_INFO:
        return _HOST_INFO[digest]
    HOST_DIR.mkdir(parents=True, exist_ok=True)
    with open(HOST_DIR / "prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info, _ = sandbox_info(tree)
        if info is None:
            done = subprocess.run([sys.executable, "-I", "prepare.py"], cwd=tree, env=clean_env(),
                                  capture_output=True, text=True, timeout=PREPARE_TIMEOUT_S)
            info, _ = sandbox_info(tree)
            if info is None:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise HostError(f"`python prepare.py` failed on {socket.gethostname()}: {one_line(last, 200)}; "
                                "set AR_MODEL, AR_DATA and AR_CACHE on that host as on the driver's")
    _HOST_INFO[digest] = info
    return info


def run_experiment(spec: dict) -> RunResult:
    """Train and score one commit's train.py on this host's GPU (Ray sets CUDA_VISIBLE_DEVICES). Returns
    the ledger fields (a failure as status and reason), with `worker`, `node`, `folder`, `logs` and, when
    scored, `submission` and `submission_sha256`."""
    harden_process()  # a subreaper: what train.py double-forks is reparented here, where kill_tree finds it
    watch_parent()
    name, label = worker_name(spec["driver_host"]), spec["label"]
    base = {"worker": name, "node": node_id(), "note": f"worker {name}; "}
    try:
        tree = host_tree(spec)
        if sha256_file(tree / "prepare.py") != spec["prepare_sha256"]:
            raise HostError(f"prepare.py on {socket.gethostname()} differs from the driver's: not run")
        info = harness(tree)
        abi, _ = sandbox_plan(spec["sandbox"], info, tree)
    except (HostError, FatalError, OSError, ValueError, subprocess.SubprocessError) as exc:
        return {**base, "status": "crash", "reason": f"worker {name}: {one_line(exc, 200)}"}
    folder = tree.parent
    # a run of this experiment that a killed driver left on this host (--ray: the restarted driver cannot reach
    # it) would write into the folder this run uses: end it by its marker first, as the driver does on its disk
    kill_leftovers(folder / f"child{label}.pid")
    atomic_write(folder / "worker.txt", name)  # names the worker in a crash row if this process dies
    work = folder / f"work{label}"
    remove_tree(work)
    work.mkdir(parents=True)
    (folder / "submission.pt").unlink(missing_ok=True)
    runner = Runner(pid_file=folder / f"child{label}.pid")
    _RUNNING[0] = runner
    timeout = spec["timeout"]
    cmd = train_command(tree, work, abi, [Path(p) for p in info.get("train_read", [])])
    shm_before = shm_entries()
    try:
        code, train_s = run_process(runner, cmd, folder / f"train{label}.log", timeout + EXIT_GRACE_S,
                                    train_env(work, timeout), cwd=work)
        clear_work(runner, work)
        result = {**base, "train_s": round(train_s, 1), "note": base["note"] + ("" if abi else "unsandboxed; ")}
        if sha256_file(tree / "prepare.py") != spec["prepare_sha256"]:
            result.update(status="crash", reason="prepare.py was modified during the run; not scored")
        else:
            digests = folder / f"model{label}.sha256.json"  # from the driver's memory: the run has ended
            atomic_write(digests, spec["model_expected"])
            result.update(run_outcome(runner, tree, folder, label, code, timeout, digests,
                                            spec["tokens_expected"], spec["eval_windows"], spec["eval_timeout"]))
    finally:
        remove_run_files(work, shm_before)
    if "val_ppl" in result:
        result["submission"] = str(folder / "submission.pt")  # its submission_sha256: the digest taken at exit
    logs = [f"train{label}.log", f"eval{label}.log", f"eval{label}.json"]
    result["logs"] = {} if spec["shared_disk"] else {n: log_tail(folder / n, LOG_RETURN_BYTES) for n in logs}
    result["folder"] = str(folder)
    return result


def read_submission(path: str) -> bytes:
    """A kept experiment's submission, fetched by the driver (a Ray task on the host that holds it)."""
    return Path(path).read_bytes()
