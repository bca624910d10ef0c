"""The morning after: progress.png from a ledger with every status, the report's numbers, repeated baselines."""
import re

import pandas as pd
import pytest

from driver.ledger import read_ledger
from driver.report import night_report, plot_progress
import prepare
from driver_helpers import TAG, ledger, make_research_repo, run_agent
from fake_llm import FakeLLM
from standin import prepare as standin_prepare

BRANCH = f"autoresearch/{TAG}"


@pytest.fixture
def night(tmp_path) -> pd.DataFrame:
    """A ledger with every status: two baselines, keeps, discards, a crash, a timeout, an invalid, a manual run."""
    plan = [("baseline", 40.0, "baseline: unmodified train.py"), ("baseline", 41.0, "baseline: unmodified train.py (run 2)"),
            ("keep", 35.0, "cosine lambda warmup"), ("discard", 36.5, "LR 5e-4"), ("crash", None, "group size 7"),
            ("keep", 30.0, "logits KD weight 2"), ("timeout", None, "compile"), ("invalid", None, "(reply rejected)"),
            ("discard", 31.0, "absmax scale"), ("keep", 28.5, "tequila deadzone")]
    best = None
    path = tmp_path / "results.tsv"
    for i, (status, ppl, description) in enumerate(plan):  # both baseline runs score commit 1
        if status in ("baseline", "keep"):
            best = ppl if best is None else min(best, ppl)
        prepare.append_ledger_row({
            "experiment": i, "timestamp": f"2026-11-26T0{i // 6}:{(i % 6) * 10:02d}:00+00:00", "branch": BRANCH,
            "commit": f"{max(i, 1):040x}", "status": status, "val_ppl": ppl, "best_val_ppl": best, "train_s": 300.0 if ppl else 30.0,
            "eval_s": 12.0 if ppl else None, "prompt_tokens": 7000 if i > 1 else None, "completion_tokens": 300 if i > 1 else None,
            "cost_usd": 0.02 if i > 1 else None, "description": description}, path)
    prepare.append_ledger_row({"timestamp": "2026-11-26T03:00:00+00:00", "branch": BRANCH, "status": "manual",
                               "val_ppl": 1.0, "description": "manual run"}, path)
    rows = read_ledger(path)
    return rows[rows["status"] != "manual"]


def test_plot_is_written_from_every_status(night, tmp_path):
    path = plot_progress(night, BRANCH, tmp_path / "progress.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_report_numbers_match_the_ledger(night, tmp_path):
    report = night_report(night, BRANCH, tmp_path / "runs", tmp_path, with_test=False)
    assert "baseline val_ppl 40.5000; best 28.5000 (29.6% lower) at experiment 9" in report
    assert f"std of the baseline runs): {pd.Series([40.0, 41.0]).std():.4f}" in report
    assert "keep 3" in report and "discard 2" in report and "crash 1" in report and "invalid 1" in report
    assert "56,000 prompt + 2,400 completion tokens, $0.16" in report
    kept = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]*) \|", report, re.M)
    assert kept == [("0", "2", "40.5000", ""), ("2", "1", "35.0000", "5.5000"), ("5", "1", "30.0000", "5.0000"),
                    ("9", "1", "28.5000", "1.5000")]
    share = float(re.search(r"spent training: (\d+)%", report).group(1)) / 100
    wall = 9 * 600 + 300 + 12  # last minus first timestamp, plus the first experiment's own run
    assert share == pytest.approx(night["train_s"].sum() / wall, abs=0.01)


def test_repeated_baselines_give_the_noise_and_the_report_scores_the_best_on_test(tmp_path):
    repo = make_research_repo(tmp_path / "research")
    llm = FakeLLM(default_factor=0.9)
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "2", "--baseline-runs", "2")
        assert done.returncode == 0, done.stdout
        rows = ledger(repo)
        assert rows["status"].tolist() == ["baseline", "baseline", "keep", "keep"]
        assert "run-to-run noise (std of 2 baseline runs): 0.0" in llm.requests[0]["messages"][1]["content"]
        report = run_agent(repo, llm.url, "report")
        assert report.returncode == 0, report.stdout
        # the best (last) commit's submission scored on the test split, not validation again
        test_ppl = rows["val_ppl"].iloc[-1] * standin_prepare.TEST_SPLIT_FACTOR
        assert f"test_ppl {test_ppl:.4f}" in report.stdout, report.stdout
        assert (repo / "runs" / TAG / "report.md").read_text().strip() == report.stdout.strip()
        assert run_agent(repo, llm.url, "plot").returncode == 0 and (repo / "progress.png").exists()
    finally:
        llm.close()


def test_noise_aware_acceptance_keeps_clear_gains_and_confirms_marginal_ones(tmp_path):
    repo = make_research_repo(tmp_path / "research")
    # evaluations in order: baseline ×2 (σ = 0.707), a clear gain, a marginal gain + its confirmation,
    # another marginal gain + a confirmation that fails it
    (repo / "jitter.txt").write_text("0.5 -0.5 0 0 0.8 0 2.0")
    llm = FakeLLM([edit_ppl("20.0", "15.0", "clear"), edit_ppl("15.0", "14.5", "marginal, confirmed"),
                   edit_ppl("14.5", "14.0", "marginal, rejected")])
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "3", "--baseline-runs", "2", "--no-pipeline")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    rows = ledger(repo)
    assert rows["description"].tolist() == [
        "baseline: unmodified train.py", "baseline: unmodified train.py (run 2)", "clear", "marginal, confirmed",
        "confirmation run: marginal, confirmed", "marginal, rejected", "confirmation run: marginal, rejected"]
    assert rows["status"].tolist() == ["baseline", "baseline", "keep", "keep", "keep", "discard", "discard"]
    assert rows["val_ppl"].tolist() == [20.5, 19.5, 15.0, 14.5, 15.3, 14.0, 16.0]
    assert rows["best_val_ppl"].tolist() == pytest.approx([20.5, 20.0, 15.0, 14.9, 14.9, 14.9, 14.9])
    assert "within 2 noise widths" in rows["reason"].iloc[3] and "mean 14.9" in rows["reason"].iloc[3]
    assert "mean 15 vs best 14.9" in rows["reason"].iloc[5]
    assert "PPL = 14.5" in (repo / "train.py").read_text()
    status = run_agent(repo, "http://127.0.0.1:9/v1", "status")  # the baselines' mean (20.0) matches no single run
    assert status.returncode == 0 and "baseline val_ppl 20.0000; best 14.9000 (experiment 3" in status.stdout
    from driver_helpers import check_invariants
    assert check_invariants(repo) == []


def test_strict_keeps_any_lower_score_at_once(tmp_path):
    repo = make_research_repo(tmp_path / "research")
    (repo / "jitter.txt").write_text("0.5 -0.5 0 2.0")
    llm = FakeLLM([edit_ppl("20.0", "19.9", "tiny gain")])
    try:
        done = run_agent(repo, llm.url, "--max-experiments", "1", "--baseline-runs", "2", "--strict", "--no-pipeline")
    finally:
        llm.close()
    assert done.returncode == 0, done.stdout
    assert ledger(repo)["status"].tolist() == ["baseline", "baseline", "keep"]


def edit_ppl(old: str, new: str, description: str) -> str:
    return f"DESCRIPTION: {description}\n<<<<<<< SEARCH\nPPL = {old}\n=======\nPPL = {new}\n>>>>>>> REPLACE\n"


def test_report_says_how_many_runs_were_unsandboxed(night, tmp_path):
    assert "- sandbox: every run in Landlock" in night_report(night, BRANCH, tmp_path / "runs", tmp_path,
                                                                     with_test=False)
    night = night.assign(reason=night["reason"].astype(object))  # all empty in the fixture: read as floats
    night.loc[night["experiment"].isin([3, 4]), "reason"] = "unsandboxed; val_ppl not lower"
    report = night_report(night, BRANCH, tmp_path / "runs", tmp_path, with_test=False)
    assert "- sandbox: 2 of 9 runs UNSANDBOXED" in report
