"""Per-worker occupancy: the share of each GPU's night spent training, in status, report and progress.png."""
import argparse
import struct

import pandas as pd
import pytest

from driver.ledger import read_ledger
from driver.report import night_report, night_seconds, plot_progress, show_status, worker_occupancy, worker_of
import prepare

TAG = "occ"
BRANCH = f"autoresearch/{TAG}"

# (experiment, status, end time, train_s, eval_s, reason, description); the night runs from 00:00:00 (row 0's start:
# 00:06:00 - 300 s - 60 s) to 00:20:00, i.e. 1200 s
PLAN = [
    (0, "baseline", "00:06:00", 300.0, 60.0, "worker gpu0; ", "baseline: unmodified train.py"),
    (0, "baseline", "00:07:00", 300.0, 60.0, "worker gpu10; ", "baseline: unmodified train.py (run 2)"),
    (1, "keep", "00:12:00", 240.0, 60.0, "unsandboxed; worker gpu2; gain 2.1 noise widths", "cosine warmup"),
    (1, "keep", "00:13:00", 300.0, 60.0, "worker gpu0; confirmed", "confirmation run: cosine warmup"),
    (2, "invalid", "00:14:00", None, None, "worker gpu7; not run: the reply did not apply", "(reply rejected)"),
    (3, "discard", "00:20:00", 120.0, 30.0, "restored train.py; coworker gpu9; no gain", "LR 1e-4"),  # no marker
]


def write_ledger(path, plan=PLAN) -> pd.DataFrame:
    for experiment, status, clock, train_s, eval_s, reason, description in plan:
        prepare.append_ledger_row({
            "experiment": experiment, "timestamp": f"2026-11-26T{clock}+00:00", "branch": BRANCH,
            "commit": f"{max(experiment, 1):040x}", "status": status, "reason": reason,
            "val_ppl": 40.0 - experiment if train_s else None, "train_s": train_s, "eval_s": eval_s,
            "protocol": "v1" if train_s else None, "description": description}, path)
    return read_ledger(path)


def png_height(path) -> int:
    return struct.unpack(">II", path.read_bytes()[16:24])[1]


def test_worker_occupancy_shares_of_the_night(tmp_path):
    occupancy = worker_occupancy(write_ledger(tmp_path / "results.tsv"))
    assert night_seconds(write_ledger(tmp_path / "again.tsv")) == 1200.0
    expected = pd.DataFrame({  # gpu2 before gpu10; the invalid row's gpu7 never ran; "coworker gpu9" is no marker
        "worker": ["gpu0", "gpu2", "gpu10", "local"], "experiments": [2, 1, 1, 1],
        "train_s": [600.0, 240.0, 300.0, 120.0], "eval_s": [120.0, 60.0, 60.0, 30.0],
        "busy_share": [0.6, 0.25, 0.3, 0.125], "train_share": [0.5, 0.2, 0.25, 0.1]})
    pd.testing.assert_frame_equal(occupancy.reset_index(drop=True), expected, check_dtype=False)


def test_empty_ledger_gives_an_empty_frame(tmp_path):
    occupancy = worker_occupancy(read_ledger(tmp_path / "missing.tsv"))
    assert occupancy.empty and list(occupancy.columns) == ["worker", "experiments", "train_s", "eval_s",
                                                           "busy_share", "train_share"]


def test_worker_marker_is_found_only_at_a_note_boundary():
    assert worker_of("worker node-10.0.0.3/gpu2; crash: lost") == "node-10.0.0.3/gpu2"
    assert worker_of("unsandboxed; worker gpu1; ") == worker_of("worker gpu1;") == "gpu1"  # stripped
    assert worker_of("a coworker gpu1; x") == worker_of(None) == "local"


def test_report_has_the_occupancy_table(tmp_path):
    report = night_report(write_ledger(tmp_path / "results.tsv"), BRANCH, tmp_path / "runs", tmp_path,
                                with_test=False)
    assert "## Per-worker occupancy (share of the night's 0.33 h)" in report
    assert ("| worker | experiments | training share | training+scoring share |\n| --- | ---: | ---: | ---: |\n"
            "| gpu0 | 2 | 50% | 60% |\n| gpu2 | 1 | 20% | 25% |\n| gpu10 | 1 | 25% | 30% |\n| local | 1 | 10% | 12% |\n"
            ) in report


def test_status_prints_each_worker(tmp_path, capsys):
    write_ledger(tmp_path / "results.tsv")
    assert show_status(argparse.Namespace(repo=str(tmp_path), tag=TAG)) == 0
    out = capsys.readouterr().out
    assert "occupancy of the night's 0.33 h:" in out
    assert "  gpu0: 2 runs, training 50%, training+scoring 60%\n  gpu2: 1 run, training 20%" in out
    assert out.index("  gpu2:") < out.index("  gpu10:") < out.index("  local:")


def test_plot_shows_the_workers_only_when_there_are_several(tmp_path):
    rows = write_ledger(tmp_path / "results.tsv")
    two = rows[rows["reason"].str.contains("worker gpu0|worker gpu2", regex=True)]
    many = plot_progress(two, BRANCH, tmp_path / "progress.png")
    assert many.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = plot_progress(rows[rows["reason"].str.contains("coworker")], BRANCH, tmp_path / "one.png")
    assert png_height(one) == 6 * 120  # a single worker: the plot as it always was
    assert png_height(many) > png_height(one)  # the strip of per-worker bars below it


@pytest.mark.parametrize("n", [1, 12, 64])
def test_plot_with_many_workers_is_written(tmp_path, n):
    plan = [(i, "discard" if i else "baseline", f"{(10 + i) // 60:02d}:{(10 + i) % 60:02d}:00", 300.0, 30.0,
             f"worker gpu{i}; ", f"run {i}") for i in range(n)]
    path = plot_progress(write_ledger(tmp_path / "results.tsv", plan), BRANCH, tmp_path / "progress.png")
    assert path.stat().st_size > 10_000


def test_report_share_of_training_is_over_all_workers(tmp_path):
    report = night_report(write_ledger(tmp_path / "results.tsv"), BRANCH, tmp_path / "runs", tmp_path,
                                with_test=False)
    wall = 14 * 60 + 360  # last minus first timestamp, plus the first row's own run (the report's own span)
    assert f"spent training: {1260 / (wall * 4):.0%} of {wall / 3600:.2f} h on each of 4 workers" in report
