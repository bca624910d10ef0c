"""Round 6 of attacks on the proposer's bookkeeping: the numbering of a second ask's prompt and reply files, the
committed train.py taken byte for byte, and the twin check of a prefetched or pooled proposal."""
import git
import pytest

from driver_helpers import TAG, check_invariants, edit, ledger, run_agent

# names an unsandboxed train.py can leave in the next experiment's folder: a digit str.isdigit() takes and int()
# does not ("²"), and a number whose successor's name is longer than a file name may be (255 bytes)
PLANTED = ["prompt\u00b2.json", "prompt" + "9" * 244 + ".json", "response" + "9" * 244 + ".md"]


@pytest.mark.parametrize("name", PLANTED)
def test_odd_file_names_in_the_next_folder_never_stop_the_night(repo, llm, name):
    """An unsandboxed train.py writes where it likes, the next experiment's folder too: the next ask numbered its
    prompt after a `prompt².json` (int() refused it: the night ended with a ValueError) or after 244 nines (the
    next name was too long for the file system: an OSError)."""
    planted = repo / "runs" / TAG / "2" / name
    plant = (f"META = {{}}\n(REPO / {str(planted.parent)!r}).mkdir(parents=True, exist_ok=True)\n"
             f"(REPO / {str(planted)!r}).write_text('planted')")
    llm.push(edit("META = {}", plant, "plant a file"), edit("PPL = 20.0", "PPL = 18.0", "lower the ppl"))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--no-pipeline", "--sandbox", "off")
    assert planted.exists(), done.stdout[-3000:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["description"].tolist()[1:] == ["plant a file", "lower the ppl"], rows
    folder = planted.parent
    assert (folder / "prompt0.json").exists() and (folder / "response0.md").read_text().startswith("DESCRIPTION: lower")
    assert check_invariants(repo) == []


def test_a_lone_surrogate_in_a_reply_never_stops_or_stalls_the_night(repo, llm):
    """A JSON string may carry a lone surrogate (\\ud800, half of an emoji a server cut in two). In a reply's code
    ast.parse() raised UnicodeEncodeError, no SyntaxError: the night ended with a traceback; in a reply rejected for
    another reason, the repair request could not be encoded and was taken for an outage, retried all night. The
    reply is read with the surrogate as U+FFFD, the replacement character, as the ledger shows one."""
    llm.push(edit("PPL = 20.0", "PPL = 18.0  # \ud800", "lower the ppl"),
             edit("PPL = 21.0", "PPL = 17.0  # \ud800", "a search that is not there"),
             edit("PPL = 18.0  # \ufffd", "PPL = 17.0", "lower it again"))
    done = run_agent(repo, llm.url, "--max-experiments", "2", "--no-pipeline", timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "keep", "keep"], rows
    assert rows["val_ppl"].tolist() == [20.0, 18.0, 17.0]
    committed = git.Repo(repo).commit(rows["commit"].iloc[1]).tree["train.py"].data_stream.read()
    assert "PPL = 18.0  # \ufffd\n".encode() in committed
    assert (repo / "runs" / TAG / "1" / "response0.md").read_text().count("# \ufffd") == 1
    assert len(llm.requests) == 3 and "not found" in llm.requests[2]["messages"][-1]["content"]
    assert check_invariants(repo) == []


LOOPS = {"plus": edit("PPL = 20.0", "PPL = 20.0" + " + 0.0" * 1000, "a loop"),
         "minus": edit("PPL = 20.0", "PPL = " + "-" * 20000 + "20.0", "a loop"),
         "fence": "A loop.\n```python\nimport prepare\nX = " + "-" * 20000 + "1\nprepare.submit({})\n```\n"}


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reply_that_nests_too_deep_for_python_is_a_repair_turn(repo, llm, loop):
    """A weak model's loop (`+ 0.0` a thousand times, a run of minus signs, in an edit or in a whole file in a
    ```python block) gives code Python's parser or compiler cannot take: it raised RecursionError or
    MemoryError, no SyntaxError, and the night ended with a traceback."""
    llm.push(LOOPS[loop], edit("PPL = 20.0", "PPL = 18.0", "lower the ppl"))
    done = run_agent(repo, llm.url, "--max-experiments", "1", "--no-pipeline")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = ledger(repo)
    assert rows["status"].tolist() == ["baseline", "keep"] and rows["val_ppl"].iloc[-1] == 18.0, rows
    assert "nests too deeply" in llm.requests[1]["messages"][-1]["content"]
    assert check_invariants(repo) == []
