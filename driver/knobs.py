"""train.py's knobs: the named constants at its top, their listed options, and setting one or two of them
(--reply-format knob, and the sweep proposer)."""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import re
from typing import Callable

from driver.common import ReplyError, one_line

# A weak model cannot copy lines exactly, but it can name a constant and a value: the reply sets at most
# MAX_KNOBS of train.py's top-level ALL_CAPS constants, each value a Python literal checked before it runs.
MAX_KNOBS = 2
KNOB_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
KNOB_SYSTEM_PROMPT = """You are an autonomous ML research agent improving ternary (1.58-bit) quantization-aware \
training in train.py. Each reply changes ONE or TWO of train.py's named constants; the change is committed, \
trained for 5 minutes and scored by a separate, read-only evaluator (WikiText-2 validation perplexity of the \
exported ternary weights). Lower val_ppl is kept; anything else is reverted.

Reply with ONE JSON object, exactly:
{"description": "<one line: what you changed and why>", "set": {"NAME": "<new value as a Python literal>"}}
NAME is one of the constants listed below. A constant whose comment lists options (a | b | c) takes one of them;
any other keeps its current type. Strings are quoted Python literals, e.g. "cosine" becomes "\\"cosine\\""."""


def knob_options(comment: str) -> list | None:
    """The values a constant's comment names, like `# linear | cosine | exponential` or `# 32 | 64 | "row" (per
    output row)`: the first word of each ' | '-separated part (a literal, or a bare word as a string)."""
    parts = comment.lstrip("#").split(" | ")
    if len(parts) < 2:
        return None
    options = []
    for part in parts:
        match = re.match(r"\s*(\"[^\"]*\"|'[^']*'|[\w.+-]+)", part)
        if not match:
            return None
        with contextlib.suppress(ValueError, SyntaxError):
            options.append(ast.literal_eval(match.group(1)))
            continue
        if not match.group(1).isidentifier():
            return None
        options.append(match.group(1))
    return options


def find_knobs(train_py: str) -> dict[str, dict]:
    """train.py's top-level ALL_CAPS constants with a literal value on one line, in file order:
    name -> {value, text (the value as written), comment, options, line (0-based), start, end (columns)}."""
    lines = train_py.splitlines()
    knobs = {}
    for node in ast.parse(train_py).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and KNOB_NAME.match(node.targets[0].id) and node.lineno == node.end_lineno):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue  # computed at run time (T_PROCESS = time.time()): not a knob
        line = lines[node.lineno - 1].encode()  # ast's columns count UTF-8 bytes
        start, end = len(line[:node.value.col_offset].decode()), len(line[:node.value.end_col_offset].decode())
        line = line.decode()
        comment = line[end:].strip() if line[end:].strip().startswith("#") else ""
        knobs[node.targets[0].id] = {"value": value, "text": line[start:end], "comment": comment,
                                     "options": knob_options(comment), "line": node.lineno - 1, "start": start, "end": end}
    return knobs
KNOB_INT_PATTERN = r"^[0-9]{1,7}$"
KNOB_FLOAT_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,6})?([eE]-?[0-9]{1,2})?$"


def knob_value_schema(knob: dict, known: Callable[[object], bool] = lambda option: False) -> dict | None:
    """What a server that enforces the schema lets the model write for this constant (as Python literal text):
    one of its other options, the other bool, or a number; anything else any short text. A small model then
    cannot write prose for a number or repeat the current option (a no-op). known(option): setting it remakes a
    train.py already scored (a small model undoing a kept change): not offered. None: nothing left to offer."""
    value, options = knob["value"], knob["options"]
    if options or isinstance(value, bool):
        others = [o for o in (options or [True, False]) if not (o == value and type(o) is type(value)) and not known(o)]
        return {"type": "string", "enum": [literal_text(o) for o in others]} if others else None
    if isinstance(value, int):
        return {"type": "string", "pattern": KNOB_INT_PATTERN}
    if isinstance(value, float) or value is None:
        return {"type": "string", "pattern": KNOB_FLOAT_PATTERN}
    return {"type": "string", "maxLength": 40}


def knob_schema(train_py: str, known: Callable[[str], bool] = lambda text: False) -> dict:
    """The reply's JSON schema, built from train.py as it is now: NAME is an enum of its constants. known(text):
    that train.py was already scored, so no option that makes it is offered."""
    def remakes_known(name: str) -> Callable[[object], bool]:
        def check(option) -> bool:
            try:
                return known(set_knobs(train_py, {name: literal_text(option)}))
            except ReplyError:  # an option the checks refuse is no scored file either
                return False
        return check

    values = {name: knob_value_schema(knob, remakes_known(name)) for name, knob in find_knobs(train_py).items()}
    knobs = {name: schema for name, schema in values.items() if schema is not None}
    return {
        "type": "object", "additionalProperties": False, "required": ["description", "set"],
        "properties": {
            "description": {"type": "string", "maxLength": 200},
            # one constant per reply where the server enforces the schema (llama.cpp's grammar ignores maxProperties
            # and a small model then sets a dozen); the driver still takes up to MAX_KNOBS from other servers
            "set": {"type": "object", "propertyNames": {"enum": list(knobs)}, "minProperties": 1,
                    "maxProperties": MAX_KNOBS,
                    "anyOf": [{"type": "object", "additionalProperties": False, "required": [name],
                               "properties": {name: schema}} for name, schema in knobs.items()]},
        },
    }


def knob_listing(train_py: str) -> str:
    """The constants as the prompt shows them: `NAME = value  # comment`, one a line."""
    return "\n".join(f"{name} = {k['text']}" + (f"  {k['comment']}" if k["comment"] else "")
                     for name, k in find_knobs(train_py).items())


def same_kind(value, current) -> bool:
    """value may replace current: bools stay bools, ints stay ints, floats take ints or floats, None takes a
    number, tuples keep their length and numbers."""
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(current, bool)
    if current is None:
        return value is None or isinstance(value, (int, float))
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, tuple):
        return isinstance(value, tuple) and len(value) == len(current) and all(same_kind(v, c) for v, c in zip(value, current))
    return type(value) is type(current)


def knob_literal(name: str, knob: dict, text) -> tuple[object, str]:
    """(value, source text) of a proposed value, or ReplyError saying why it cannot be used."""
    if not isinstance(text, str):  # a JSON number or bool where a literal's text was asked for: take its value
        text = "None" if text is None else repr(text)
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        words = [o for o in knob["options"] or [] if isinstance(o, str)]
        if text not in words and not (text.isidentifier() and isinstance(knob["value"], str) and not knob["options"]):
            raise ReplyError(f"{name}: {one_line(text, 60)!r} is not a Python literal"
                             + (f" (one of: {', '.join(map(repr, knob['options']))})" if knob["options"] else "")) from None
        value = text  # a bare word for a string constant: the small model's spelling of "cosine"
    options = knob["options"]
    if options:  # closed: GROUP_SIZE = 1 (one scale per weight) is no option, whatever its type
        if not any(value == o and type(value) is type(o) for o in options):
            raise ReplyError(f"{name} = {one_line(repr(value), 60)} is not one of its options: "
                             f"{', '.join(map(repr, options))}")
    elif not same_kind(value, knob["value"]):
        raise ReplyError(f"{name} = {one_line(text, 60)} is of type {type(value).__name__}, but {name} is of type "
                         f"{type(knob['value']).__name__} (now {knob['text']})")
    if "\n" in text or "#" in text or text.isidentifier() and value == text:
        text = literal_text(value)
    return value, text


def literal_text(value) -> str:
    """A literal as train.py writes it: strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def set_knobs(train_py: str, changes: dict) -> str:
    """train.py with each NAME's value replaced by the given literal, nothing else touched: the comment stays in
    its column where the new value leaves room. ReplyError for an unknown name or a bad value."""
    knobs = find_knobs(train_py)
    if not changes:
        raise ReplyError('"set" names no constant: set one or two of train.py\'s constants')
    if len(changes) > MAX_KNOBS:
        raise ReplyError(f'"set" names {len(changes)} constants: at most {MAX_KNOBS} per experiment')
    lines = train_py.splitlines(keepends=True)
    for name, text in changes.items():
        if name not in knobs:
            close = difflib.get_close_matches(str(name), list(knobs), n=1)
            raise ReplyError(f"{one_line(name, 40)!r} is not a constant of train.py" +
                             (f" (did you mean {close[0]}?)" if close else f"; the constants: {', '.join(knobs)}"))
        knob = knobs[name]
        _, new = knob_literal(name, knob, text)
        line = lines[knob["line"]]
        head, tail = line[:knob["start"]] + new, line[knob["end"]:]
        if knob["comment"]:  # keep the comment's column when the new value fits before it
            gap = len(tail) - len(tail.lstrip(" "))
            tail = " " * max(gap + knob["end"] - knob["start"] - len(new), min(gap, 2), 1) + tail.lstrip(" ")
        lines[knob["line"]] = head + tail
    return "".join(lines)


def parse_knob_reply(content: str) -> tuple[str, dict]:
    """(description, {NAME: literal text}) of a knob reply, or ReplyError."""
    try:
        data = json.loads(content[content.find("{"): content.rfind("}") + 1])
        changes = data["set"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplyError(f'the reply is not the JSON object asked for, {{"description": ..., "set": {{"NAME": "<value>"}}}} '
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(changes, dict):
        raise ReplyError(f'"set" must be an object {{"NAME": "<value>"}}, not {type(changes).__name__}')
    description = data.get("description") if isinstance(data, dict) else None
    names = ", ".join(f"{k} = {v}" for k, v in changes.items())
    described = one_line(description) if isinstance(description, str) and description.strip() else ""
    return one_line(f"{names}: {described}" if described else f"set {names}"), changes
