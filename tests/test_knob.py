"""Knob edits (--reply-format knob): the reply sets one or two of train.py's constants, checked before it runs."""
import json

import pytest

import agent
from driver.common import ReplyError
from driver.knobs import KNOB_FLOAT_PATTERN, KNOB_INT_PATTERN, MAX_KNOBS, find_knobs, knob_schema, set_knobs
from driver.edits import edit_train_py
from driver.session import open_session
from driver.llm import KNOB_REPLY_TOKENS
from driver.propose import build_prompt
from driver_helpers import ROOT, check_invariants, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM

TRAIN_PY = (ROOT / "train.py").read_text()
SMALL = '''import prepare

MODE = "ok"                 # ok | crash | hang
LR = 3e-4
STEPS = 50                  # how long
BETAS = (0.9, 0.95)
USE_EMA = False
T0 = time.time()            # computed: not a knob
lower = 1                   # not ALL_CAPS: not a knob
WIDE = [
    1, 2]
prepare.submit({})
'''


def knob_reply(description: str, **values) -> str:
    return json.dumps({"description": description, "set": values})


# ---------------------------------------------------------------- the schema and the listing
def test_schema_names_exactly_the_literal_all_caps_constants():
    schema = knob_schema(SMALL)
    knobs = schema["properties"]["set"]
    assert knobs["propertyNames"]["enum"] == ["MODE", "LR", "STEPS", "BETAS", "USE_EMA"]
    assert knobs["maxProperties"] == MAX_KNOBS
    # one constant per reply where the server enforces the schema: each branch sets exactly one
    branches = {list(b["properties"])[0]: b for b in knobs["anyOf"]}
    assert list(branches) == ["MODE", "LR", "STEPS", "BETAS", "USE_EMA"]
    assert all(b["required"] == list(b["properties"]) and b["additionalProperties"] is False for b in branches.values())
    value = {name: b["properties"][name] for name, b in branches.items()}
    # a constant whose comment lists options can only be given one of the others; a bool the other bool
    assert value["MODE"] == {"type": "string", "enum": ['"crash"', '"hang"']}
    assert value["USE_EMA"] == {"type": "string", "enum": ["True"]}
    # numbers without options (a comment without options is no restriction): number literals
    assert value["LR"] == {"type": "string", "pattern": KNOB_FLOAT_PATTERN}
    assert value["STEPS"] == {"type": "string", "pattern": KNOB_INT_PATTERN}
    assert value["BETAS"] == {"type": "string", "maxLength": 40}
    import re
    assert all(re.match(KNOB_FLOAT_PATTERN, v) for v in ("1e-3", "0.0005", "2", "3E-4"))
    assert not any(re.match(KNOB_FLOAT_PATTERN, v) for v in ("", "fast", "1e-3 # x", "-1"))


def test_schema_of_the_real_train_py_offers_other_options_only():
    knobs = {list(b["properties"])[0]: list(b["properties"].values())[0]
             for b in knob_schema(TRAIN_PY)["properties"]["set"]["anyOf"]}
    assert knobs["GROUP_SIZE"]["enum"] == ["32", "64", "128", "256", '"tensor"']  # not the current "row"
    assert knobs["LAMBDA_SCHEDULE"]["enum"] == ['"cosine"', '"exponential"', '"two_phase"', '"constant"']
    assert knobs["LAMBDA_WARMUP_FRAC"]["pattern"] == KNOB_FLOAT_PATTERN  # None now: takes a number


def test_options_are_read_from_the_real_train_py_comments():
    knobs = find_knobs(TRAIN_PY)
    assert knobs["LAMBDA_SCHEDULE"]["options"] == ["linear", "cosine", "exponential", "two_phase", "constant"]
    assert knobs["GROUP_SIZE"]["options"] == [32, 64, 128, 256, "row", "tensor"]
    assert knobs["SCALE_RULE"]["options"] == ["mean", "absmax"]
    assert knobs["THRESHOLD"]["options"] is None  # `|w|/s below this` is prose, not options
    assert knobs["LR"]["options"] is None and knobs["LR"]["text"] == "3e-4" and knobs["LR"]["comment"] == ""
    assert "T_PROCESS" not in knobs


def test_knob_prompt_lists_constants_instead_of_code(tmp_path):
    repo = make_research_repo(tmp_path / "r", real=True)
    args = agent.parse_args(["--repo", str(repo), "--reply-format", "knob"])
    messages = build_prompt(open_session(args), TRAIN_PY)
    user = messages[1]["content"]
    assert 'LAMBDA_SCHEDULE = "linear"  # linear | cosine | exponential | two_phase | constant' in user
    assert "LR = 3e-4\n" in user and "def lambda_at" not in user and "NEVER STOP" in user
    assert '"set"' in messages[0]["content"] and "SEARCH" not in messages[0]["content"]


# ---------------------------------------------------------------- the rewrite
def test_rewrite_touches_only_the_assignment_and_keeps_comments():
    description, new = edit_train_py(TRAIN_PY, knob_reply("try cosine", LAMBDA_SCHEDULE='"cosine"', LR="1e-3"),
                                           "stop", "knob")
    changed = [(a, b) for a, b in zip(TRAIN_PY.splitlines(), new.splitlines()) if a != b]
    assert len(new.splitlines()) == len(TRAIN_PY.splitlines())
    assert changed == [('LAMBDA_SCHEDULE = "linear"      # linear | cosine | exponential | two_phase | constant',
                        'LAMBDA_SCHEDULE = "cosine"      # linear | cosine | exponential | two_phase | constant'),
                       ("LR = 3e-4", "LR = 1e-3")]
    assert description == 'LAMBDA_SCHEDULE = "cosine", LR = 1e-3: try cosine'


def test_rewrite_keeps_the_comment_column_or_two_spaces_when_it_does_not_fit():
    new = set_knobs(SMALL, {"STEPS": "2000", "MODE": "crash"})
    assert "STEPS = 2000                # how long\n" in new and 'MODE = "crash"              # ok | crash | hang\n' in new
    new = set_knobs(SMALL, {"STEPS": "12345678901234567890123"})
    assert "STEPS = 12345678901234567890123  # how long\n" in new
    new = set_knobs(SMALL, {"BETAS": "(0.8, 0.99)", "USE_EMA": "True"})
    assert "BETAS = (0.8, 0.99)\n" in new and "USE_EMA = True\n" in new


def test_lenient_spellings_of_a_value():
    # a bare word for a string option, a JSON number or bool instead of a literal's text
    assert 'MODE = "hang"' in set_knobs(SMALL, {"MODE": "hang"})
    assert "LR = 0.001" in set_knobs(SMALL, {"LR": 0.001})
    assert "USE_EMA = True" in set_knobs(SMALL, {"USE_EMA": True})
    assert "GROUP_SIZE = 64 " in set_knobs(TRAIN_PY, {"GROUP_SIZE": "64"})
    assert 'GROUP_SIZE = "tensor"' in set_knobs(TRAIN_PY, {"GROUP_SIZE": '"tensor"'})
    assert "LAMBDA_WARMUP_FRAC = 0.2 " in set_knobs(TRAIN_PY, {"LAMBDA_WARMUP_FRAC": "0.2"})  # None takes a number


@pytest.mark.parametrize("changes, reason", [
    ({"LRR": "1e-3"}, "'LRR' is not a constant of train.py (did you mean LR?)"),
    ({"T_PROCESS": "0"}, "'T_PROCESS' is not a constant of train.py"),
    ({"LR": '"fast"'}, 'LR = "fast" is of type str, but LR is of type float (now 3e-4)'),
    ({"BATCH_SIZE": "8.5"}, "BATCH_SIZE = 8.5 is of type float, but BATCH_SIZE is of type int (now 8)"),
    ({"COMPILE": "1"}, "COMPILE = 1 is of type int, but COMPILE is of type bool (now False)"),
    ({"BETAS": "(0.9,)"}, "BETAS = (0.9,) is of type tuple, but BETAS is of type tuple (now (0.9, 0.95))"),
    ({"LAMBDA_SCHEDULE": '"sigmoid"'}, "LAMBDA_SCHEDULE = 'sigmoid' is not one of its options: 'linear', 'cosine'"),
    ({"LR": "__import__('os').system('x')"}, "LR: \"__import__('os').system('x')\" is not a Python literal"),
    ({"LR": "1e-3\nimport os"}, "is not a Python literal"),
    ({"LR": "3e-4"}, "the edit changes nothing (no-op)"),
    ({}, '"set" names no constant'),
    ({"LR": "1e-3", "SEED": "1", "BATCH_SIZE": "4"}, '"set" names 3 constants: at most 2 per experiment'),
])
def test_bad_names_types_and_values_say_why(changes, reason):
    with pytest.raises(ReplyError) as err:
        edit_train_py(TRAIN_PY, knob_reply("x", **changes), "stop", "knob")
    assert reason in str(err.value)


@pytest.mark.parametrize("content, reason", [
    ("LR = 1e-3", "not the JSON object asked for"),
    ('{"description": "x", "set": ["LR", "1e-3"]}', '"set" must be an object'),
    ('{"description": "x"}', "not the JSON object asked for"),
    ("", "the reply was empty"),
])
def test_replies_that_are_not_knob_objects(content, reason):
    with pytest.raises(ReplyError, match=reason):
        edit_train_py(TRAIN_PY, content, "stop", "knob")


# ---------------------------------------------------------------- through the driver
def test_knob_night_sends_the_schema_and_records_bad_values_as_invalid(tmp_path):
    repo = make_research_repo(tmp_path / "research")
    llm = FakeLLM([knob_reply("lower", PPL="18.0"), knob_reply("bad", PPL='"low"'), knob_reply("bad", NOPE="1")])
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "2", "--reply-format", "knob", "--repair-turns", "0",
                         "--no-pipeline")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "keep", "invalid"]
    assert rows["description"][1] == "PPL = 18.0: lower" and rows["val_ppl"][1] == 18.0
    assert rows["reason"][2] == 'PPL = "low" is of type str, but PPL is of type float (now 18.0)'
    request = llm.requests[0]
    schema = request["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["set"]["propertyNames"]["enum"] == ["PPL", "PPL_SCALE", "MODE", "SLEEP_S", "GO_FILE", "META"]
    assert request["max_tokens"] == KNOB_REPLY_TOKENS and "PPL = 20.0" in request["messages"][1]["content"]
    assert check_invariants(repo) == []
