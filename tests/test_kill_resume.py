"""The short version of bench/kill_resume.py: 40 experiments, 10 SIGKILLs of the driver, nothing lost."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from kill_resume import run  # noqa: E402


def test_kill_anywhere_and_resume_loses_nothing(tmp_path):
    result = run(experiments=40, kills=10, seed=1, workdir=tmp_path)
    assert result["problems"] == [] and result["orphans"] == 0
    assert result["experiments"] >= 40 and sum(result["phases"].values()) == 10
