"""The three records of driver/records.py list every field the driver writes into them, and nothing else: a field
written but not listed is one the next reader of a proposal, a result or state.json cannot know of; an old night's
state files hold only listed fields."""
import ast
import json
import tarfile
from pathlib import Path

import pytest

from driver.records import ExperimentState, Proposal, RunResult
from driver.scoring import SCORE_NUMBERS, reported_numbers

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "old_night"
RECORDS = {"ExperimentState": ExperimentState, "Proposal": Proposal, "RunResult": RunResult}
# Where driver/ writes each record besides the functions annotated to return it (whose assigned and returned dict
# displays, `x["key"] =` and `x.update(key=...)` all count): (functions whose dicts are spread into one, the variables
# that hold one, the calls that take one as a dict display)
SITES = {
    "ExperimentState": ({"tokens_since"}, {"st", "new_st", "rerun"},
                        {"save_state", "save", "submit", "run_committed", "apply_and_commit"}),
    "RunResult": (set(), {"result", "confirm"}, set()),
    "Proposal": ({"tokens_since"}, {"proposal"}, set()),
}
KEYWORD_CALLS = {"save_state", "update"}  # calls whose keywords are the record's fields (save_state(**state))


def dict_keys(node: ast.Dict) -> set[str]:
    """A dict display's string keys, with those of the `**{...}` displays inside it."""
    keys = set()
    for key, value in zip(node.keys, node.values):
        if key is None and isinstance(value, ast.Dict):
            keys |= dict_keys(value)
        elif isinstance(key, ast.Constant) and isinstance(key.value, str):
            keys.add(key.value)
    return keys


def displays(node: ast.AST):
    """The dict displays that make up `node`'s value (not those passed to a call inside it)."""
    if isinstance(node, ast.Dict):
        yield node
    elif not isinstance(node, ast.Call):
        for child in ast.iter_child_nodes(node):
            yield from displays(child)


def call_keys(node: ast.Call) -> set[str]:
    """The fields a call passes in a record: its dict displays, and its keywords where they are the record's."""
    keys = {k.arg for k in node.keywords if k.arg} if name_of(node.func) in KEYWORD_CALLS else set()
    for value in [*node.args, *(k.value for k in node.keywords if k.arg is None)]:
        if isinstance(value, ast.Dict):
            keys |= dict_keys(value)
    return keys


def name_of(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def written(node: ast.AST, names: set[str] | None, calls: set[str]) -> set[str]:
    """The keys written under `node` into a variable of `names`, or passed to a call of `calls`. names None: in a
    function that returns the record, into any variable and in what it returns."""
    keys, holds = set(), (lambda target: names is None or name_of(target) in names)
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in getattr(sub, "targets", None) or [sub.target]:
                if holds(target) and sub.value is not None:
                    keys |= set().union(*map(dict_keys, displays(sub.value)))
                if isinstance(target, ast.Subscript) and holds(target.value) and isinstance(target.slice, ast.Constant) \
                        and isinstance(target.slice.value, str):
                    keys.add(target.slice.value)
        elif isinstance(sub, ast.Return) and names is None and sub.value is not None:
            keys |= set().union(*map(dict_keys, displays(sub.value)))
        elif isinstance(sub, ast.Call) and (name_of(sub.func) in calls or (
                name_of(sub.func) == "update" and isinstance(sub.func, ast.Attribute) and holds(sub.func.value))):
            keys |= call_keys(sub)
    return keys


def fields_written(record: str) -> dict[str, str]:
    """Each field the driver writes into `record` -> a file that writes it."""
    spread, names, calls = SITES[record]
    found = {}
    for path in sorted((ROOT / "driver").glob("*.py")):
        tree = ast.parse(path.read_text())
        keys = written(tree, names, calls)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and (fn.name in spread or (
                    fn.returns is not None and record in {name_of(n) for n in ast.walk(fn.returns)})):
                keys |= written(fn, None, set())
        found.update({key: path.name for key in keys if key not in found})
    return found


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_each_record_lists_every_field_the_driver_writes_into_it_and_no_other(record):
    found = fields_written(record)
    listed = set(RECORDS[record].__annotations__)
    unlisted = {key: where for key, where in found.items() if key not in listed}
    assert not unlisted, f"driver/ writes {unlisted} (field: file) into a {record}: list them in driver/records.py"
    by_table = {column for column, _ in SCORE_NUMBERS} if record == "RunResult" else set()
    assert listed - set(found) - by_table == set(), f"{record} lists fields nothing in driver/ writes"


def test_the_scores_numbers_are_fields_of_a_run_result():
    """reported_numbers writes its fields by SCORE_NUMBERS' names, out of the scan's sight: run it."""
    score = {"ppl": 20.0, "windows": 8, "bits_per_weight": 1.58, "meta": {"steps": 10, "tokens": "many", "peak_mem_gb": 2.0},
             "meta_dropped": ["lr"]}
    fields = reported_numbers(score)
    assert "dropped" in fields and len(fields) == len(SCORE_NUMBERS) + 1
    assert set(fields) <= set(RunResult.__annotations__)


def saved_states(case: str) -> dict[str, dict]:
    """state.json and inflight/<n>.json as the old night of `case` left them."""
    with tarfile.open(FIXTURE / case / "files.tar.gz") as tar:
        return {m.name: json.load(tar.extractfile(m)) for m in tar.getmembers() if m.isfile()
                and m.name.startswith(".git/autoresearch/") and ("/inflight/" in m.name or m.name.endswith("/state.json"))}


def test_an_old_nights_state_files_hold_only_fields_of_the_records():
    states = {name: st for case in sorted(p.name for p in FIXTURE.iterdir() if p.is_dir())
              for name, st in saved_states(case).items()}
    assert any("/inflight/" in name for name in states) and any(n.endswith("state.json") for n in states), states
    for name, st in states.items():
        assert set(st) <= set(ExperimentState.__annotations__), (name, st)
        for key in ("first", "result", "confirm"):
            assert set(st.get(key) or {}) <= set(RunResult.__annotations__), (name, key, st[key])
