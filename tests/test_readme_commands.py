"""Every `python agent.py|prepare.py|train.py ...` command the README shows (code blocks, tables, inline code)
parses with the real argument parsers: a renamed or removed flag fails here, not on a user's first night."""
import contextlib
import io
import re
import shlex

import pytest

import agent
import prepare
from driver_helpers import ROOT

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"^(?:python3? )?(agent|prepare|train)\.py(?: |$)")


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, its arguments) for each command: the lines of code blocks, then inline code outside them
    (table cells and prose); `&&` chains split, `VAR=value` prefixes and `# comments` dropped."""
    blocks = FENCE.findall(text)
    pieces = [line for block in blocks for line in block.splitlines()]
    pieces += INLINE.findall(FENCE.sub("", text))
    found = []
    for piece in pieces:
        for part in piece.split("&&"):
            words = shlex.split(part, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words.pop(0)
            match = COMMAND.match(" ".join(words))
            if match:
                script = match.group(1)
                found.append((script, words[words.index(f"{script}.py") + 1:]))
    return found


def parse_error(script: str, args: list[str]) -> str:
    """What the script's own parser says of these arguments ('' when it takes them)."""
    if script == "train":
        return "" if not args else "train.py takes no arguments (its settings are AR_* variables)"
    parse = agent.parse_args if script == "agent" else prepare.build_parser().parse_args
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse(args)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    return ""


@pytest.fixture(scope="module")
def commands() -> list[tuple[str, list[str]]]:
    return readme_commands((ROOT / "README.md").read_text())


def test_the_readme_commands_are_found(commands):
    """Not vacuous: the README's command lines are all seen (the overnight one, the table's, many GPUs, ...)."""
    lines = {" ".join([script, *args]) for script, args in commands}
    assert sum(script == "agent" for script, _ in commands) >= 12, lines
    for expected in ("agent --tag nov26 --model gpt-4o --max-hours 10 --price-in 2.5 --price-out 10",
                     "agent --model local --reply-format knob", "agent --gpus 0,2,5", "agent --ray auto",
                     "agent plot --tag nov26 --tag sweep1", "prepare", "train", "prepare eval --split test"):
        assert expected in lines, (expected, sorted(lines))


def test_every_readme_command_parses(commands):
    bad = [(script, args, error) for script, args in commands if (error := parse_error(script, args))]
    assert bad == [], "README commands the parsers refuse (rename them in README.md or restore the flag):\n" + \
        "\n".join(f"  python {script}.py {' '.join(args)}: {error}" for script, args, error in bad)


def test_a_renamed_flag_is_caught():
    """The check itself: a command with a flag the parser does not know is reported with argparse's reason."""
    [(script, args)] = readme_commands("```bash\npython agent.py --reply-fmt=knob  # a typo\n```\n")
    assert (script, args) == ("agent", ["--reply-fmt=knob"])
    assert "unrecognized arguments: --reply-fmt=knob" in parse_error(script, args)
    assert "invalid choice: 'tset'" in parse_error("prepare", ["eval", "x.pt", "--split", "tset"])
