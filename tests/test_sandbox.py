"""sandbox.py: real Landlock on this kernel, real child processes started through wrap().

Each confinement check also runs its probe unsandboxed (the control), so a sandbox that does
nothing fails the test. Skipped with a reason where the kernel has no Landlock; CI sets
AR_REQUIRE_ASSETS=1, where that is a failure instead."""
import json
import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import sandbox
from conftest import REQUIRE_ASSETS, ROOT

# Imported by every probe: attempt() turns an action into "allowed" or the errno's name.
PRELUDE = """
import errno, json, os, signal, socket, subprocess, sys
def attempt(fn, *args):
    try:
        fn(*args)
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def read(path):
    with open(path, "rb") as f:
        return f.read()
def write(path):
    with open(path, "w") as f:
        f.write("x")
"""
DENIED = {"EACCES", "EPERM"}

# An unsandboxed parent with a secret in its environment: runs the child argv given as JSON,
# then reports that it is still alive (a SIGTERM that got through would kill it first).
PARENT = """
import json, subprocess, sys
child = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
sys.stderr.write(child.stderr)
print(child.stdout.strip())
print("parent alive")
"""


@pytest.fixture
def needs_landlock():
    if sandbox.landlock_abi() == 0:
        reason = "this kernel has no Landlock (see /sys/kernel/security/lsm)"
        if REQUIRE_ASSETS:
            pytest.fail(reason + " (AR_REQUIRE_ASSETS=1)")
        pytest.skip(reason)


def probe(code: str, read=(), write=(), sandboxed=True, env=None, timeout=60, read_nofollow=()) -> tuple[dict, str]:
    """Run PRELUDE + code in a fresh Python (through wrap() when sandboxed); the code prints one
    JSON object as its last line. Returns (that object, stderr)."""
    cmd = [sys.executable, "-c", PRELUDE + code]
    argv = sandbox.wrap(cmd, list(read), list(write), list(read_nofollow)) if sandboxed else cmd
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture
def folders(tmp_path) -> dict:
    """allowed/ (read), run/ (write), secret/ and outside/ (neither), each with a file."""
    paths = {name: tmp_path / name for name in ("allowed", "run", "secret", "outside")}
    for name, path in paths.items():
        path.mkdir()
        (path / "file.txt").write_text(f"{name} content")
    return paths


def test_wrap_builds_the_cli_argv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sandbox.wrap(["python", "train.py"], [Path("data")], [Path("runs/1")]) == [
        sys.executable, "-I", str(ROOT / "sandbox.py"), "--read", str(tmp_path / "data"),
        "--write", str(tmp_path / "runs" / "1"), "--", "python", "train.py"]


def test_reads_only_allowed_paths_and_logs_the_abi(needs_landlock, folders):
    code = f"""print(json.dumps({{"allowed": attempt(read, {str(folders['allowed'] / 'file.txt')!r}),
        "secret": attempt(read, {str(folders['secret'] / 'file.txt')!r}),
        "list_secret": attempt(os.listdir, {str(folders['secret'])!r})}}))"""
    inside, stderr = probe(code, read=[folders["allowed"]], write=[folders["run"]])
    assert inside["allowed"] == "allowed"
    assert inside["secret"] in DENIED and inside["list_secret"] in DENIED
    assert f"sandbox: Landlock ABI {sandbox.landlock_abi()}; write: " in stderr
    outside, _ = probe(code, sandboxed=False)
    assert outside == {"allowed": "allowed", "secret": "allowed", "list_secret": "allowed"}


def test_reads_hub_snapshot_through_its_symlinks(needs_landlock, tmp_path):
    """A hub snapshot is a folder of symlinks into ../../blobs: giving the snapshot is enough."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (blobs / "1234").write_text("{}")
    (blobs / "unlinked").write_text("other")
    (snapshot / "config.json").symlink_to("../../blobs/1234")
    code = f"""print(json.dumps({{"linked": attempt(read, {str(snapshot / 'config.json')!r}),
        "unlinked": attempt(read, {str(blobs / 'unlinked')!r})}}))"""
    inside, _ = probe(code, read=[snapshot])
    assert inside["linked"] == "allowed" and inside["unlinked"] in DENIED


def test_links_in_a_nofollow_folder_open_nothing(needs_landlock, tmp_path):
    """The repository is read-only but not link-followed: a link an earlier run planted in runs/ must
    not make its target (the validation data) readable."""
    repo, secret = tmp_path / "repo", tmp_path / "valid"
    (repo / "runs").mkdir(parents=True)
    secret.mkdir()
    (secret / "wiki.valid.raw").write_text("validation text")
    (repo / "train.py").write_text("x = 1\n")
    (repo / "runs" / "link").symlink_to(secret / "wiki.valid.raw")
    code = f"""print(json.dumps({{"own": attempt(read, {str(repo / 'train.py')!r}),
        "via_link": attempt(read, {str(repo / 'runs' / 'link')!r})}}))"""
    inside, _ = probe(code, read_nofollow=[repo])
    assert inside["own"] == "allowed" and inside["via_link"] in DENIED
    followed, _ = probe(code, read=[repo])  # the control: a followed read path opens the target
    assert followed["via_link"] == "allowed"


def test_writes_only_inside_write_paths(needs_landlock, folders):
    run, tag = folders["run"], uuid.uuid4().hex
    outside = [folders["outside"] / "new.txt", Path.home() / f".ar_sandbox_probe_{tag}", ROOT / f".ar_sandbox_probe_{tag}"]
    code = f"""run = {str(run)!r}
def create_tree():
    os.makedirs(run + "/sub/deeper")
    write(run + "/sub/deeper/f.txt")
    os.rename(run + "/sub/deeper/f.txt", run + "/g.txt")
    os.remove(run + "/file.txt")
print(json.dumps({{"inside": attempt(create_tree),
    "outside": [attempt(write, p) for p in {[str(p) for p in outside]!r}],
    "mkdir_outside": attempt(os.mkdir, {str(folders['outside'] / 'd')!r}),
    "overwrite_allowed": attempt(write, {str(folders['allowed'] / 'file.txt')!r})}}))"""
    try:
        inside, _ = probe(code, read=[folders["allowed"]], write=[run])
    finally:
        for path in outside[1:]:
            path.unlink(missing_ok=True)
    assert inside["inside"] == "allowed" and (run / "g.txt").read_text() == "x"
    assert all(result in DENIED for result in inside["outside"]), inside
    assert inside["mkdir_outside"] in DENIED and inside["overwrite_allowed"] in DENIED
    assert not any(p.exists() for p in outside) and (folders["allowed"] / "file.txt").read_text() == "allowed content"


def test_link_and_rename_across_rules_denied(needs_landlock, folders):
    """REFER: hard-linking a read-only (or unreadable) file into the run folder would make it
    writable there; renaming out of the run folder would move a file where it cannot be written."""
    code = f"""a, s, r, o = {str(folders['allowed'])!r}, {str(folders['secret'])!r}, {str(folders['run'])!r}, {str(folders['outside'])!r}
print(json.dumps({{"link_readonly": attempt(os.link, a + "/file.txt", r + "/l1"),
    "link_secret": attempt(os.link, s + "/file.txt", r + "/l2"),
    "rename_in": attempt(os.rename, a + "/file.txt", r + "/l3"),
    "rename_out": attempt(os.rename, r + "/file.txt", o + "/moved")}}))"""
    inside, _ = probe(code, read=[folders["allowed"]], write=[folders["run"]])
    assert all(result in DENIED | {"EXDEV"} for result in inside.values()), inside
    outside, _ = probe(code, sandboxed=False)
    assert set(outside.values()) == {"allowed"}


# Device nodes root may open by its ownership alone (no capability needed), harmless to open read-only
# in the unsandboxed control; one of them exists on any Linux, with or without block devices.
ROOT_CHAR_DEVICES = ("/dev/kmsg", "/dev/ptmx", "/dev/loop-control", "/dev/cpu_dma_latency")


@pytest.mark.skipif(os.geteuid() != 0, reason="checks what root could do; a non-root user cannot anyway")
def test_root_loses_capabilities_raw_disk_and_device_nodes(needs_landlock, folders):
    """As root without capabilities, file ownership still opens root's 0600 device nodes: only the sandbox's
    rules keep them shut. The targets always exist: a block node this test makes (a stand-in raw disk,
    for machines without block devices), the real ones in /dev, and root's character devices."""
    disk = folders["outside"] / "disk"
    os.mknod(disk, stat.S_IFBLK | 0o600, os.makedev(7, 0))  # loop0: ENXIO, not a denial, where it is missing
    disks = [str(disk)] + sorted(str(p) for p in Path("/dev").iterdir() if p.is_block_device())[:2]
    chars = [d for d in ROOT_CHAR_DEVICES if Path(d).is_char_device()]
    assert chars, f"none of {ROOT_CHAR_DEVICES} on this machine: nothing to check the /dev rule with"
    code = f"""import stat
status = read("/proc/self/status").decode()
flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
print(json.dumps({{"cap_eff": status.split("CapEff:")[1].split()[0], "cap_prm": status.split("CapPrm:")[1].split()[0],
    "mknod": attempt(os.mknod, {str(folders['run'] / 'disk')!r}, stat.S_IFBLK | 0o600, os.makedev(7, 0)),
    "disks": [attempt(os.open, d, flags) for d in {disks!r}], "chars": [attempt(os.open, d, flags) for d in {chars!r}],
    "null": attempt(write, "/dev/null"), "urandom": attempt(os.open, "/dev/urandom", flags)}}))"""
    inside, stderr = probe(code, write=[folders["run"]])
    assert int(inside["cap_eff"], 16) == 0 and int(inside["cap_prm"], 16) == 0 and "root without capabilities" in stderr
    assert inside["mknod"] == "EACCES", inside  # Landlock (EACCES) checks before the capability (EPERM)
    opened = dict(zip(disks + chars, inside["disks"] + inside["chars"]))
    assert set(opened.values()) <= DENIED, opened
    assert inside["null"] == "allowed" and inside["urandom"] == "allowed", inside  # the nodes the policy opens
    outside, _ = probe(code, sandboxed=False)
    assert int(outside["cap_eff"], 16) != 0 and outside["mknod"] == "allowed"
    assert not set(outside["disks"] + outside["chars"]) & DENIED, outside  # the control: only the sandbox denies


# Sets the inheritable capabilities to the effective ones, then execs argv: for root, the
# inheritable set survives an empty bounding set at exec unless "root is special" is turned off.
WITH_INHERITABLE_CAPS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()  # capability v3, this process
assert libc.capget(header, data) == 0
data[2], data[5] = data[0], data[3]  # inheritable = effective
assert libc.capset(header, data) == 0, ctypes.get_errno()
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="checks what root could do; a non-root user cannot anyway")
def test_root_with_inheritable_capabilities_still_gets_none(needs_landlock):
    argv = sandbox.wrap(["grep", "^Cap[IPE]", "/proc/self/status"], [], [])
    done = subprocess.run([sys.executable, "-c", WITH_INHERITABLE_CAPS, *argv], capture_output=True, text=True, timeout=60)
    caps = dict(line.split(":") for line in done.stdout.split("\n") if line)
    assert int(caps["CapInh"], 16) != 0, done.stderr  # the launcher worked
    assert int(caps["CapPrm"], 16) == 0 and int(caps["CapEff"], 16) == 0, caps


def test_tcp_connect_and_bind_denied(needs_landlock):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"""def connect():
    socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
def bind():
    socket.socket().bind(("127.0.0.1", 0))
print(json.dumps({{"connect": attempt(connect), "bind": attempt(bind)}}))"""
        inside, _ = probe(code)
        assert inside["connect"] in DENIED and inside["bind"] in DENIED
        with pytest.raises(BlockingIOError):
            listener.accept()  # the listener saw no connection
        outside, _ = probe(code, sandboxed=False)
        assert outside == {"connect": "allowed", "bind": "allowed"}


def test_abstract_unix_socket_outside_denied(needs_landlock):
    name = f"\0ar-sandbox-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen()
        code = f"""def connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect({name!r})
print(json.dumps({{"connect": attempt(connect)}}))"""
        inside, _ = probe(code)
        assert inside["connect"] in DENIED
        assert probe(code, sandboxed=False)[0]["connect"] == "allowed"


def run_under_parent(child: list[str], secret: str) -> list[str]:
    """Run `child` under an unsandboxed PARENT that has `secret` in its environment."""
    env = {**os.environ, "AR_TEST_SECRET": secret}
    done = subprocess.run([sys.executable, "-c", PARENT, json.dumps(child)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


SIGNALS_AND_ENVIRON = """
parent = os.getppid()
grandparent = int(sys.argv[2])  # the test process (its /proc/<pid>/stat is closed inside the sandbox)
def kill_own_child():
    child = subprocess.Popen(["sleep", "30"])
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=10) == -signal.SIGTERM
def environ_has_secret(pid):
    return "AR_TEST_SECRET=" + sys.argv[1] in read(f"/proc/{pid}/environ").decode(errors="replace")
print(json.dumps({"own_child": attempt(kill_own_child),
    "signal_grandparent": attempt(os.kill, grandparent, 0),
    "parent_environ": attempt(environ_has_secret, parent),
    "grandparent_environ": attempt(read, f"/proc/{grandparent}/environ"),
    "parent_secret_seen": environ_has_secret(parent) if attempt(read, f"/proc/{parent}/environ") == "allowed" else False,
    "term_parent": attempt(os.kill, parent, signal.SIGTERM) if sys.argv[3] == "sandboxed" else None}))
"""


def test_signals_and_proc_environ_scoped(needs_landlock, tmp_path):
    """The sandboxed child cannot signal its parent or the test process, nor read their
    /proc/PID/environ (ptrace access outside the domain is denied), but can signal its own child."""
    secret = uuid.uuid4().hex
    child = [sys.executable, "-c", PRELUDE + SIGNALS_AND_ENVIRON, secret, str(os.getpid())]
    lines = run_under_parent(sandbox.wrap(child + ["sandboxed"], [], [tmp_path]), secret)
    assert lines[-1] == "parent alive"
    inside = json.loads(lines[-2])
    assert inside["own_child"] == "allowed"
    assert inside["signal_grandparent"] in DENIED and inside["term_parent"] in DENIED, inside
    assert inside["parent_environ"] in DENIED and inside["grandparent_environ"] in DENIED
    assert inside["parent_secret_seen"] is False
    # The control: unsandboxed, the same child reads the secret and may signal the test process.
    outside = json.loads(run_under_parent(child + ["control"], secret)[-2])
    assert outside["parent_secret_seen"] is True and outside["signal_grandparent"] == "allowed"


def test_grandchild_is_equally_confined(needs_landlock, folders):
    grandchild = f"""print(json.dumps({{"secret": attempt(read, {str(folders['secret'] / 'file.txt')!r}),
    "write_outside": attempt(write, {str(folders['outside'] / 'g.txt')!r}),
    "connect": attempt(socket.create_connection, ("127.0.0.1", 9), 5),
    "write_run": attempt(write, {str(folders['run'] / 'g.txt')!r})}}))"""
    code = f"""out = subprocess.run([sys.executable, "-c", {PRELUDE + grandchild!r}], capture_output=True, text=True)
print(out.stdout.strip().splitlines()[-1])"""
    inside, _ = probe(code, write=[folders["run"]])
    assert inside["write_run"] == "allowed"
    assert {inside["secret"], inside["write_outside"], inside["connect"]} <= DENIED, inside


def test_torch_and_transformers_work_inside(needs_landlock, tmp_path):
    code = """import torch, transformers
model = torch.nn.Linear(8, 4)
loss = model(torch.randn(2, 8)).pow(2).sum()
loss.backward()
shared = torch.zeros(4).share_memory_()  # torch multiprocessing's tensors live in /dev/shm
print(json.dumps({"grad": bool(torch.isfinite(model.weight.grad).all()), "transformers": transformers.__version__}))"""
    # Without a writable TMPDIR, `import torch` fails (dill asks tempfile for a usable folder).
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    inside, _ = probe(code, write=[tmp_path], env=env, timeout=300)
    assert inside["grad"] is True


def test_simulated_old_abi_masks_newer_rights(needs_landlock, folders):
    """ABI 3 knows neither TCP (4) nor scopes (6): the ruleset still applies, without them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        code = f"""print(json.dumps({{"connect": attempt(socket.create_connection, ("127.0.0.1", {listener.getsockname()[1]}), 5),
            "secret": attempt(read, {str(folders['secret'] / 'file.txt')!r})}}))"""
        inside, stderr = probe(code, env={**os.environ, "AR_TEST_LANDLOCK_ABI": "3"})
    assert "sandbox: Landlock ABI 3;" in stderr and "TCP not restricted (needs ABI 4)" in stderr
    assert inside["connect"] == "allowed" and inside["secret"] in DENIED


def test_cli_refuses_to_run_without_landlock(tmp_path):
    marker = tmp_path / "ran"
    argv = sandbox.wrap([sys.executable, "-c", f"open({str(marker)!r}, 'w')"], [], [tmp_path])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AR_TEST_LANDLOCK_ABI": "0"})
    assert done.returncode == sandbox.EXIT_NO_SANDBOX
    assert "Landlock is unavailable (ABI 0); refusing to run" in done.stderr
    assert not marker.exists()
