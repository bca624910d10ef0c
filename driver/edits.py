"""The LLM's reply applied to train.py: SEARCH/REPLACE blocks, a whole file, JSON or a knob reply; then the
checks that make an edit `invalid` before it costs a training run."""

from __future__ import annotations

import ast
import difflib
import json
import re
from pathlib import Path

from driver.common import ReplyError, one_line
from driver.knobs import parse_knob_reply, set_knobs

# what Python's parser and compiler raise, instead of SyntaxError, on code nested past their limits (a weak model's
# loop: `+ 0.0` a thousand times, a run of minus signs)
TOO_DEEP = (RecursionError, MemoryError)
EVAL_DATA_REFERENCE = re.compile(r"wiki\.(valid|test)|[\"'](validation|test)[\"']|AR_TRAIN_SPLIT")
BLOCK_RE = re.compile(r"^<{7} SEARCH[^\n]*\n(.*?)^={7}[ \t]*\n(.*?)^>{7} REPLACE[^\n]*$", re.S | re.M)
FILE_RE = re.compile(r"^<{7} FILE[^\n]*\n(.*?)^>{7} FILE[^\n]*$", re.S | re.M)
OTHER_FILE_RE = re.compile(r"^(?:[#*`\s]*(?:file|path)?:?\s*)`?([\w./-]+\.(?:py|md|tsv|txt|sh|cfg|toml|json))`?\s*$",
                           re.I | re.M)


def parse_reply(content: str | None, finish_reason: str | None, reply_format: str) -> tuple[str, list, str | None]:
    """(description, [(search, replace)], whole_file or None); ReplyError says what is wrong."""
    if finish_reason == "length":
        raise ReplyError("the reply was cut off by the length limit: reply with a shorter change")
    if not content or not content.strip():
        raise ReplyError("the reply was empty: reply with a DESCRIPTION line and SEARCH/REPLACE blocks")
    if reply_format == "json":
        return parse_json_reply(content)
    content = content.replace("\r\n", "\n")
    outside = BLOCK_RE.sub("", FILE_RE.sub("", content))
    named = OTHER_FILE_RE.findall(outside) + re.findall(r"^<{7} (?:SEARCH|FILE)[ \t]+(\S+)", content, re.M)
    others = sorted({m for m in named if Path(m).name != "train.py"})
    if others:
        raise ReplyError(f"the reply names other files ({', '.join(others)}): only train.py may change")
    blocks = BLOCK_RE.findall(content)
    files = FILE_RE.findall(content)
    markers = len(re.findall(r"^<{7} (?:SEARCH|FILE)", content, re.M))
    if markers != len(blocks) + len(files):
        raise ReplyError(f"{markers - len(blocks) - len(files)} of {markers} blocks have broken markers: each needs "
                         "'<<<<<<< SEARCH', '=======', '>>>>>>> REPLACE' on lines of their own (or FILE ... FILE)")
    if not blocks and not files:
        return whole_file_in_fence(content)
    if files and (blocks or len(files) > 1):
        raise ReplyError("use either SEARCH/REPLACE blocks or ONE whole-file block, not both")
    match = re.search(r"^\W*DESCRIPTION:\s*(.+)$", content, re.M | re.I)
    prose = [ln for ln in outside.splitlines() if ln.strip(" `#*") and not ln.startswith("```")]
    description = one_line(match.group(1) if match else (prose[0] if prose else "(no description)"))
    return description, blocks, (strip_fence(files[0]) if files else None)
FENCE_RE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
FENCE_LANGUAGES = ("python", "py", "python3", "")


def whole_file_in_fence(content: str) -> tuple[str, list, str]:
    """Many models answer with a description and the complete train.py in ONE ```python fence. With no
    SEARCH/REPLACE or FILE marker in the reply, that is a whole-file edit when it is the reply's only
    code block, compiles, and calls prepare.submit; anything else is the usual 'no block' rejection."""
    fences = FENCE_RE.findall(content)
    fence_lines = len(re.findall(r"^```", content, re.M))
    why = ""
    if len(fences) == 1 and fence_lines == 2 and fences[0][0].lower() in FENCE_LANGUAGES:
        code = fences[0][1]
        try:
            tree = ast.parse(code, "train.py")
        except SyntaxError as exc:
            tree, why = None, f" (the ```python block is not a complete train.py: line {exc.lineno}: {exc.msg})"
        except TOO_DEEP as exc:
            tree, why = None, f" (the ```python block nests too deeply for Python: {type(exc).__name__})"
        if tree is not None and calls_submit(tree):
            outside = FENCE_RE.sub("", content)
            match = re.search(r"^\W*DESCRIPTION:\s*(.+)$", outside, re.M | re.I)
            prose = [ln for ln in outside.splitlines() if ln.strip(" `#*")]
            return one_line(match.group(1) if match else (prose[0].strip(" #*") if prose else "(no description)")), [], code
        why = why or " (the ```python block is not a complete train.py: it has no prepare.submit(...) call)"
    elif len(fences) > 1:
        why = f" ({len(fences)} code blocks: a whole train.py goes in ONE ```python block)"
    raise ReplyError("no SEARCH/REPLACE block found: use the exact block format" + why)


def parse_json_reply(content: str) -> tuple[str, list, None]:
    try:
        data = json.loads(content[content.find("{"): content.rfind("}") + 1])
        edits = [(e["search"], e["replace"]) for e in data["edits"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReplyError(f"the reply is not the JSON object asked for ({type(exc).__name__}: {exc})") from None
    for i, edit in enumerate(edits, 1):  # null or a number where text belongs: say so, never a traceback later
        if not all(isinstance(part, str) for part in edit):
            raise ReplyError(f"edit {i}: \"search\" and \"replace\" must both be strings (got "
                             f"{type(edit[0]).__name__} and {type(edit[1]).__name__})")
    description = data.get("description")
    return one_line(description if isinstance(description, str) and description.strip() else "(no description)"), edits, None


def strip_fence(text: str) -> str:
    """A whole file wrapped in a markdown fence inside the FILE block: drop the outer fence only."""
    lines = text.splitlines(keepends=True)
    if len(lines) >= 2 and lines[0].startswith("```") and lines[-1].strip() == "```":
        return "".join(lines[1:-1])
    return text


def closest_lines(text: str, search: str) -> str:
    """Where the SEARCH text nearly matches, to help the LLM copy it exactly."""
    lines, want = text.splitlines(), search.splitlines() or [""]
    best, where = 0.0, 0
    for i in range(max(len(lines) - len(want) + 1, 1)):
        score = difflib.SequenceMatcher(None, "\n".join(lines[i:i + len(want)]), "\n".join(want)).ratio()
        if score > best:
            best, where = score, i
    excerpt = "\n".join(lines[where:where + len(want)])
    return f"closest lines {where + 1}-{where + len(want)} of train.py ({best:.0%} similar):\n{excerpt}"


def near_miss(text: str, search: str) -> str:
    """Why an exact match failed, and where the SEARCH text nearly matches."""
    part = search.strip("\n")
    if part and part in text:
        lines = sorted({text[:m.start()].count("\n") + 1 for m in re.finditer(re.escape(part), text)})
        full = "\n".join(text.splitlines()[n - 1] for n in lines[:3])
        return (f" It matches only part of line(s) {lines}: copy whole lines exactly, comments included:\n{full}")
    squash = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    hint = " It matches only if whitespace is ignored: copy the indentation exactly." \
        if squash(search) and squash(search) in squash(text) else ""
    return f"{hint}\n{closest_lines(text, search)}"


def apply_blocks(text: str, blocks: list) -> str:
    for i, (search, replace) in enumerate(blocks, 1):
        if not search.strip():
            raise ReplyError(f"block {i}: the SEARCH part is empty; copy the lines to replace, or use a FILE block")
        count = text.count(search)
        if count == 1:
            text = text.replace(search, replace, 1)
            continue
        if count > 1:
            starts = [text[:m.start()].count("\n") + 1 for m in re.finditer(re.escape(search), text)]
            raise ReplyError(f"block {i}: SEARCH matches {count} times (lines {starts}); add surrounding lines "
                             "so it matches exactly once")
        raise ReplyError(f"block {i}: SEARCH text not found in train.py.{near_miss(text, search)}")
    return text


def calls_submit(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "submit"
               and isinstance(node.func.value, ast.Name) and node.func.value.id == "prepare" for node in ast.walk(tree))


def validate_train_py(old: str, new: str) -> None:
    """Checks that make an edit `invalid` before it costs a training run."""
    if new == old:
        raise ReplyError("the edit changes nothing (no-op): propose an actual change")
    try:
        tree = ast.parse(new, "train.py")
        compile(tree, "train.py", "exec")
    except SyntaxError as exc:
        raise ReplyError(f"the new train.py does not compile: {exc.msg} at line {exc.lineno}: "
                         f"{(exc.text or '').strip()}") from None
    except TOO_DEEP as exc:
        raise ReplyError(f"the new train.py does not compile: it nests too deeply for Python ({type(exc).__name__}): "
                         "write the expression in steps") from None
    if not calls_submit(tree):
        raise ReplyError("the edit removes the prepare.submit(...) call: train.py must end by submitting")
    added = "\n".join(set(new.splitlines()) - set(old.splitlines()))
    if EVAL_DATA_REFERENCE.search(added):
        raise ReplyError("the edit refers to the validation/test data or the training split: train only on "
                         "prepare.load_train_tokens()")


def edit_train_py(old: str, content: str | None, finish_reason: str | None, reply_format: str,
                  blocks_only: bool = False) -> tuple[str, str]:
    """The reply applied to train.py's text: (description, new text), or ReplyError saying why not.
    blocks_only: the reply was written for an older train.py; a whole file would undo what changed since."""
    if reply_format == "knob":
        return knob_edit(old, content, finish_reason)
    description, blocks, whole = parse_reply(content, finish_reason, reply_format)
    if whole is not None and blocks_only:
        raise ReplyError("a whole-file reply written for an older train.py")
    new = whole if whole is not None else apply_blocks(old, blocks)
    validate_train_py(old, new)
    return description, new


def knob_edit(old: str, content: str | None, finish_reason: str | None) -> tuple[str, str]:
    """A knob reply applied to train.py: (description, new text), or ReplyError."""
    if finish_reason == "length":
        raise ReplyError("the reply was cut off by the length limit: reply with the short JSON object only")
    if not content or not content.strip():
        raise ReplyError('the reply was empty: reply with {"description": ..., "set": {"NAME": "<value>"}}')
    description, changes = parse_knob_reply(content)
    new = set_knobs(old, changes)
    validate_train_py(old, new)
    return description, new
