"""Issue 19, items 3 and 6: what a sandboxed train.py can read is harmless (nothing of it can leave through
the crash tail the driver sends to the LLM and writes to the ledger), and nothing carries over from one
experiment to the next (its work/ folder and its /dev/shm files are removed, the other runs' folders and the
kept submission are unreadable). Real Landlock, the real driver, stand-in train.py/prepare.py."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import git
import pytest

from driver.scoring import remove_run_files, shm_entries, train_command, train_env
import sandbox
from driver_helpers import STANDIN, TAG, check_invariants, ledger, make_research_repo, run_agent, start_agent
from test_sandbox import DENIED, PRELUDE, needs_landlock  # noqa: F401 (a fixture)

SHM = Path("/dev/shm")
# A parent that holds a secret in its command line (as the driver holds --base-url and the like), runs the
# child argv given as JSON and prints the child's output.
PARENT = """
import json, subprocess, sys
child = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
sys.stderr.write(child.stderr)
print(child.stdout.strip())
"""
READS = """
def first_line(path):
    with open(path, "rb") as f:
        return f.read(200).split(b"\\n")[0].decode(errors="replace")
parent = os.getppid()
paths = {"shadow": "/etc/shadow", "parent_cmdline": f"/proc/{parent}/cmdline", "parent_stat": f"/proc/{parent}/stat",
         "init_cmdline": "/proc/1/cmdline", "init_environ": "/proc/1/environ", "etc_hostname": "/etc/hostname",
         "other_home": sys.argv[1], "own_status": "/proc/self/status", "loader_cache": "/etc/ld.so.cache",
         "cpuinfo": "/proc/cpuinfo", "passwd": "/etc/passwd", "shadow_via_own_proc": "/proc/self/root/etc/shadow"}
print(json.dumps({name: attempt(first_line, path) for name, path in paths.items()}))
"""


def other_users_home(tmp_path: Path) -> Path:
    """A file in another user's home folder that file modes let anyone read: only the sandbox can refuse it."""
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    (home / "notes.txt").write_text("alice's notes\n")
    if os.geteuid() == 0:
        os.chown(home / "notes.txt", 4242, 4242)
        os.chown(home, 4242, 4242)
    return home / "notes.txt"


def read_under_parent(child: list[str], secret: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PARENT, json.dumps(child), secret], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_system_files_and_other_processes_are_unreadable(needs_landlock, tmp_path):
    """/etc/shadow, the parent's command line and stat, pid 1's command line and environment, the rest of /etc,
    another user's files: refused inside, readable outside (the control). What Python, torch and the loader
    need stays readable."""
    secret, notes = f"--api-key=sk-{uuid.uuid4().hex}", other_users_home(tmp_path)
    child = [sys.executable, "-c", PRELUDE + READS, str(notes)]
    inside = read_under_parent(sandbox.wrap(child, [], [tmp_path / "run"]), secret)
    refused = ["parent_cmdline", "parent_stat", "init_cmdline", "init_environ", "other_home"]
    refused += [name for name, path in (("shadow", "/etc/shadow"), ("shadow_via_own_proc", "/etc/shadow"),
                                        ("etc_hostname", "/etc/hostname")) if os.access(path, os.R_OK)]
    assert all(inside[name] in DENIED for name in refused), inside
    assert {inside[n] for n in ("own_status", "loader_cache", "cpuinfo", "passwd")} == {"allowed"}, inside
    outside = read_under_parent(child, secret)
    assert all(outside[name] == "allowed" for name in refused if name != "init_environ"), outside


def scratch_repo(tmp_path: Path, train_py: str) -> Path:
    """A research repo with `train_py`, the user's untracked notes and a credential in .git/config."""
    repo = make_research_repo(tmp_path / "research")
    (repo / "train.py").write_text(train_py)
    g = git.Repo(repo)
    g.index.add(["train.py"])
    g.index.commit("the probe as train.py")
    with g.config_writer() as cfg:
        cfg.set_value('remote "origin"', "url", "https://user:ghp_secret@example.com/r.git")
    return repo


def run_as_the_driver_does(repo: Path, work: Path, env: dict | None = None, timeout: float = 600) -> dict:
    """train.py run with the driver's own command line and environment (scoring.train_command/train_env)."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = train_command(repo, work, sandbox.landlock_abi(), [])
    done = subprocess.run(cmd, cwd=work, env={**train_env(work, timeout), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


REPO_READS = """
repo = __import__("pathlib").Path(__file__).resolve().parent
import prepare  # beside train.py: the folder must be listable
names = ["prepare.py", "program.md", "notes.txt", ".git/config", "runs/t/1/submission.pt", "runs/t/1/work/w.pt",
         "runs/t/2/tree/train.py"]
result = {name: attempt(read, repo / name) for name in names}
result["list_root"] = attempt(os.listdir, repo)
print(json.dumps(result))
"""


def test_the_repository_is_read_without_runs_git_and_untracked_files(needs_landlock, tmp_path):
    """train.py reads the repository's tracked files; not runs/ (other experiments, the kept submission, another
    worker's worktree), not .git (a credential in a remote URL), not the user's untracked notes."""
    repo = scratch_repo(tmp_path, PRELUDE + REPO_READS)
    for name in ("runs/t/1/submission.pt", "runs/t/1/work/w.pt", "runs/t/2/tree/train.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("an earlier run's weights")
    inside = run_as_the_driver_does(repo, repo / "runs" / TAG / "3" / "work")
    assert {inside[n] for n in ("prepare.py", "program.md", "list_root")} == {"allowed"}, inside
    private = ["notes.txt", ".git/config", "runs/t/1/submission.pt", "runs/t/1/work/w.pt", "runs/t/2/tree/train.py"]
    assert all(inside[name] in DENIED for name in private), inside


def test_a_worker_reads_only_its_own_worktree(needs_landlock, tmp_path):
    """--workers: each experiment runs in runs/<tag>/<n>/tree, a git worktree; it reads none of the other
    experiments' folders (worktree, work/, submission) and nothing of the main checkout."""
    repo = scratch_repo(tmp_path, PRELUDE + """
me = __import__("pathlib").Path(__file__).resolve().parent
runs, root = me.parent.parent, me.parents[3]
other = runs / "2"
names = {"own": me / "prepare.py", "other_tree": other / "tree" / "train.py", "other_work": other / "work" / "w.pt",
         "other_submission": other / "submission.pt", "main_train_py": root / "train.py", "main_notes": root / "notes.txt"}
print(json.dumps({name: attempt(read, path) for name, path in names.items()}))
""")
    g = git.Repo(repo)
    runs = repo / "runs" / TAG
    for n in (1, 2):
        g.git.worktree("add", "--detach", str(runs / str(n) / "tree"), "HEAD")
    (runs / "2" / "work").mkdir()
    (runs / "2" / "work" / "w.pt").write_text("weights of a run in flight")
    (runs / "2" / "submission.pt").write_text("a scored submission")
    inside = run_as_the_driver_does(runs / "1" / "tree", runs / "1" / "work")
    assert inside["own"] == "allowed", inside
    assert all(result in DENIED for name, result in inside.items() if name != "own"), inside


COMPILE = """
import torch
torch._inductor.config.compile_threads = 2  # the worker pool, whose locks live in /dev/shm
def step(x, w):
    return torch.nn.functional.gelu(x @ w).square().mean()
w = torch.randn(16, 8, requires_grad=True)
loss = torch.compile(step)(torch.randn(4, 16), w)
loss.backward()
print(json.dumps({"finite": bool(torch.isfinite(w.grad).all()), "loss": float(loss)}))
"""


def test_torch_compile_on_cpu_works_inside(needs_landlock, tmp_path):
    """torch.compile on CPU (dynamo, inductor's worker pool, g++, as and ld, headers) in the driver's sandbox."""
    repo = scratch_repo(tmp_path, PRELUDE + COMPILE)
    inside = run_as_the_driver_does(repo, repo / "runs" / TAG / "1" / "work", timeout=900)
    assert inside["finite"] is True


def test_shm_cleanup_removes_only_what_the_run_left(tmp_path):
    """A file that existed before, or that a living process holds, is not the run's: only the rest goes."""
    tag = uuid.uuid4().hex
    before_file, left, held = (SHM / f"ar-test-{tag}-{n}" for n in ("before", "left", "held"))
    work = tmp_path / "work"
    (work / "tmp").mkdir(parents=True)
    guard = None
    try:
        before_file.write_text("another program's")
        # held until the check: a parallel test's driver takes a closed file new to its run for its own (README)
        guard = open(before_file)
        snapshot = shm_entries()
        left.write_text("a run's weights")
        held.write_text("a concurrent run's")
        with open(held) as holder:
            guard.close()
            remove_run_files(work, snapshot)
            assert holder.read() == "a concurrent run's"
        assert not left.exists() and not work.exists()
        assert before_file.exists() and held.exists()
    finally:
        if guard is not None:
            guard.close()
        for path in (before_file, left, held):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- through the real driver
WRITER = """
    weights = ("WEIGHTS" + "-MARK\\n").encode() * 1000  # the mark is not in the source: the prompt shows train.py
    SHM.write_bytes(weights)  # for the next experiment's warm start
    (Path.cwd() / "weights.pt").write_bytes(weights)
    print("WROTE", flush=True)
"""
READER = """
    def first_line(path):
        try:
            with open(path, "rb") as f:
                return f.read(300).split(b"\\n")[0].decode(errors="replace")
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror}"
    runs = REPO / "runs" / TAG
    seen = {"shadow": first_line("/etc/shadow"), "driver": first_line(f"/proc/{os.getppid()}/cmdline"),
            "init": first_line("/proc/1/environ"), "notes": first_line(REPO / "notes.txt"),
            "git": first_line(REPO / ".git" / "config"), "kept": first_line(runs / "1" / "submission.pt"),
            "work": first_line(runs / "1" / "work" / "weights.pt"), "shm": first_line(SHM)}
    for name, text in seen.items():
        print(f"READ {name}: {text}", flush=True)
    raise RuntimeError("; ".join(f"{name}={text[:60]}" for name, text in seen.items()))
"""


def attack_reply(body: str, shm: Path, description: str) -> str:
    """A whole-file reply: the stand-in train.py with `body` run first in main()."""
    text = (STANDIN / "train.py").read_text()
    head = f"TAG, SHM = {TAG!r}, Path({str(shm)!r})\n\n\ndef main() -> None:\n"
    text = text.replace("def main() -> None:\n", head + body.strip("\n") + "\n", 1)
    return f"DESCRIPTION: {description}\n<<<<<<< FILE\n{text}>>>>>>> FILE\n"


def test_a_crash_tail_carries_nothing_readable_and_nothing_carries_over(needs_landlock, repo, llm):
    """Experiment 1 writes /dev/shm and its work/ (and is kept); experiment 2 reads what the issue saw leak
    (/etc/shadow, the driver's command line) and what would carry over (experiment 1's work/ and /dev/shm
    files, the kept submission), prints it all and crashes with it in its last line. Its row and the next
    prompt carry only refusals; no work/ folder and no /dev/shm file is left."""
    shm = SHM / f"ar-trust-{uuid.uuid4().hex}"
    try:
        with git.Repo(repo).config_writer() as cfg:
            cfg.set_value('remote "origin"', "url", "https://user:ghp_secret@example.com/r.git")
        writer = attack_reply(WRITER, shm, "write weights for later").replace("PPL = 20.0", "PPL = 19.0")
        llm.push(writer, attack_reply(READER, shm, "read what earlier runs left"))
        done = run_agent(repo, llm.url, "--max-experiments", "3", "--no-pipeline", "--max-failures", "9",
                         "--llm-timeout", "31415")  # a mark of the driver's command line
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        rows = ledger(repo).set_index("experiment")
        assert rows.loc[1, "status"] == "keep" and rows.loc[2, "status"] == "crash", rows[["status", "reason"]]
        assert "WROTE" in (repo / "runs" / TAG / "1" / "train.log").read_text()
        log = (repo / "runs" / TAG / "2" / "train.log").read_text()
        crash_row, prompt = rows.loc[2, "reason"], json.dumps(llm.requests[2])
        assert "READ shadow" in log and "shadow=" in crash_row and "READ shadow" in prompt  # the tail is still sent
        for name in ("shadow", "driver", "init", "notes", "git", "kept"):
            assert f"READ {name}: PermissionError" in log, (name, log[-3000:])
        assert "READ work: FileNotFoundError" in log and "READ shm: FileNotFoundError" in log  # removed after run 1
        leaks = ["root:", "31415", "llm-timeout", "untracked notes", "ghp_secret", "WEIGHTS-MARK", '"ppl"']
        for text in (crash_row, prompt, log):
            assert not [leak for leak in leaks if leak in text], text[-3000:]
        assert not list((repo / "runs" / TAG).glob("*/work*")), "a work folder was left"
        assert not shm.exists()
        assert check_invariants(repo) == []
    finally:
        shm.unlink(missing_ok=True)


def test_a_killed_driver_removes_the_runs_leftovers_at_its_restart(needs_landlock, repo, llm):
    """The driver dies during a run: at its restart, once that run's processes are ended, its work/ folder and
    its /dev/shm file go (a later run's cleanup would not take a file older than its own start)."""
    prefix = f"ar-trust-{uuid.uuid4().hex}"
    body = """
    path = Path(str(SHM) + f"-{os.getpid()}")
    held = open(path, "wb")  # held open, as torch holds its shared memory: another test's driver, whose run
    held.write(b"weights")   # ended meanwhile, removed a closed file created during its run (a CI run)
    held.flush()
    (Path.cwd() / "weights.pt").write_bytes(b"weights")
    print("WROTE", path, flush=True)
    time.sleep(60)
"""
    try:
        llm.push(attack_reply(body, SHM / prefix, "write, then train for long"))
        proc = start_agent(repo, llm.url, "--max-experiments", "1", "--timeout", "120")  # never ends on its own
        log = repo / "runs" / TAG / "1" / "train.log"
        end, found = time.time() + 120, None
        while time.time() < end and not found:
            found = log.exists() and re.search(r"WROTE (\S+)\n", log.read_text())
            time.sleep(0.1)
        written = Path(found.group(1))
        assert written.exists() and (repo / "runs" / TAG / "1" / "work" / "weights.pt").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = run_agent(repo, llm.url, "--max-experiments", "0", "--timeout", "2")
        assert done.returncode == 0, done.stdout[-3000:]
        assert not written.exists(), "the killed run's /dev/shm file was left"
        assert not list((repo / "runs" / TAG).glob("*/work*"))
    finally:
        for path in SHM.glob(f"{prefix}*"):
            path.unlink()
