"""Which processes use the test suite's CPU: every process on the machine sampled from /proc while the suite runs,
its CPU summed by kind (the driver, train.py, the evaluator, Ray's workers and daemons, the llama.cpp server...)
and by the test it belongs to (PYTEST_CURRENT_TEST in its environment). bench/suite_cpu.py counts a test's own
CPU and its waited children; this also sees the daemons it does not wait for.

    python bench/suite_processes.py watch /tmp/procs.json &      # until SIGTERM or SIGINT
    python -m pytest -q tests -n 3 --dist worksteal; kill %1
    python bench/suite_processes.py report /tmp/procs.json

A process that lives less than one sample (0.3 s) is missed; processes running when the watch began count only
the CPU they used after it.
"""
import collections
import json
import os
import re
import signal
import sys
import time

SAMPLE_S = 0.3
TESTS = 30  # rows of the per-test table
TICKS = os.sysconf("SC_CLK_TCK")
KINDS = [  # (kind, pattern in the command line), first match wins
    ("driver (agent.py)", r"agent\.py"),
    ("prepare.py sandbox-info", r"prepare\.py sandbox-info"),
    ("prepare.py eval", r"prepare\.py eval"),
    ("prepare.py, other", r"prepare\.py"),
    ("train.py", r"train\.py"),
    ("llama.cpp server", r"llama_server"),
    ("Ray worker", r"default_worker\.py|setup_worker\.py|^ray::"),
    ("Ray daemon", r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|runtime_env|ray/_private"),
    ("git", r"^git |/git "),
    ("pytest (in-process tests)", r"exec\(eval\(sys\.stdin|bin/pytest|-m pytest"),  # last: test paths name pytest
]


def read(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def watch(out: str) -> None:
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    seen, first = {}, True
    while not stop:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = read(pid, "stat").decode()
                fields = stat.rsplit(")", 1)[1].split()
                cpu, key = (int(fields[11]) + int(fields[12])) / TICKS, f"{pid}:{fields[19]}"
                if key not in seen:
                    env = dict(item.split(b"=", 1) for item in read(pid, "environ").split(b"\0") if b"=" in item)
                    seen[key] = {"cmd": read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")[:300],
                                 "test": env.get(b"PYTEST_CURRENT_TEST", b"").decode(errors="replace").split(" ")[0],
                                 "before": cpu if first else 0.0}
                seen[key]["cpu"] = cpu - seen[key]["before"]
            except (OSError, IndexError, ValueError):
                continue  # it ended meanwhile, or is not ours to read
        first = False
        time.sleep(SAMPLE_S)
    with open(out, "w") as f:
        json.dump(list(seen.values()), f)


def kind(cmd: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, cmd)), "other")


def report(path: str) -> None:
    with open(path) as f:
        procs = [p for p in json.load(f) if p["cpu"] > 0]
    cpu, count = collections.Counter(), collections.Counter()
    by_test = collections.defaultdict(collections.Counter)
    for p in procs:
        cpu[kind(p["cmd"])] += p["cpu"]
        count[kind(p["cmd"])] += 1
        if p["test"]:
            by_test[p["test"]][kind(p["cmd"])] += p["cpu"]
    print(f"{sum(cpu.values()):.0f} s of CPU in {len(procs)} processes\n\n| kind | CPU s | processes | s each |\n"
          "| --- | ---: | ---: | ---: |")
    for k, seconds in cpu.most_common():
        print(f"| {k} | {seconds:.0f} | {count[k]} | {seconds / count[k]:.2f} |")
    print("\n| test (its processes, not pytest's own work) | CPU s | most |\n| --- | ---: | --- |")
    for test, kinds in sorted(by_test.items(), key=lambda item: -sum(item[1].values()))[:TESTS]:
        most = ", ".join(f"{k} {s:.0f}" for k, s in kinds.most_common(3))
        print(f"| `{test.removeprefix('tests/')}` | {sum(kinds.values()):.0f} | {most} |")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("watch", "report"):
        sys.exit("usage: python bench/suite_processes.py watch|report FILE")
    (watch if sys.argv[1] == "watch" else report)(sys.argv[2])
