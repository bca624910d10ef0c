"""The short version of bench/kill_resume.py: 16 experiments, 11 SIGKILLs of the driver spread over
its phases, every one resumed or redone, nothing lost."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from kill_resume import RESUMED, run  # noqa: E402


def test_kills_in_every_phase_are_resumed_and_lose_nothing(tmp_path):
    result = run(experiments=16, kills=11, seed=1, workdir=tmp_path)
    assert result["problems"] == [], "\n".join(result["problems"])  # every one: a failure here is rare, keep its evidence
    assert result["orphans"] == 0, result
    assert result["experiments"] >= 16
    # the phases read from the dead driver's state ("done" = between experiments), not the ones aimed at
    assert {"llm", "applying", "committed", "training", "scoring", "done"} <= set(result["phases"]), result["phases"]
    # kills after the commit were resumed (the same commit scored, so the restart logged it)
    after_commit = sum(count for phase, count in result["phases"].items() if phase in RESUMED)
    assert after_commit >= 4 and result["resumed"] == after_commit, result
