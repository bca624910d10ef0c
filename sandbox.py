"""Run an untrusted command (train.py) under a Linux Landlock sandbox, unprivileged.

    python -I sandbox.py --read PATH ... --write PATH ... [--read-nofollow PATH ...] [--list PATH ...] -- CMD ARGS...

applies the policy to itself, prints one line to stderr describing it, then execs CMD, which
inherits the policy with all its children. The policy: read (and execute) only the given read
paths, the Python installation and the system files listed below (programs and libraries, a dozen
files of /etc, this process's own /proc/<pid>, no other process's); list the names in --list
folders; write only the given write paths, a few devices and plain files in /dev/shm; no TCP
bind/connect; no signals or abstract unix sockets to processes outside the sandbox, which also
makes /proc/<pid>/environ of the driver unreadable (ptrace access is denied outside the domain).
When running as root, capabilities are dropped so CMD runs as uid 0 without any (with
CAP_SYS_PTRACE, root reads the driver's environ despite Landlock).

Read paths are searched for symlinks and every target becomes readable: never pass as a read path
a folder that sandboxed code could have written (an earlier run folder), or a link planted there
opens the data to the next run. Write paths are not searched.

Written on raw syscalls through ctypes (no dependency): the PyPI bindings are either fs-only
(`landlock`) or young alpha releases (`py-landlock`), and this file is small enough to audit.
"""
import ctypes
import errno
import os
import stat
import sys
from pathlib import Path

SYS_LANDLOCK_CREATE_RULESET = 444  # same numbers on x86_64 and aarch64
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28
SECBIT_NOROOT_AND_LOCK = (1 << 0) | (1 << 1)  # uid 0 gets no capability at exec, for good

# Filesystem rights, from include/uapi/linux/landlock.h.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13       # ABI 2
FS_TRUNCATE = 1 << 14    # ABI 3
FS_IOCTL_DEV = 1 << 15   # ABI 5
NET_BIND_TCP = 1 << 0    # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # valid on a file
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
# Full rights except creating device nodes: as root (no capability needed to *open* a node it
# made) a block device in the run folder would expose the raw disk.
WRITE_RIGHTS = (FS_ABI1 | FS_REFER | FS_TRUNCATE | FS_IOCTL_DEV) & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)

# What the command may read of the system besides the Python installation: programs, libraries and
# headers (Python, torch, the C compiler and linker of torch.compile on CPU, CUDA and Triton), and of
# /etc, /proc and /sys only the files they read. Not the rest of /etc (/etc/shadow: root reads it
# without any capability), not /proc/<pid> of any other process (the driver's command line), not
# /sys/firmware. /opt: NGC and conda images keep libraries there.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/opt")
ETC_READ = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/ld.so.preload",  # the dynamic loader
            "/etc/localtime", "/etc/os-release", "/etc/mime.types", "/etc/alternatives",   # cc -> gcc links
            "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")  # getpass.getuser(): no passwords in either
# /proc/self is resolved when the rule is added: /proc/<pid> of this process, which execs the command
# (same pid). Its children (compile workers, gcc) have other pids and read no /proc/<pid> at all.
PROC_READ = ("/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/loadavg", "/proc/uptime",
             "/proc/version", "/proc/filesystems", "/proc/devices", "/proc/sys", "/proc/driver/nvidia")
SYS_READ = ("/sys/devices", "/sys/bus", "/sys/class", "/sys/dev", "/sys/module", "/sys/kernel/mm", "/sys/fs/cgroup")
# /dev is listable but only these nodes readable: as root, /dev/vda (mode 0600, owner root) is
# the raw disk, readable without any capability.
DEV_LIST = "/dev"
DEV_READ = ("/dev/urandom", "/dev/random")
SYSTEM_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/dri")
# POSIX shared memory and named semaphores (glibc puts them in /dev/shm, no variable moves it): torch's
# shared tensors and the multiprocessing locks of torch.compile's worker pool, which hangs without them.
# Plain files only; the driver removes what a run created there once it has ended.
SHM = "/dev/shm"
SHM_RIGHTS = FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_MAKE_REG | FS_REMOVE_FILE
GPU_DEVICE_PREFIX = "/dev/nvidia"  # /dev/nvidia0, /dev/nvidiactl, /dev/nvidia-uvm, ...
MIN_ABI = 1  # ABI 1 already confines the filesystem; what older ABIs lack is named in the log line
EXIT_NO_SANDBOX = 3
OOM_SCORE_ADJ = 1000  # the most: out of memory, the kernel's OOM killer takes the command's processes first

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the kernel header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _kernel_abi() -> int:
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(abi), 0)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable. Honours the env var
    AR_TEST_LANDLOCK_ABI (an integer) so tests can simulate an old kernel / no Landlock."""
    abi = _kernel_abi()
    simulated = os.environ.get("AR_TEST_LANDLOCK_ABI")
    # A simulation can only lower the ABI: asking the kernel for more than it has would fail.
    return min(abi, int(simulated)) if simulated is not None else abi


def wrap(cmd: list[str], read: list[Path], write: list[Path], read_nofollow: list[Path] = (),
         list_only: list[Path] = ()) -> list[str]:
    """The argv that runs `cmd` inside the sandbox: [sys.executable, "-I", <abs path of sandbox.py>,
    "--read", p, ..., "--write", p, ..., "--", *cmd]. The caller passes that to subprocess.Popen.
    list_only: folders whose names (and their subfolders' names) may be listed, no file in them read:
    Python lists the folder of the script it runs to import the modules beside it.

    /tmp is not writable inside: give the command TMPDIR (and any cache folder it writes, e.g.
    HF_HOME, XDG_CACHE_HOME) inside a write path, or `import torch` fails."""
    argv = [sys.executable, "-I", str(Path(__file__).resolve())]
    # Absolute against the caller's cwd: Popen(cwd=...) would otherwise change their meaning.
    argv += [arg for p in read for arg in ("--read", os.path.abspath(p))]
    # a folder that earlier runs could plant links in (the repository holds runs/): its links are not
    # followed, so a link to the validation data does not make the data readable
    argv += [arg for p in read_nofollow for arg in ("--read-nofollow", os.path.abspath(p))]
    argv += [arg for p in list_only for arg in ("--list", os.path.abspath(p))]
    argv += [arg for p in write for arg in ("--write", os.path.abspath(p))]
    return argv + ["--", *cmd]


def handled_fs(abi: int) -> int:
    """Every filesystem right this ABI knows (best effort, as the kernel docs do)."""
    rights = FS_ABI1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def with_symlink_targets(paths: list[str]) -> list[str]:
    """The paths, their realpaths, and the realpath of every symlink found beneath them (a hub
    model snapshot is a folder of symlinks into ../../blobs). Paths that do not exist are skipped."""
    found, queue = {}, list(paths)
    while queue:
        path = os.path.realpath(queue.pop(0))
        if path in found or not os.path.exists(path):
            continue
        found[path] = None
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                queue += [os.path.join(folder, n) for n in dirs + files if os.path.islink(os.path.join(folder, n))]
    return list(found)


def python_paths() -> list[str]:
    """The Python installation: prefixes and every sys.path entry (here under $HOME/.pyenv)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}
    return [p for p in sorted(prefixes) + sys.path if p and os.path.exists(p)]


def system_read() -> list[str]:
    """The system paths every sandboxed command reads (not searched for links: /sys is made of them)."""
    return list(SYSTEM_READ + ETC_READ + PROC_READ + SYS_READ + DEV_READ)


def gpu_devices() -> list[str]:
    return sorted(os.path.join("/dev", n) for n in os.listdir("/dev")
                  if os.path.join("/dev", n).startswith(GPU_DEVICE_PREFIX))


def add_rule(ruleset_fd: int, path: str, rights: int, handled: int) -> bool:
    """Allow `rights` beneath `path` (only the file rights if it is a file). False if it vanished."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= FILE_RIGHTS
        attr = PathBeneathAttr(rights & handled, fd)
        if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset_fd), ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                         ctypes.byref(attr), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}): {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return True


def drop_capabilities() -> bool:
    """Empty the bounding and ambient sets and stop uid 0 from getting capabilities at exec, so
    that CMD, if it runs as root, has none: CAP_SYS_PTRACE would let it read the driver's
    /proc/PID/environ despite Landlock, others give raw sockets, module loading, mknod...
    Only possible, and only needed, with CAP_SETPCAP."""
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    dropped = all(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 for cap in range(last_cap + 1))
    # The inheritable set survives an empty bounding set for root; without "root is special" it does not.
    return _libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_AND_LOCK, 0, 0, 0) == 0 and dropped


def restrict_self(abi: int, read: list[str], write: list[str], read_nofollow: list[str] = (),
                  list_only: list[str] = ()) -> str:
    """Apply the policy to this process (and so to what it execs); returns the one-line description."""
    handled = handled_fs(abi)
    attr = RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                       SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0)
    ruleset_fd = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                               ctypes.c_uint32(0))
    if ruleset_fd < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        # Write paths are not searched for symlinks: a link left in a run folder must not extend it.
        writable = [p for p in dict.fromkeys(os.path.realpath(p) for p in write + list(SYSTEM_WRITE) + gpu_devices())
                    if add_rule(ruleset_fd, p, WRITE_RIGHTS, handled)]
        writable += [SHM] if add_rule(ruleset_fd, SHM, SHM_RIGHTS, handled) else []
        for folder in [DEV_LIST, *list_only]:
            add_rule(ruleset_fd, folder, FS_READ_DIR, handled)
        nofollow = [os.path.realpath(p) for p in read_nofollow]
        readable = [p for p in with_symlink_targets(read) + nofollow + python_paths() + system_read()
                    if add_rule(ruleset_fd, p, READ_RIGHTS, handled)]
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        no_caps = drop_capabilities()
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset_fd)
    return describe(abi, len(writable), len(readable), no_caps)


def describe(abi: int, n_write: int, n_read: int, no_caps: bool) -> str:
    parts = [f"sandbox: Landlock ABI {abi}", f"write: {n_write} paths", f"read: {n_read} paths"]
    if abi < 3:
        parts.append("truncate not restricted (needs ABI 3)")
    parts.append("TCP bind/connect denied" if abi >= 4 else "TCP not restricted (needs ABI 4)")
    parts.append("signals and abstract unix sockets scoped" if abi >= 6
                 else "signals and abstract unix sockets not scoped (needs ABI 6)")
    if os.geteuid() == 0:
        parts.append("root without capabilities" if no_caps else "root WITH capabilities")
    return "; ".join(parts)


def parse_args(argv: list[str]) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    """(read, write, read_nofollow, list_only, cmd) from
    `--read P ... --write P ... --read-nofollow P ... --list P ... -- CMD ARGS...`."""
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: sandbox.py [--read PATH ...] [--write PATH ...] [--read-nofollow PATH ...] [--list PATH ...] "
                 "-- CMD [ARGS...]")
    split = argv.index("--")
    lists = {"--read": [], "--write": [], "--read-nofollow": [], "--list": []}
    target = None
    for arg in argv[:split]:
        if arg in lists:
            target = lists[arg]
        elif target is None:
            sys.exit(f"sandbox: {arg!r} must follow --read, --write, --read-nofollow or --list")
        else:
            target.append(arg)
    return lists["--read"], lists["--write"], lists["--read-nofollow"], lists["--list"], argv[split + 1:]


def wrap_unconfined(cmd: list[str]) -> list[str]:
    """Where Landlock is missing or turned off: no confinement, but still no new privileges and, as
    root, no capabilities, so that the driver's non-dumpable state keeps /proc/<driver>/environ closed."""
    return [sys.executable, "-I", str(Path(__file__).resolve()), "--no-landlock", "--", *cmd]


def drop_privileges_only(cmd: list[str]) -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit(f"sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed; refusing to run {cmd[0]}")
    no_caps = drop_capabilities()
    if os.geteuid() == 0 and not no_caps:
        sys.exit(f"sandbox: could not drop root's capabilities; refusing to run {cmd[0]}")
    print("unsandboxed: no Landlock" + ("; root without capabilities" if os.geteuid() == 0 else ""),
          file=sys.stderr, flush=True)


def first_to_go_out_of_memory() -> None:
    """Out of memory, the kernel kills CMD (and what it starts: the score is inherited) before the driver or
    the user's other programs. Raising one's own score needs no privilege; lowering it again needs
    CAP_SYS_RESOURCE, which CMD does not have."""
    try:
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    except OSError as e:
        print(f"sandbox: could not raise oom_score_adj ({e}); the OOM killer may pick another process first",
              file=sys.stderr)


def main(argv: list[str]) -> None:
    first_to_go_out_of_memory()
    unconfined = argv[:1] == ["--no-landlock"]
    read, write, read_nofollow, list_only, cmd = parse_args(argv[1:] if unconfined else argv)
    if unconfined:
        drop_privileges_only(cmd)
        exec_command(cmd)
    abi = landlock_abi()
    if abi < MIN_ABI:
        print(f"sandbox: Landlock is unavailable (ABI {abi}); refusing to run {cmd[0]} unsandboxed. "
              "Needs Linux >= 5.13 with landlock in the lsm= boot parameter (check "
              "/sys/kernel/security/lsm).", file=sys.stderr)
        sys.exit(EXIT_NO_SANDBOX)
    try:
        line = restrict_self(abi, read, write, read_nofollow, list_only)
    except OSError as e:
        print(f"sandbox: could not apply the Landlock policy ({e}); refusing to run {cmd[0]} unsandboxed.",
              file=sys.stderr)
        sys.exit(EXIT_NO_SANDBOX)
    print(line, file=sys.stderr, flush=True)
    exec_command(cmd)


def exec_command(cmd: list[str]) -> None:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"sandbox: cannot run {cmd[0]}: {e}", file=sys.stderr)
        sys.exit(127 if e.errno == errno.ENOENT else 126)


if __name__ == "__main__":
    main(sys.argv[1:])
