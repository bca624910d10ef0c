"""The corpus of bad (and a few good) LLM replies in tests/data/replies: each ends as a precise
rejection or a clean edit, alone and through the real driver."""
import json
import shutil
from pathlib import Path

import git
import pytest

import agent
from driver.common import ReplyError
from driver.edits import edit_train_py
from driver.propose import program_digest
from driver_helpers import ROOT, check_invariants, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM

CORPUS = Path(__file__).resolve().parent / "data" / "replies"
EXPECTED = json.loads((CORPUS / "expected.json").read_text())
TRAIN_PY = (ROOT / "train.py").read_text()


def reply_text(name: str) -> str:
    return (CORPUS / name).read_bytes().decode("utf-8", errors="replace")  # as the HTTP client would


def test_corpus_is_large_enough():
    assert len(EXPECTED) >= 30 and sorted(EXPECTED) == sorted(p.name for p in CORPUS.iterdir() if p.name != "expected.json")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_reply_is_rejected_precisely_or_applied(name):
    want = EXPECTED[name]
    if want["outcome"] == "ok":
        description, new = edit_train_py(TRAIN_PY, reply_text(name), want["finish_reason"], "text")
        assert description == want["reason"] and new != TRAIN_PY and "prepare.submit(" in new
        compile(new, "train.py", "exec")
    else:
        with pytest.raises(ReplyError) as err:
            edit_train_py(TRAIN_PY, reply_text(name), want["finish_reason"], "text")
        assert want["reason"] in str(err.value)


def test_json_reply_format_parses_and_applies():
    reply = json.dumps({"description": "lower LR", "edits": [{"search": "LR = 3e-4", "replace": "LR = 2e-4"}]})
    description, new = edit_train_py(TRAIN_PY, reply, "stop", "json")
    assert description == "lower LR" and "LR = 2e-4" in new
    with pytest.raises(ReplyError, match="not the JSON object"):
        edit_train_py(TRAIN_PY, '{"description": "x"}', "stop", "json")


def outcomes_through_the_driver(names: list[str]) -> list[str]:
    """Each reply's outcome in the driver, in turn: a reply that applies but makes train.py the program the
    baseline or an earlier reply made (the corpus says one thing several ways) is a repair turn, its score known."""
    outcomes, made = [], {program_digest(TRAIN_PY)}
    for name in names:
        want = EXPECTED[name]
        if want["outcome"] != "ok":
            outcomes.append(want["outcome"])
            continue
        new = program_digest(edit_train_py(TRAIN_PY, reply_text(name), want["finish_reason"], "text")[1])
        outcomes.append("twin" if new in made else "ok")
        made.add(new)
    return outcomes


def experiments_needed(outcomes: list[str]) -> int:
    """How many experiments the driver spends on the corpus: up to 1 + MAX_REPAIR_TURNS replies each."""
    count, turn = 0, 0
    for outcome in outcomes:
        turn += 1
        if outcome == "ok" or turn == agent.MAX_REPAIR_TURNS + 1:
            count, turn = count + 1, 0
    return count + (1 if turn else 0)


# The real train.py's first call into the harness submits the baseline's score and ends the run: the
# stand-in scores every applied edit (as unchanged, so discarded) after train.py's imports, without training.
REAL_TRAIN_PY_STANDIN = """

def device():
    submit({"ppl": 20.0})
    sys.exit(0)
"""


def test_corpus_through_the_driver_touches_nothing_but_train_py(tmp_path):
    repo = make_research_repo(tmp_path / "research")
    shutil.copy(ROOT / "train.py", repo / "train.py")  # the corpus edits the real train.py
    with open(repo / "prepare.py", "a") as f:
        f.write(REAL_TRAIN_PY_STANDIN)
    g = git.Repo(repo)
    g.index.add(["train.py", "prepare.py"])
    g.index.commit("real train.py")
    prepare_before = (repo / "prepare.py").read_bytes()
    names = sorted(EXPECTED)
    llm = FakeLLM([{"content": reply_text(n), "finish_reason": EXPECTED[n]["finish_reason"]} for n in names])
    try:
        outcomes = outcomes_through_the_driver(names)
        n = experiments_needed(outcomes)
        # not pipelined: a twin found before its experiment runs costs a repair turn, never a fresh proposal
        done = run_agent(repo, llm.url, "--max-experiments", str(n), "--max-failures", "999", "--no-pipeline", timeout=600)
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    assert not llm.script, "every corpus reply was served"
    rows = ledger(repo)
    assert len(rows) == n + 1
    assert (rows["status"] == "invalid").sum() >= 10 and rows[rows["status"] == "invalid"]["reason"].str.len().min() > 10
    # every reply that applies becomes one scored experiment commit (no gain over the baseline: discarded), but
    # one that remakes a file already scored
    assert rows.iloc[0]["status"] == "baseline" and rows.iloc[0]["val_ppl"] == 20.0
    applied = rows[rows["commit"].notna() & (rows["status"] != "baseline")]
    assert len(applied) == outcomes.count("ok") and outcomes.count("twin") >= 1
    rejected = [line for line in done.stdout.splitlines() if "reply rejected" in line]
    assert sum("the same program as the file experiment" in line for line in rejected) == outcomes.count("twin")
    assert set(applied["status"]) == {"discard"} and (applied["val_ppl"] == 20.0).all()
    assert set(rows["status"][1:]) == {"invalid", "discard"}
    # discarded, so off the branch: each commit is read from the ledger (check_invariants ties it to its ref)
    for commit in applied["commit"]:
        assert list(g.commit(commit).stats.files) == ["train.py"] and g.commit(commit).parents == (g.head.commit,)
    assert check_invariants(repo) == []
    assert (repo / "prepare.py").read_bytes() == prepare_before
    assert (repo / "notes.txt").read_text() == "the user's untracked notes\n"
    assert (repo / "README.md").read_text().endswith("the user's uncommitted line\n")


def test_whole_file_in_one_fence_is_the_pinned_rule():
    """A reply with no SEARCH/REPLACE or FILE marker is a whole-file edit exactly when its ONLY fenced block
    (```python, ```py, ```python3 or a bare ```) compiles and calls prepare.submit; the description is the
    DESCRIPTION: line, else the first line outside the block."""
    new = TRAIN_PY.replace("LR = 3e-4", "LR = 2e-4", 1)
    for fence in ("```python", "```py", "```python3", "```"):
        description, text = edit_train_py(TRAIN_PY, f"Lower LR.\n{fence}\n{new}```\n", "stop", "text")
        assert (description, text) == ("Lower LR.", new)
    assert edit_train_py(TRAIN_PY, f"```python\n{new}```\n", "stop", "text") == ("(no description)", new)
    rejected = {
        "another language": f"Lower LR.\n```bash\n{new}```\n",
        "two blocks": f"Lower LR.\n```python\n{new}```\n```python\nprint(1)\n```\n",
        "a fragment": "Lower LR.\n```python\nLR = 2e-4\n```\n",
        "no submit": f"Lower LR.\n```python\n{new.replace('prepare.submit(', 'print(')}```\n",
        "a marker too": f"Lower LR.\n```python\n{new}```\n<<<<<<< SEARCH\nLR = 3e-4\n=======\nLR = 1e-4\n",
        "unclosed": f"Lower LR.\n```python\n{new}",
    }
    for case, reply in rejected.items():
        with pytest.raises(ReplyError, match="no SEARCH/REPLACE block|broken markers"):
            edit_train_py(TRAIN_PY, reply, "stop", "text")
            pytest.fail(case)


@pytest.mark.parametrize("reply", [
    {"description": "x", "edits": [{"search": None, "replace": "LR = 2e-4"}]},
    {"description": "x", "edits": [{"search": "LR = 3e-4", "replace": None}]},
    {"description": "x", "edits": [{"search": 3, "replace": "LR = 2e-4"}]},
    {"description": "x", "edits": None},
    {"description": "x", "edits": ["LR = 2e-4"]},
    {"description": "x", "edits": [None]},
])
def test_json_replies_with_wrong_types_are_rejected_not_crashed(reply):
    with pytest.raises(ReplyError):
        edit_train_py(TRAIN_PY, json.dumps(reply), "stop", "json")


def test_json_reply_without_a_description_still_applies():
    reply = {"description": None, "edits": [{"search": "LR = 3e-4", "replace": "LR = 2e-4"}]}
    assert edit_train_py(TRAIN_PY, json.dumps(reply), "stop", "json")[0] == "(no description)"
