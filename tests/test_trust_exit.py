"""Issue 19, items 5 and 7: the scored bytes are the submission's bytes when train.py exits, and a run that
exhausts a resource (processes, memory, disk) ends as a `crash` row naming the cause, with the machine
usable and no ledger row lost. The real driver against the stand-in train.py/prepare.py, under Landlock."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import git
import pytest

import sandbox

from driver_helpers import (AGENT, STANDIN, TAG, agent_env, check_invariants, edit, ledger, make_research_repo,
                            processes_in, run_agent)

MAIN = 'if __name__ == "__main__":\n    main()'


def new_main(body: str) -> str:
    """train.py's last lines running `body` (its module scope: os, subprocess, sys, time imported) instead of main()."""
    return 'if __name__ == "__main__":\n' + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")


def replace_main(description: str, body: str) -> str:
    return edit(MAIN, new_main(body), description)


# ---------------------------------------------------------------- item 5: the scored bytes are the bytes at exit
# A child that ignores SIGTERM maps the submission shared and dirties every page while train.py runs; once
# train.py has exited it rewrites the mapping: writes through dirty pages do not move the file's ctime.
MMAP_REWRITER = """
import mmap, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0)
m[:] = m[:]  # every page dirty now, before train.py exits
parent = os.getppid()
open(sys.argv[1] + ".ready", "w").close()
while os.getppid() == parent:
    pass
time.sleep(PAUSE)
m[:] = m[:].replace(b"20.0", b"10.0")
m.flush()
time.sleep(60)
"""



def mmap_attack(pause: float) -> str:
    """train.py's end: submit, start the rewriter (it rewrites `pause` s after train.py exits), exit."""
    return f"""
main()
path = os.environ["AR_SUBMISSION"]
subprocess.Popen([sys.executable, "-c", {MMAP_REWRITER.replace("PAUSE", str(pause))!r}, path])
while not os.path.exists(path + ".ready"):
    time.sleep(0.01)
"""


MMAP_ATTACK = mmap_attack(0.5)
HELD = "left behind held the submission open for writing or mapped shared"


def test_a_child_rewriting_the_submission_through_a_shared_mapping_after_exit_is_not_scored(repo, llm):
    llm.push(replace_main("rewrite the submission after exit", MMAP_ATTACK))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    attack = ledger(repo).iloc[1]  # before the fix: scored 10.0 and kept
    assert attack["status"] == "crash" and HELD in attack["reason"], attack.to_dict()
    assert processes_in(repo) == []
    assert check_invariants(repo) == []


def test_a_child_rewriting_the_submission_the_instant_train_py_exits_is_not_scored(repo, llm):
    """The same child without the pause: it rewrites the mapping the instant train.py is gone, before any kill
    can reach it. That it held the submission at the exit is what gives it away."""
    llm.push(replace_main("rewrite the submission at exit", mmap_attack(0)))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    attack = ledger(repo).iloc[1]
    assert attack["status"] == "crash" and HELD in attack["reason"], attack.to_dict()
    assert processes_in(repo) == []
    assert check_invariants(repo) == []


# a stray that holds nothing of the submission and ignores SIGTERM: it says every 50 ms that it still lives, in
# train.log (it keeps train.py's stdout; the driver removes work/ after the run)
HARMLESS_STRAY = """
main()
stray = "import signal, time\\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True:\\n    print('alive', repr(time.time()), flush=True)\\n    time.sleep(0.05)"
subprocess.Popen([sys.executable, "-c", stray], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
print("exited", repr(time.time()), flush=True)
"""


def test_a_stray_after_a_clean_exit_is_killed_at_once_and_the_run_is_scored(repo, llm):
    """The grace period is for train.py at its deadline: a stray of a clean exit gets none (it used to live
    KILL_GRACE_S more), and one that holds nothing of the submission does not cost the run its score."""
    llm.push(edit("PPL = 20.0", "PPL = 19.0", "a gain, and a stray")
             + f"<<<<<<< SEARCH\n{MAIN}\n=======\n{new_main(HARMLESS_STRAY)}\n>>>>>>> REPLACE\n")
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = ledger(repo).iloc[1]
    assert row["status"] == "keep" and row["val_ppl"] == 19.0, row.to_dict()
    said = {}  # the last time each said it: the stray, alive; train.py, that it exits
    for line in (repo / "runs" / TAG / "1" / "train.log").read_text().splitlines():
        if line.split(" ")[0] in ("alive", "exited"):
            said[line.split(" ")[0]] = float(line.split(" ")[1])
    assert said.keys() == {"alive", "exited"}, said
    outlived = said["alive"] - said["exited"]
    assert outlived < 1.0, f"the stray lived {outlived:.1f} s past train.py's exit"
    assert processes_in(repo) == []


def test_a_submission_that_changes_while_it_is_scored_is_a_crash(repo, llm):
    """The digest taken at exit is checked again after scoring: here an evaluator that appends to the file
    it scores (nothing else can reach the driver's copy) stands for any change between the two."""
    prepare = repo / "prepare.py"
    prepare.write_text(prepare.read_text().replace("        sub = json.load(open(args[1]))\n",
                                                   "        sub = json.load(open(args[1]))\n"
                                                   "        open(args[1], 'a').write(' ')\n"))
    git.Repo(repo).git.commit("-am", "an evaluator that touches what it scores")
    done = run_agent(repo, llm.url, "--max-experiments", "0")
    assert done.returncode == 2 and "did not score" in done.stdout, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["crash"] * 3, rows
    assert rows["reason"].str.contains("changed while it was scored").all(), rows["reason"].tolist()


WORKER_RUN = """import json, sys
sys.path.insert(0, sys.argv[2])
from driver import worker
print(json.dumps(worker.run_experiment(json.loads(sys.argv[1]))))
"""


def test_the_worker_scores_the_bytes_at_exit_too(tmp_path):
    """worker.run_experiment (--workers, --ray) shares run_outcome: the same attack, without Ray."""
    tree = tmp_path / "host" / "1" / "tree"
    tree.mkdir(parents=True)
    shutil.copy(STANDIN / "prepare.py", tree / "prepare.py")
    train = (STANDIN / "train.py").read_text()
    (tree / "train.py").write_text(train.replace(MAIN, new_main(MMAP_ATTACK)))
    spec = {"experiment": 1, "label": "", "tree": str(tree), "shared_disk": True, "driver_host": "elsewhere",
            "prepare_sha256": hashlib.sha256((tree / "prepare.py").read_bytes()).hexdigest(), "sandbox": "auto",
            "timeout": 20, "model_expected": "{}", "tokens_expected": "", "eval_windows": None, "eval_timeout": 60}
    done = subprocess.run([sys.executable, "-c", WORKER_RUN, json.dumps(spec), str(AGENT.parent)], cwd=tmp_path,
                          env=agent_env(AR_WORKER_DIR=str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "crash" and HELD in result["reason"] and "val_ppl" not in result, result
    assert processes_in(tmp_path) == []


# ---------------------------------------------------------------- item 7: resource exhaustion
# Each attack is bounded, so that a watchdog that regressed cannot take the shared test machine down: the
# run then times out (the test fails) and the driver's kill ends what it started.
FORK_BOMB = """
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for generation in range(8):  # every process forks once a generation: 2**8 processes at most
    if os.fork() == 0 and generation % 2:
        os.setsid()  # half of them leave train.py's process group
    time.sleep(0.05)
time.sleep(60)
"""

SELF_KILL = """
import signal
os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
"""

MEMORY_HOG = """
hoard = []
for _ in range(12):  # 768 MB at most
    hoard.append(bytearray(b"x") * (64 << 20))
    time.sleep(0.1)
time.sleep(60)
"""


def test_a_fork_bomb_is_a_crash_row_and_leaves_nothing_running(repo, llm):
    llm.push(replace_main("a fork bomb", FORK_BOMB), edit("PPL = 20.0", "PPL = 19.0", "an honest gain"))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--no-pipeline", AR_MAX_RUN_TASKS="40")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "crash", "keep"], rows
    assert "fork bomb" in rows.iloc[1]["reason"] and "AR_MAX_RUN_TASKS" in rows.iloc[1]["reason"], rows.iloc[1]["reason"]
    assert processes_in(repo) == []
    assert check_invariants(repo) == []


def test_a_run_over_its_memory_limit_is_a_crash_row(repo, llm):
    llm.push(replace_main("hoard memory", MEMORY_HOG), replace_main("die as the OOM killer kills", SELF_KILL),
             edit("PPL = 20.0", "PPL = 19.0", "an honest gain"))
    done = run_agent(repo, llm.url, "--max-experiments", "3", "--no-pipeline", AR_RUN_MEMORY_MB="200")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "crash", "crash", "keep"], rows
    assert "AR_RUN_MEMORY_MB" in rows.iloc[1]["reason"], rows.iloc[1]["reason"]
    assert "out-of-memory killer" in rows.iloc[2]["reason"], rows.iloc[2]["reason"]
    assert processes_in(repo) == []
    assert check_invariants(repo) == []


def test_a_machine_short_of_memory_stops_the_run_and_says_so(repo, llm):
    """The machine-wide guard: a reserve above what the machine has stops every run (the baseline here,
    three times, which ends the night with its reason). The run lasts a second: the watchdog looks every 0.2 s."""
    train = repo / "train.py"
    train.write_text(train.read_text().replace("SLEEP_S = 0.0", "SLEEP_S = 1.0"))
    git.Repo(repo).git.commit("-am", "a baseline that lasts")
    done = run_agent(repo, llm.url, "--max-experiments", "0", AR_MEMORY_RESERVE_MB=str(10**9))
    assert done.returncode == 2 and "ran out of memory" in done.stdout, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["crash"] * 3 and rows["reason"].str.contains("AR_MEMORY_RESERVE_MB").all(), rows


@pytest.mark.parametrize("landlock", [True, False], ids=["landlock", "unsandboxed"])
def test_out_of_memory_the_kernel_kills_the_run_first(tmp_path, landlock):
    """The command and its children. A child's value is read here, from outside: under Landlock a child of the
    command reads no /proc/<pid>, not even its own."""
    probe = [sys.executable, "-c", "import subprocess, sys; child = subprocess.Popen(['sleep', '60']); "
                                   "print('oom', open('/proc/self/oom_score_adj').read().strip(), 'child', child.pid, "
                                   "flush=True); sys.stdin.readline(); child.kill()"]
    cmd = sandbox.wrap(probe, read=[], write=[tmp_path]) if landlock else sandbox.wrap_unconfined(probe)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        said = proc.stdout.readline().split()  # the child lives until the probe reads a line
        child = Path(f"/proc/{said[-1]}/oom_score_adj").read_text().strip() if len(said) == 4 else ""
    finally:
        _, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0 and said[:3] == ["oom", "1000", "child"] and child == "1000", (said, child, err)


@pytest.fixture
def small_disk(tmp_path):
    """(a folder on a filesystem of DISK_MB, the reserve for the driver): a tmpfs when this test may mount one
    (root), else the test's own filesystem with the reserve set to leave only DISK_MB free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            yield disk, DISK_RESERVE_MB
        else:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize >> 20
            yield disk, free - DISK_MB + DISK_RESERVE_MB
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], check=False)


DISK_MB, DISK_RESERVE_MB = 96, 32
FILL_PACED = """
with open("fill", "wb") as f:
    for _ in range(50):  # 200 MB at most, 80 MB/s
        f.write(b"x" * (4 << 20))
        f.flush()
        time.sleep(0.05)
time.sleep(60)
"""
FILL_AT_ONCE = """
with open("fill", "wb") as f:
    for _ in range(200):  # until the disk is full, faster than the watchdog looks
        f.write(b"x" * (1 << 20))
"""


def test_a_run_that_fills_the_disk_is_a_crash_row_and_its_files_are_removed(small_disk, llm):
    disk, reserve = small_disk
    repo = make_research_repo(disk / "research")
    llm.push(replace_main("fill the disk slowly", FILL_PACED), replace_main("fill the disk at once", FILL_AT_ONCE),
             edit("PPL = 20.0", "PPL = 19.0", "an honest gain"))
    done = run_agent(repo, llm.url, "--max-experiments", "3", "--no-pipeline", AR_DISK_RESERVE_MB=str(reserve))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "crash", "crash", "keep"], rows
    for reason in rows["reason"][1:3]:
        assert "disk ran full" in reason and "AR_DISK_RESERVE_MB" in reason, reason
    assert not list((repo / "runs").rglob("fill")), "the run's files should be gone"
    assert os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize >> 20 > reserve
    assert check_invariants(repo) == []
