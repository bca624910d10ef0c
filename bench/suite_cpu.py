"""Where the test suite's time goes: per test, wall-clock against the CPU it and its children used.

    CPUPROF_OUT=/tmp/suite.jsonl PYTHONPATH=bench python -m pytest -q tests -n 2 -p suite_cpu   # record
    python bench/suite_cpu.py /tmp/suite.jsonl                                                  # the tables

A test whose wall-clock is far above its CPU waits (a sleep, a timeout, a run held elsewhere): under `-n 2` it holds
one of the two workers while a core idles. CPU counts the pytest process and the children it waited for (the
driver, train.py, the evaluator); not daemons it did not wait for: Ray's workers and the llama.cpp server.
"""
import json
import os
import resource
import sys
import time

import pytest

OUT = os.environ.get("CPUPROF_OUT", "suite-cpu.jsonl")
ROWS = 25


def cpu_seconds() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start, (own, children) = time.time(), cpu_seconds()
    yield
    wall, (own_after, children_after) = time.time() - start, cpu_seconds()
    with open(OUT, "a") as f:  # one line per test, appended by each xdist worker
        f.write(json.dumps({"test": item.nodeid, "wall": wall, "cpu": own_after - own + children_after - children}) + "\n")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    wall, cpu = sum(r["wall"] for r in rows), sum(r["cpu"] for r in rows)
    print(f"{len(rows)} tests: {wall:.0f} s of workers' wall-clock, {cpu:.0f} s of CPU counted\n")
    for title, key in (("most CPU", lambda r: -r["cpu"]), ("most waiting (wall - CPU)", lambda r: r["cpu"] - r["wall"])):
        print(f"{title}:\n\n| test | wall s | CPU s |\n| --- | ---: | ---: |")
        for r in sorted(rows, key=key)[:ROWS]:
            print(f"| `{r['test'].removeprefix('tests/')}` | {r['wall']:.1f} | {r['cpu']:.1f} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else OUT)
