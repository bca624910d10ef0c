"""The proposer's side of an experiment before it runs: the prompt's order (for a server's prefix cache) and the
train.py files already scored, which a proposal may not remake."""
import os

import git
import pandas as pd
import pytest

import agent
from driver.knobs import find_knobs, knob_schema, set_knobs
from driver.ledger import LEDGER_TAIL_ROWS, LEDGER_WINDOW_STEP, ledger_for_prompt
from driver.propose import build_prompt, scored_before, scored_train_pys
from driver.session import open_session
from driver_helpers import ROOT, make_research_repo
from prepare import LEDGER_COLUMNS

TRAIN_PY = (ROOT / "train.py").read_text()


def ledger_rows(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame([{c: None for c in LEDGER_COLUMNS} | {"protocol": "v1"} | row for row in rows])


@pytest.mark.parametrize("reply_format", ["text", "knob"])
def test_the_prompt_puts_what_changes_least_first_for_the_servers_prefix_cache(tmp_path, reply_format):
    """A discard leaves program.md and train.py as they were: the next prompt differs only after them."""
    repo = make_research_repo(tmp_path / "r", real=True)
    session = open_session(agent.parse_args(["--repo", str(repo), "--reply-format", reply_format]))
    first = {"experiment": 0, "status": "baseline", "val_ppl": 40.0}
    later = (first, {"experiment": 1, "status": "discard", "val_ppl": 41.0, "description": "x"})
    before, after = (build_prompt(session, TRAIN_PY, rows=ledger_rows(*rows))[1]["content"] for rows in ((first,), later))
    shared = os.path.commonprefix([before, after])
    assert "NEVER STOP" in shared and ("LR = 3e-4\n" if reply_format == "knob" else TRAIN_PY) in shared
    assert "discard" in after[len(shared):]


def test_scored_files_are_read_from_git_and_a_commit_git_lacks_is_passed_over(tmp_path):
    """The ledger's commit cells name what ran; one git does not know (a ledger copied from another clone, a
    hand edit) is no twin of anything, and never stops the night."""
    repo = make_research_repo(tmp_path / "r")
    session = open_session(agent.parse_args(["--repo", str(repo)]))
    head = git.Repo(repo).head.commit.hexsha
    rows = ledger_rows(*[{"experiment": n, "status": "discard", "val_ppl": 21.0, "commit": bad}
                         for n, bad in enumerate(["0" * 40, "deadbeef", "--help", "HEAD:README.md", "HEAD", None], 1)],
                       {"experiment": 7, "status": "crash", "commit": head},  # no score: may be tried again
                       {"experiment": 8, "status": "baseline", "val_ppl": 20.0, "commit": head})
    found = scored_train_pys(session, rows)
    assert list(found.values()) == ["experiment 8 (baseline, val_ppl 20)"]
    assert scored_before(found, (repo / "train.py").read_text()) == "experiment 8 (baseline, val_ppl 20)"
    # the same program in other words is the same experiment; a changed number is not
    text = (repo / "train.py").read_text()
    for same in (text + "\n", text.replace("PPL = 20.0", "PPL = 2e1  # try 20"), text.replace("\n\n\n", "\n\n")):
        assert same != text and scored_before(found, same) == "experiment 8 (baseline, val_ppl 20)", same
    assert scored_before(found, text.replace("PPL = 20.0", "PPL = 20.5")) == ""
    assert scored_before(found, text + "\n)") == ""  # a file Python cannot parse is compared by its bytes


def test_the_ledgers_window_moves_in_steps_so_a_new_row_only_adds_to_the_prompts_end():
    rows = ledger_rows(*[{"experiment": n, "status": "discard", "val_ppl": 30.0 + n, "description": f"change {n}"}
                         for n in range(75)])
    for n in range(2, 75):
        before, after = ledger_for_prompt(rows.iloc[:n]), ledger_for_prompt(rows.iloc[:n + 1])
        table = before.split("\n(of ")[0]  # the counts line at the end changes with every row
        shown = len(after.split("\n(of ")[0].splitlines()) - 1
        assert LEDGER_TAIL_ROWS <= shown < LEDGER_TAIL_ROWS + LEDGER_WINDOW_STEP or shown == n + 1
        moved = n + 1 > LEDGER_TAIL_ROWS and (n + 1 - LEDGER_TAIL_ROWS) % LEDGER_WINDOW_STEP == 0
        assert after.startswith(table) != moved, n


def test_the_knob_schema_offers_no_option_that_remakes_a_scored_train_py():
    """A small model undoes a kept change (a CI run: "constant" kept, then "linear" twice): a server that
    enforces the schema cannot write an option that remakes a file already scored."""
    kept = set_knobs(TRAIN_PY, {"LAMBDA_SCHEDULE": '"constant"'})
    compiled = set_knobs(kept, {"COMPILE": str(not find_knobs(kept)["COMPILE"]["value"])})
    schema = knob_schema(kept, lambda text: text in (TRAIN_PY, compiled))
    offered = {name: branch["properties"][name] for branch in schema["properties"]["set"]["anyOf"]
               for name in branch["properties"]}
    assert offered["LAMBDA_SCHEDULE"]["enum"] == ['"cosine"', '"exponential"', '"two_phase"']  # not linear, the baseline
    assert "COMPILE" not in offered and "COMPILE" not in schema["properties"]["set"]["propertyNames"]["enum"]
    assert offered["LR"] == knob_schema(kept)["properties"]["set"]["anyOf"][list(offered).index("LR")]["properties"]["LR"]
