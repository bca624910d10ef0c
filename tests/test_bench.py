"""Helpers the benchmarks share."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402


def test_printed_command_is_relative_to_the_repository_root(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(common.ROOT / "bench" / "kill_resume.py"), "--kills", "3"])
    assert common.command_line() == "python bench/kill_resume.py --kills 3"
    monkeypatch.setattr(sys, "argv", ["/elsewhere/script.py"])  # outside the checkout: shown as it is
    assert common.command_line() == "python /elsewhere/script.py"
