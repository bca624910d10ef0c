"""The sweep proposer (--proposer sweep, and --proposer auto without an LLM endpoint): coordinate descent over
program.md's search-space block, judged by the same keep rule, resumable from the ledger."""
import subprocess
import sys

import git
import pytest

from driver.common import FatalError
from driver.knobs import find_knobs, set_knobs
from driver.sweep import MAX_SWEEP_PASSES, SEARCH_SPACE_RE, literal_value, search_space, sweep_next
from driver_helpers import AGENT, ROOT, TAG, agent_env, check_invariants, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM

SPACE = [("LR", ["1e-4", "1e-3"]), ("MODE", ['"a"', '"b"']), ("STEPS", ["10", "20"])]
CURRENT = {"LR": "3e-4", "MODE": '"a"', "STEPS": "5"}


def replay(outcomes) -> list[tuple[str, str, str, bool]]:
    """Run sweep_next to the end; outcomes[(name, new)] says whether that try is kept (default: discarded), or
    outcomes(name, new, pass) does."""
    current, history = dict(CURRENT), []
    while True:
        step, passes = sweep_next(SPACE, current, history)
        if step is None:
            return history, passes
        name, old, new = step
        kept = outcomes(name, new, passes) if callable(outcomes) else outcomes.get((name, new), False)
        history.append((name, old, new, kept))
        if kept:
            current[name] = new
        assert len(history) < 50


def test_one_pass_in_priority_order_when_nothing_is_kept():
    history, passes = replay({})
    # every listed value on top of the best, in the listed order; the current value itself is not tried
    assert [(n, o, v) for n, o, v, _ in history] == [
        ("LR", "3e-4", "1e-4"), ("LR", "3e-4", "1e-3"), ("MODE", '"a"', '"b"'), ("STEPS", "5", "10"), ("STEPS", "5", "20")]
    assert passes == 1


def test_later_values_go_on_top_of_a_keep_and_changed_knobs_are_swept_again():
    history, passes = replay({("LR", "1e-4"): True, ("STEPS", "20"): True})
    assert [(n, o, v, k) for n, o, v, k in history] == [
        ("LR", "3e-4", "1e-4", True), ("LR", "1e-4", "1e-3", False), ("MODE", '"a"', '"b"', False),
        ("STEPS", "5", "10", False), ("STEPS", "5", "20", True),
        # pass 2: only LR and STEPS changed; their best values are not tried again
        ("LR", "1e-4", "1e-3", False), ("STEPS", "20", "10", False)]
    assert passes == 2


def test_the_sweep_stops_after_max_passes_even_if_knobs_keep_changing():
    def flip(name, new, passes):  # a noisy knob: 1e-4 wins in odd passes, 1e-3 in even ones
        return name == "LR" and new == ("1e-4" if passes % 2 else "1e-3")
    history, passes = replay(flip)
    assert passes == MAX_SWEEP_PASSES and len(history) < 20


def test_values_are_compared_as_literals_and_unknown_knobs_are_skipped():
    step, _ = sweep_next([("NOPE", ["1"]), ("LR", ["0.0003", "1e-3"])], {"LR": "3e-4"}, [])
    assert step == ("LR", "3e-4", "1e-3")


def test_search_space_is_read_from_the_real_program_md():
    space = dict(search_space((ROOT / "program.md").read_text()))
    assert space["LR"] == ["1e-5", "2e-5", "5e-5", "1e-4", "2e-4", "5e-4"]  # the seed's values
    assert space["LAMBDA_WARMUP_STEPS"] == ["200", "500", "1000", "2000", "5000"]
    assert list(space)[:3] == ["LAMBDA_SCHEDULE", "LAMBDA_WARMUP_STEPS", "LR"]
    knobs = find_knobs((ROOT / "train.py").read_text())
    for name, values in space.items():  # every listed value is one train.py can take
        for value in values:
            if literal_value(value) != knobs[name]["value"]:
                set_knobs((ROOT / "train.py").read_text(), {name: value})


@pytest.mark.parametrize("block, reason", [("no block here", "has no ```search-space blocks"),
                                           ("```search-space\nLR = [1]\n```\n```search-space\nLR = [2]\n```", "has 2 "),
                                           ("```search-space\nLR = 1e-3\n```", "line 1: 'LR = 1e-3' is not"),
                                           ("```search-space\nLR = [x]\n```", "is not `NAME = [literal, ...]`")])
def test_a_broken_search_space_says_what_to_fix(block, reason):
    with pytest.raises(FatalError) as err:
        search_space(block)
    assert reason in str(err.value)


# ---------------------------------------------------------------- through the driver
def sweep_repo(tmp_path, space: str):
    repo = make_research_repo(tmp_path / "research")
    program = (repo / "program.md").read_text()
    (repo / "program.md").write_text(SEARCH_SPACE_RE.sub(f"```search-space\n{space}```", program))
    g = git.Repo(repo)
    g.index.add(["program.md"])
    g.index.commit("search space")
    return repo


def no_llm_cmd(repo, *args):
    return [sys.executable, str(AGENT), "--repo", str(repo), "--tag", TAG, "--timeout", "10", "--baseline-runs", "1", *args]


def no_llm_env():
    env = agent_env()
    env.pop("OPENAI_API_KEY")
    return env


def test_auto_runs_the_sweep_without_an_endpoint_and_resumes_it(tmp_path):
    repo = sweep_repo(tmp_path, "PPL = [25.0, 18.0, 19.0]\nPPL_SCALE = [2.0]\n")
    first = subprocess.run(no_llm_cmd(repo, "--max-experiments", "3"), env=no_llm_env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "no LLM endpoint configured: running the built-in sweep" in first.stdout + first.stderr
    done = subprocess.run(no_llm_cmd(repo), env=no_llm_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["description"].tolist()[1:] == [
        "sweep: PPL 20.0 -> 25.0", "sweep: PPL 20.0 -> 18.0", "sweep: PPL 18.0 -> 19.0", "sweep: PPL_SCALE 1.0 -> 2.0",
        "sweep: PPL 18.0 -> 25.0", "sweep: PPL 18.0 -> 19.0"]  # pass 2: only PPL changed
    assert rows["status"].tolist() == ["baseline", "discard", "keep", "discard", "discard", "discard", "discard"]
    assert rows["prompt_tokens"].isna().all() and rows["completion_tokens"].isna().all()
    assert (rows["cost_usd"][1:] == 0).all()
    out = done.stdout + done.stderr
    assert "the sweep is done: 6 experiments in 2 pass(es), best val_ppl 18; kept: PPL 20.0 -> 18.0" in out
    assert "PPL = 18.0" in (repo / "train.py").read_text()
    assert check_invariants(repo) == []


def test_a_value_train_py_cannot_take_is_an_invalid_row(tmp_path):
    repo = sweep_repo(tmp_path, "PPL = [\"low\", 18.0]\n")
    done = subprocess.run(no_llm_cmd(repo, "--proposer", "sweep"), env=no_llm_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "invalid", "keep", "invalid"]  # pass 2 sweeps PPL again
    assert rows["reason"][1] == "program.md's search space: PPL = \"low\" is of type str, but PPL is of type float (now 20.0)"


def test_auto_uses_the_llm_when_an_endpoint_is_configured(tmp_path):
    repo = sweep_repo(tmp_path, "PPL = [25.0]\n")
    llm = FakeLLM()
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "1", "--no-pipeline")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(llm.requests) == 1 and "built-in sweep" not in done.stdout + done.stderr
    assert not ledger(repo)["description"][1].startswith("sweep:")


def test_llm_proposer_without_an_endpoint_still_stops_with_the_fix(tmp_path):
    repo = sweep_repo(tmp_path, "PPL = [25.0]\n")
    done = subprocess.run(no_llm_cmd(repo, "--proposer", "llm"), env=no_llm_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "no LLM endpoint configured: set OPENAI_API_KEY" in done.stdout + done.stderr
