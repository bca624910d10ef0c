"""driver/worker.py alone: what a Ray task does on a host before it can run an experiment (no Ray needed here)."""
import json
import subprocess
import sys
from pathlib import Path

from driver import worker

# a harness whose caches are missing until `python prepare.py` runs; it counts its runs
PREPARE = '''import json, sys, time
from pathlib import Path
here = Path(__file__).resolve().parent
ready = here.parent / "prepared"
if sys.argv[1:] == ["sandbox-info", "--json"]:
    if not ready.exists():
        sys.exit("model missing: run `python prepare.py`")
    print(json.dumps({"train_read": [str(ready)], "eval_private": [], "model": {}, "tokens": {}}))
elif sys.argv[1:] == []:
    time.sleep(0.5)  # long enough for the other task to arrive while this one prepares
    with open(here.parent / "prepare-runs", "a") as f:
        f.write("1")
    ready.write_text("model")
else:
    sys.exit(f"bad arguments {sys.argv[1:]}")
'''


def host_with_harness(tmp_path: Path, prepare: str = PREPARE) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "prepare.py").write_text(prepare)
    return tree


def test_the_first_task_on_a_host_prepares_it_once_and_the_others_wait(tmp_path):
    tree = host_with_harness(tmp_path)
    env_dir = tmp_path / "host-cache"
    # two tasks at once, as two Ray worker processes on one host
    code = ("import sys, json, worker; from pathlib import Path; "
            "print(json.dumps(worker.harness(Path(sys.argv[1]))))")
    env = {"AR_WORKER_DIR": str(env_dir), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(worker.__file__).parent)}
    tasks = [subprocess.Popen([sys.executable, "-c", code, str(tree)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [json.loads(t.communicate(timeout=120)[0].strip().splitlines()[-1]) for t in tasks]
    assert all(o["train_read"] == [str(tmp_path / "prepared")] for o in outputs)
    assert (tmp_path / "prepare-runs").read_text() == "1", "prepared more than once"


def test_a_host_that_cannot_prepare_says_what_to_set(tmp_path, monkeypatch):
    tree = host_with_harness(tmp_path, "import sys; sys.exit('no model here')\n")
    monkeypatch.setattr(worker, "HOST_DIR", tmp_path / "host-cache")
    try:
        worker.harness(tree)
    except worker.HostError as exc:
        assert "no model here" in str(exc) and "AR_MODEL" in str(exc)
    else:
        raise AssertionError("no HostError")


def run_experiment_in_a_worker_process(spec: dict, host_dir: Path) -> dict:
    """worker.run_experiment in a process of its own, as in a Ray worker: it hardens the process it runs in
    (a subreaper, non-dumpable), which must never be pytest's own (conftest.the_pytest_process_stays_plain)."""
    code = "import json, sys, worker; print(json.dumps(worker.run_experiment(json.loads(sys.argv[1]))))"
    env = {"AR_WORKER_DIR": str(host_dir), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(worker.__file__).parent)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_different_prepare_py_on_the_host_is_refused_before_anything_runs(tmp_path):
    tree = host_with_harness(tmp_path)
    spec = {"experiment": 3, "label": "", "tree": str(tree), "shared_disk": True, "driver_host": "elsewhere",
            "prepare_sha256": "0" * 64, "sandbox": "auto"}
    result = run_experiment_in_a_worker_process(spec, tmp_path / "host-cache")
    assert result["status"] == "crash" and "prepare.py on" in result["reason"] and "differs" in result["reason"]
    assert result["node"] == "", "outside Ray, naming the node started a local Ray instance"
    assert not (tmp_path / "prepare-runs").exists()


def test_file_names_that_leave_the_folder_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "HOST_DIR", tmp_path / "host-cache")
    spec = {"experiment": 1, "shared_disk": False, "key": "k", "files": {"../../escaped.py": "x = 1\n"}}
    try:
        worker.host_tree(spec)
    except worker.HostError as exc:
        assert "outside its folder" in str(exc)
    else:
        raise AssertionError("no HostError")
    assert not list(tmp_path.rglob("escaped.py"))


def test_a_run_left_by_a_killed_driver_is_ended_before_its_folder_is_reused(tmp_path):
    """--ray: a driver killed with its job leaves the run's train.py on the host, where the restarted driver cannot
    reach it; the task that runs the experiment again ends it by its marker before reusing its folder."""
    import hashlib
    import os
    import psutil
    host = tmp_path / "host-cache"
    folder = host / "k" / "4"
    folder.mkdir(parents=True)
    leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                env={**os.environ, "AR_RUN_ID": "left-by-a-killed-driver"}, start_new_session=True)
    try:
        (folder / "child.pid").write_text(json.dumps({"run_id": "left-by-a-killed-driver", "boot": psutil.boot_time()}))
        spec = {"experiment": 4, "label": "", "shared_disk": False, "key": "k", "files": {"prepare.py": PREPARE},
                "driver_host": "elsewhere", "prepare_sha256": hashlib.sha256(PREPARE.encode()).hexdigest(),
                "sandbox": "off", "timeout": 5, "eval_timeout": 5, "eval_windows": None, "model_expected": "{}",
                "tokens_expected": ""}
        run_experiment_in_a_worker_process(spec, host)
        assert leftover.wait(timeout=10) == -9, "the earlier run still runs beside the new one"
    finally:
        leftover.kill()
        leftover.wait()
