"""Round 5 of attacks on the proposer's side: the prompt's order (for a server's prefix cache) and the twin check
(a proposal may not remake a train.py this branch already scored), against a hand-edited ledger and a second
protocol on the same tag."""
from driver_helpers import check_invariants, edit, ledger, run_agent


def test_a_scored_row_without_an_experiment_number_never_stops_the_night(baseline_repo, llm):
    """A hand edit (or a train.py that wrote results.tsv) left a scored row whose experiment cell is empty or inf
    (read as empty): the twin check names rows by number, and int(nan) ended the night with a traceback."""
    repo = baseline_repo
    path = repo / "results.tsv"
    header, baseline = path.read_text().splitlines()[:2]
    cells = dict(zip(header.split("\t"), baseline.split("\t")))
    for number in ("", "inf"):
        path.write_text(path.read_text() + "\t".join({**cells, "experiment": number, "status": "discard"}.values()) + "\n")
    llm.push(edit("PPL = 20.0", "PPL = 18.0", "lower the ppl"))
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "discard", "discard", "keep"], rows
    assert rows["experiment"].iloc[-1] == 1 and rows["val_ppl"].iloc[-1] == 18.0


def test_a_train_py_scored_only_under_another_protocol_runs_again(repo, llm):
    """A daytime smoke run (--eval-windows) and a full night on the same tag each get their own baselines: a smoke
    score is not compared with full ones, so the full night's twin check must not take it for a known score."""
    worse = edit("PPL = 20.0", "PPL = 21.0", "raise the ppl")
    llm.push(worse)
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--eval-windows", "2")
    assert done.returncode == 0, done.stdout[-3000:]
    llm.push(worse)
    done = run_agent(repo, llm.url, "--max-experiments", "1")
    assert done.returncode == 0, done.stdout[-3000:]
    rows = ledger(repo)
    assert rows["protocol"].tolist() == ["v1-smoke2w", "v1-smoke2w", "v1", "v1"], rows
    assert rows["status"].tolist() == ["baseline", "discard", "baseline", "discard"], rows
    assert rows["description"].iloc[3] == "raise the ppl" and rows["val_ppl"].iloc[3] == 21.0
    assert "the same program as the file" not in done.stdout
    assert check_invariants(repo) == []
