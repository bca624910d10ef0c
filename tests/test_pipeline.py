"""Pipelined proposals: the next change is asked for while the current experiment trains."""
from datetime import datetime

import git
import pytest

from driver_helpers import TAG, check_invariants, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM


def edit(search: str, replace: str, description: str) -> str:
    return f"DESCRIPTION: {description}\n<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def slow(ppl: str, description: str) -> str:
    """Lower PPL and make the run take 2 s, so that the next proposal is asked for meanwhile."""
    return (edit("SLEEP_S = 0.0", "SLEEP_S = 2.0", description)
            + edit("PPL = 20.0", f"PPL = {ppl}", "").split("\n", 1)[1])


@pytest.fixture
def repo(tmp_path):
    return make_research_repo(tmp_path / "research")


def run(repo, script, *args):
    llm = FakeLLM(script)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "2", *args)
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    return llm, ledger(repo), done.stdout


def test_next_proposal_is_asked_while_training_and_applies_after_a_discard(repo):
    llm, rows, _ = run(repo, [slow("21.0", "worse, slowly"), edit("PPL = 20.0", "PPL = 19.0", "better")])
    assert rows["status"].tolist() == ["baseline", "discard", "keep"]
    assert len(llm.requests) == 2
    finished = datetime.fromisoformat(rows.iloc[1]["timestamp"]).timestamp()
    assert llm.times[1] < finished - 1  # asked while experiment 1 was still training
    assert rows["seen"].tolist()[1:] == [0, 0]  # experiment 2 was proposed before experiment 1's result
    second_prompt = llm.requests[1]["messages"][1]["content"]
    assert "# in flight" in second_prompt and "worse, slowly" in second_prompt
    assert check_invariants(repo) == []


def test_after_a_keep_the_prefetched_blocks_apply_on_top(repo):
    llm, rows, _ = run(repo, [slow("18.0", "better, slowly"), edit("MODE = \"ok\"", "MODE = \"fake\"", "print a fake score")])
    assert rows["status"].tolist() == ["baseline", "keep", "discard"] and len(llm.requests) == 2
    tried = git.Repo(repo).commit(f"refs/autoresearch/{TAG}/discarded/2").tree["train.py"].data_stream.read().decode()
    assert "PPL = 18.0" in tried and 'MODE = "fake"' in tried  # experiment 2 ran on top of the kept experiment 1


def test_after_a_keep_a_conflicting_prefetch_is_asked_again(repo):
    llm, rows, out = run(repo, [slow("18.0", "better, slowly"), edit("PPL = 20.0", "PPL = 17.0", "conflicts")])
    assert len(llm.requests) == 3 and "asking again" in out
    assert "PPL = 18.0" in llm.requests[2]["messages"][1]["content"]  # re-asked with the new train.py
    assert rows["status"].tolist() == ["baseline", "keep", "keep"]
    assert rows.iloc[2]["prompt_tokens"] > rows.iloc[1]["prompt_tokens"]  # both calls are counted
    assert rows["prompt_tokens"].sum() == sum(p for p, _ in llm.usage)  # ... each exactly once
    assert rows["completion_tokens"].sum() == sum(c for _, c in llm.usage)
    assert check_invariants(repo) == []


def test_no_pipeline_asks_after_each_result(repo):
    llm, rows, _ = run(repo, [slow("21.0", "worse, slowly"), edit("PPL = 20.0", "PPL = 19.0", "better")], "--no-pipeline")
    assert rows["seen"].tolist()[1:] == [0, 1]
    assert "# in flight" not in llm.requests[1]["messages"][1]["content"]


def test_a_prefetch_that_remakes_a_scored_train_py_on_top_of_a_keep_is_asked_again(repo):
    """Experiment 3 is asked for while experiment 2 trains; 2 is kept and 3's change, applied on top of it,
    makes the very program experiment 1 scored: its score is known, so the LLM is asked for another."""
    line = next(l for l in (repo / "train.py").read_text().splitlines() if l.startswith("PPL_SCALE = 1.0"))
    double = edit(line, line.replace("1.0", "2.0", 1), "double the scale")
    script = [slow("18.0", "lower the ppl and double the scale, slowly") + double.split("\n", 1)[1],
              slow("18.0", "lower the ppl, slowly"), double, edit("PPL = 18.0", "PPL = 17.0", "lower it again")]
    llm = FakeLLM(script)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "3")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "discard", "keep", "keep"], rows
    assert rows["val_ppl"].tolist() == [20.0, 36.0, 18.0, 17.0]
    assert len(llm.requests) == 4 and "the same program as the file experiment 1 (discard" in done.stdout, done.stdout
    assert rows["prompt_tokens"].sum() == sum(p for p, _ in llm.usage)  # the prefetch's call is billed too
    assert check_invariants(repo) == []
