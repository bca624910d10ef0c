"""plot --tag A --tag B: several nights' running-best curves, against experiment number and hours."""
import pandas as pd
import pytest

import agent
from driver.keep import CONFIRM_SIGMAS
from driver.ledger import branch_ledger
from driver.report import plot_overlay, running_best
import prepare

PLANS = {"llm": [("baseline", 40.0), ("baseline", 41.0), ("keep", 35.0), ("discard", 36.5), ("crash", None),
                 ("keep", 30.0)],
         "sweep": [("baseline", 40.0), ("baseline", 40.6), ("discard", 41.0), ("keep", 38.0), ("invalid", None)]}


def write_nights(path):
    for tag, plan in PLANS.items():
        for i, (status, ppl) in enumerate(plan):
            prepare.append_ledger_row({
                "experiment": i, "timestamp": f"2026-11-26T0{i}:30:00+00:00", "branch": f"autoresearch/{tag}",
                "commit": f"{max(i, 1):040x}", "status": status, "val_ppl": ppl, "protocol": "v1" if ppl else None,
                "description": f"{tag} {i}"}, path)


def test_running_best_follows_the_keep_rule_with_its_noise_band(tmp_path):
    write_nights(tmp_path / "results.tsv")
    curve = running_best(branch_ledger(tmp_path / "results.tsv", "autoresearch/llm"))
    assert curve["experiment"].tolist() == [0, 1, 2, 3, 4, 5]
    assert curve["hours"].tolist() == [0, 1, 2, 3, 4, 5]
    # the baselines count by their mean; the crash (no protocol) is still a step of the night
    assert curve["best"].tolist() == [40.0, 40.5, 35.0, 35.0, 35.0, 30.0]
    sigma = pd.Series([40.0, 41.0]).std()
    assert curve["band"].tolist() == [0.0] + [pytest.approx(CONFIRM_SIGMAS * sigma)] * 5


def test_overlay_plot_is_written_for_several_tags(tmp_path):
    write_nights(tmp_path / "results.tsv")
    path = plot_overlay(tmp_path / "results.tsv", ["llm", "sweep"], tmp_path / "overlay.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_several_tags_are_for_plot_only_other_commands_take_the_last():
    assert agent.parse_args(["plot", "--tag", "a", "--tag", "b"]).tags == ["a", "b"]
    args = agent.parse_args(["--tag", "a", "--tag", "b"])
    assert args.tag == "b" and args.tags == ["b"]
