"""The driver's shape: layers without circles (bench/imports.py), and a Ray task that loads only what it runs."""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import imports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("openai", "pandas", "git", "torch", "matplotlib", "ray")


def test_the_project_has_no_circle_no_arrow_back_up_and_no_driver_file_over_the_limit():
    done = subprocess.run([sys.executable, "bench/imports.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "driver.worker" in done.stdout and "no circle, no arrow back up" in done.stdout


def test_the_checker_finds_a_circle_an_arrow_up_and_an_import_of_agent():
    order = ["driver.common", "driver.keep", "driver.night"]
    graph = {"driver.common": {"driver.keep"}, "driver.keep": {"driver.common"}, "driver.night": {"agent"},
             "sandbox": {"driver.common"}, "agent": {"driver.night"}}
    found = imports.problems(graph, order, {"driver.night": imports.MAX_LINES + 1})
    assert any(p.startswith("circle: driver.common -> driver.keep -> driver.common") for p in found), found
    assert "driver.common -> driver.keep: an arrow back up (driver/__init__.py lists driver.keep above)" in found
    assert "driver.night imports agent.py (the entry point): nothing may" in found
    assert "sandbox imports driver.common: sandbox.py imports nothing of the driver" in found
    assert f"driver.night: {imports.MAX_LINES + 1} lines (over {imports.MAX_LINES})" in found
    assert imports.problems({"driver.keep": {"driver.common"}}, order, {}) == []


def test_importing_the_ray_task_loads_no_openai_pandas_or_git():
    """Every Ray worker imports driver.worker to run ~300 lines of process code: not the LLM client, not pandas."""
    probe = f"import sys, driver.worker; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
    # the probe sees a heavy import where there is one: the driver's entry point loads them all
    done = subprocess.run([sys.executable, "-c", probe.replace("driver.worker", "agent")], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert {"pandas", "git"} <= set(done.stdout.split())


def test_the_llm_client_is_imported_only_when_a_night_makes_one():
    """`import openai` is 0.6 s of the driver's 1.4 s start: status, report, plot, the sweep and a wrong flag do
    without it; making the client loads it."""
    probe = ("import sys, agent; from driver.llm import make_client; before = 'openai' in sys.modules; "
             "make_client(agent.parse_args(['--base-url', 'http://127.0.0.1:9/v1'])); print(before, 'openai' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == ["False", "True"], done.stdout + done.stderr
