"""prepare.py and train.py: the ternary layer, the evaluator, invalid submissions, the trust
boundary, and `python train.py` end to end, on a tiny real Llama model."""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn

import prepare
import train
from conftest import patch_constants
from driver_helpers import TAG, ledger, make_research_repo, run_agent
from driver.scoring import EXIT_GRACE_S


# ---------------------------------------------------------------- BitLinear
def make_bitlinear(out_f=576, in_f=576, lam=1.0, **constants):
    for name, value in constants.items():
        setattr(train, name, value)
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False)
    return linear, train.BitLinear(linear, torch.tensor(lam))


pytestmark = pytest.mark.usefixtures("restore_train_constants")  # tests set train.py's constants in place


@pytest.mark.parametrize("group", [32, 64, 128, 256, "row", "tensor"])
def test_group_options_give_ternary_codes_and_right_shapes(group):
    _, layer = make_bitlinear(out_f=576, in_f=576, GROUP_SIZE=group)  # 576 is not a multiple of 128
    exported = layer.export_ternary()
    codes, scales = exported["codes"], exported["scales"]
    assert codes.dtype == torch.int8 and codes.shape == (576, 576)
    assert set(codes.unique().tolist()) <= {-1, 0, 1} and len(codes.unique()) == 3
    expected = {"row": 576, "tensor": 1}.get(group, 576 * 576 // group if isinstance(group, int) else None)
    assert scales.shape == (expected,)


def test_group_size_that_divides_no_weight_is_a_clear_error():
    _, layer = make_bitlinear(out_f=3, in_f=5, GROUP_SIZE=32)
    with pytest.raises(ValueError, match="does not divide"):
        layer.export_ternary()


@pytest.mark.parametrize("deadzone", ["none", "tequila", "bias", "gradscale"])
@pytest.mark.parametrize("rule", ["mean", "absmax"])
def test_export_equals_forward_at_lambda_one(deadzone, rule):
    _, layer = make_bitlinear(out_f=192, in_f=576, GROUP_SIZE=128, DEADZONE=deadzone, SCALE_RULE=rule)
    if deadzone == "bias":
        layer.input_mean.normal_()
    x = torch.randn(4, 576)
    exported = layer.export_ternary()
    weight = prepare.dequantize(exported)  # the evaluator's own dequantization
    expected = x @ weight.T + (exported["bias"] if exported["bias"] is not None else 0)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_the_plain_linear():
    linear, layer = make_bitlinear(out_f=64, in_f=96, lam=0.0, DEADZONE="tequila")
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), linear(x))


def test_gradients_pass_the_straight_through_estimator():
    _, layer = make_bitlinear(out_f=64, in_f=96, lam=1.0)
    x = torch.randn(5, 96)
    layer(x).pow(2).sum().backward()
    grad = layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradscale_multiplies_only_dead_weight_gradients():
    _, plain = make_bitlinear(out_f=32, in_f=64, lam=1.0, DEADZONE="none")
    x = torch.randn(5, 64)
    plain(x).sum().backward()
    _, scaled = make_bitlinear(out_f=32, in_f=64, lam=1.0, DEADZONE="gradscale", DEADZONE_GRAD_SCALE=3.0)
    scaled(x).sum().backward()
    dead = scaled.export_ternary()["codes"] == 0
    torch.testing.assert_close(scaled.weight.grad[dead], 3.0 * plain.weight.grad[dead])
    torch.testing.assert_close(scaled.weight.grad[~dead], plain.weight.grad[~dead])


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential", "two_phase"])
def test_lambda_schedules_go_from_zero_to_one(schedule):
    train.LAMBDA_SCHEDULE = schedule
    values = [train.lambda_at(step, 0.0) for step in range(0, train.LAMBDA_WARMUP_STEPS + 5)]
    assert values[0] == pytest.approx(0.0) and values[-1] == pytest.approx(1.0)
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------- evaluator
def ternary_submission(env) -> torch.nn.Module:
    model = prepare.load_model()
    train.quantize_model(model, torch.tensor(1.0))
    prepare.submit(model, {"steps": 0})
    return model


def independent_ppl(model, tokens, window, n):
    """Perplexity the textbook way: HF's own loss, one window at a time."""
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            ids = tokens[i * window:(i + 1) * window][None]
            total += model(input_ids=ids, labels=ids).loss.double().item() * (window - 1)
    return math.exp(total / (n * (window - 1)))


def test_evaluator_matches_an_independent_perplexity(tiny_env):
    ternary_model = ternary_submission(tiny_env)
    result = prepare.evaluate(tiny_env["AR_SUBMISSION"])
    tokens = prepare.load_tokens("validation")
    assert result["windows"] == tokens.numel() // 2048 >= 2
    assert result["tokens"] == result["windows"] * 2047
    expected = independent_ppl(ternary_model.eval(), tokens, 2048, result["windows"])
    assert result["ppl"] == pytest.approx(expected, rel=1e-4)
    assert 0 < result["zero_frac"] < 1 and result["max_windows"] is None


def test_token_cache_serves_the_second_load_without_the_tokenizer(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "fresh-cache"))
    calls, real = [], prepare.load_tokenizer
    monkeypatch.setattr(prepare, "load_tokenizer", lambda: calls.append("tokenizer") or real())
    first = prepare.load_tokens("test")
    second = prepare.load_tokens("test")
    assert calls == ["tokenizer"] and torch.equal(first, second)
    assert list((tmp_path / "fresh-cache" / "eval-tokens").glob("test-*.pt"))


def test_rows_follow_hf_semantics(tiny_env):
    rows = prepare._split_rows("validation")
    raw = open(tiny_env["AR_DATA"] + "/wiki.valid.raw", encoding="utf-8").read()
    assert len(rows) == raw.count("\n") and "" in rows and all(r == "" or r.endswith("\n") for r in rows)


def test_max_windows_is_recorded_as_a_smoke_run(tiny_env):
    ternary_submission(tiny_env)
    result = prepare.evaluate(tiny_env["AR_SUBMISSION"], max_windows=1)
    assert result["windows"] == 1 and result["max_windows"] == 1
    assert prepare.protocol_label(result) == "v1-smoke1w"


# ---------------------------------------------------------------- inputs verified by content
def eval_cache_file(cache: Path, split: str = "validation") -> Path:
    [path] = (cache / "eval-tokens").glob(f"{split}-*.pt")
    return path


@pytest.mark.parametrize("attack", ["bare tensor", "stale digest kept", "digest removed", "garbage bytes"])
def test_overwritten_validation_cache_is_rebuilt_and_scores_the_same(tiny_env, tmp_path, monkeypatch, capsys,
                                                                     attack):
    """The attack that was scored ~9x better: other tokens saved at the cache path."""
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    ternary_submission(tiny_env)
    pristine = prepare.evaluate(tiny_env["AR_SUBMISSION"])
    path = eval_cache_file(tmp_path / "cache")
    entry = torch.load(path, weights_only=True)
    easy = torch.zeros_like(entry["tokens"])  # one token repeated: trivially predictable
    if attack == "bare tensor":
        torch.save(easy, path)
    elif attack == "stale digest kept":
        torch.save({**entry, "tokens": easy}, path)
    elif attack == "digest removed":
        torch.save({k: v for k, v in entry.items() if k != "sha256"} | {"tokens": easy}, path)
    else:
        path.write_bytes(b"\x80\x02 not a torch file")
    capsys.readouterr()
    attacked = prepare.evaluate(tiny_env["AR_SUBMISSION"])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: token cache {path} failed its check") and len(err.splitlines()) == 1
    assert attacked["ppl"] == pristine["ppl"]
    assert torch.equal(torch.load(path, weights_only=True)["tokens"], entry["tokens"])  # rebuilt


def test_a_cache_forged_with_its_own_digest_is_caught_by_the_nights_digest(tiny_env, tmp_path, monkeypatch, capsys):
    """Unsandboxed, train.py can forge tokens together with a matching stored digest: only the digest the
    driver took at the start of the night (`eval --expect-tokens`, `sandbox_info()`) catches that."""
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    ternary_submission(tiny_env)
    night = prepare.sandbox_info()["tokens"]["validation"]
    pristine = prepare.evaluate(tiny_env["AR_SUBMISSION"], expect_tokens=night)
    path = eval_cache_file(tmp_path / "cache")
    entry = torch.load(path, weights_only=True)
    easy = torch.zeros_like(entry["tokens"])
    torch.save({**entry, "tokens": easy, "sha256": prepare._tokens_sha256(easy)}, path)
    forged = prepare.evaluate(tiny_env["AR_SUBMISSION"])  # the control: the stored digest alone is fooled
    assert forged["ppl"] < pristine["ppl"] / 2
    capsys.readouterr()
    checked = prepare.evaluate(tiny_env["AR_SUBMISSION"], expect_tokens=night)
    assert checked["ppl"] == pristine["ppl"] and "differs from the tokens of the night's start" in capsys.readouterr().err
    assert torch.equal(torch.load(path, weights_only=True)["tokens"], entry["tokens"])  # rebuilt


def same_size_rewrite(path: Path) -> None:
    """Change the text, keeping the file's size and modification time."""
    before = path.stat()
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(" the ", " teh "), encoding="utf-8")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert path.read_text(encoding="utf-8") != text


def test_rewritten_validation_file_with_same_size_and_mtime_is_refused(tiny_env, tiny_assets, tmp_path, monkeypatch,
                                                                       capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_assets["data"], data)
    monkeypatch.setenv("AR_DATA", str(data))
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    ternary_submission(tiny_env)
    prepare.load_tokens("validation")  # a cache of the pristine text exists
    same_size_rewrite(data / "wiki.valid.raw")
    pinned = dict(item.split("=") for item in tiny_env["AR_DATA_SHA256"].split(","))["validation"]
    assert prepare.main(["eval", tiny_env["AR_SUBMISSION"], "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: the validation text has sha256 ")
    assert f"expected {pinned} (AR_DATA_SHA256)" in err and "AR_DATA_SHA256=validation=" in err


def test_ar_data_sha256_that_is_not_a_digest_gives_the_format(tiny_env, monkeypatch):
    monkeypatch.setenv("AR_DATA_SHA256", "validation=abc")
    with pytest.raises(prepare.HarnessError, match="AR_DATA_SHA256=validation=<64 hex digits>"):
        prepare.load_tokens("validation")


def test_real_wikitext_files_pass_the_pins(real_assets, tmp_path, monkeypatch):
    """Cheap: the text only, no tokenizer. The .raw files and the parquet files give the same text."""
    monkeypatch.delenv("AR_DATA_SHA256", raising=False)
    for folder in (real_assets["data"], real_assets["data"] / "hf-parquet" / "wikitext-2-raw-v1"):
        monkeypatch.setenv("AR_DATA", str(folder))
        for split in ("validation", "test"):
            assert prepare._split_text(split)[1] == prepare.SPLIT_SHA256[split]
    raw = real_assets["data"] / "wiki.valid.raw"
    assert prepare.RAW_FILE_SHA256[raw.name] == prepare._file_sha256(raw)


def test_a_wikitext_file_with_crlf_line_endings_names_the_file_and_the_fix(real_assets, tmp_path, monkeypatch):
    monkeypatch.delenv("AR_DATA_SHA256", raising=False)
    crlf = tmp_path / "wiki.valid.raw"
    crlf.write_bytes((real_assets["data"] / "wiki.valid.raw").read_bytes().replace(b"\n", b"\r\n"))
    monkeypatch.setenv("AR_DATA", str(tmp_path))
    with pytest.raises(prepare.HarnessError) as info:
        prepare._split_text("validation")
    message = str(info.value)
    assert str(crlf) in message and prepare._file_sha256(crlf) in message
    assert prepare.RAW_FILE_SHA256["wiki.valid.raw"] in message and "core.autocrlf" in message


def tamper(path: Path) -> None:
    """A change that still loads: another config value, scaled weights, a re-serialized tokenizer."""
    if path.name == "model.safetensors":
        from safetensors.torch import load_file, save_file
        weights = load_file(path)
        name = next(iter(weights))
        weights[name] = weights[name] * 0.5
        save_file(weights, path, metadata={"format": "pt"})
    elif path.name == "config.json":
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "rms_norm_eps": 0.1}))
    elif path.name == "tokenizer.json":
        path.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    else:
        path.write_text("{}")


@pytest.fixture
def own_model(tiny_assets, tiny_env, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny model that a test may damage, with the digests the driver would record."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], folder)
    monkeypatch.setenv("AR_MODEL", str(folder))
    (tmp_path / "digests.json").write_text(json.dumps(prepare.model_digests()))
    return folder


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "added_tokens.json"])
def test_eval_refuses_a_model_changed_since_the_night_started(own_model, tiny_env, tmp_path, monkeypatch, capsys,
                                                               name):
    ternary_submission(tiny_env)
    expected = json.loads((tmp_path / "digests.json").read_text())
    tamper(own_model / name)
    scored = []
    monkeypatch.setattr(prepare, "evaluate", lambda *a, **k: scored.append(a))
    assert prepare.main(["eval", tiny_env["AR_SUBMISSION"], "--json", "--expect-model",
                         str(tmp_path / "digests.json")]) == 2
    out, err = capsys.readouterr()
    new = prepare._file_sha256(own_model / name)
    assert err == (f"error: the model changed since the night started: {name} sha256 {new} "
                   f"(expected {expected.get(name, 'no such file')})\n")
    assert out == "" and scored == []  # nothing of the changed model was used


def test_eval_with_the_recorded_model_digests_scores_normally(own_model, tiny_env, tmp_path, capsys):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(prepare.model_digests())
    ternary_submission(tiny_env)
    assert prepare.main(["eval", tiny_env["AR_SUBMISSION"], "--json", "--expect-model",
                         str(tmp_path / "digests.json")]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1


def test_sandbox_paths_keep_evaluation_data_out_of_training_reach(tiny_env, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AR_CACHE", str(cache))
    data = Path(tiny_env["AR_DATA"]).resolve()
    readable = prepare.train_read_paths()
    [train_cache] = (cache / "train-tokens").glob("train-*.pt")  # built by the call
    assert train_cache in readable and Path(tiny_env["AR_MODEL"]) in readable
    private = prepare.eval_private_paths()
    assert {data / "wiki.valid.raw", data / "wiki.test.raw", cache / "eval-tokens"} <= set(private)
    assert not any(r.resolve().is_relative_to(p) or p.is_relative_to(r.resolve()) for r in readable for p in private)

    monkeypatch.setenv("AR_TRAIN_SPLIT", "test")  # training reads the test split: then it is not private
    readable = prepare.train_read_paths()
    [test_cache] = (cache / "train-tokens").glob("test-*.pt")
    assert test_cache in readable
    private = prepare.eval_private_paths()
    assert data / "wiki.valid.raw" in private and data / "wiki.test.raw" not in private


def test_training_tokens_load_from_their_cache_where_the_text_is_unreadable(tiny_env, tmp_path, monkeypatch):
    """In the sandbox train.py cannot read the data: the cache train_read_paths() built serves."""
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    prepare.train_read_paths()
    expected = prepare.load_train_tokens()

    def unreadable(split):
        raise PermissionError(13, "Permission denied", f"wiki.{split}.raw")
    monkeypatch.setattr(prepare, "_split_rows", unreadable)
    assert torch.equal(prepare.load_train_tokens(), expected)


def test_train_read_paths_list_the_targets_of_symlinked_model_files(tiny_assets, tiny_env, tmp_path, monkeypatch):
    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(tiny_assets["model"], blobs)
    folder.mkdir()
    for blob in blobs.iterdir():
        (folder / blob.name).symlink_to(blob)
    monkeypatch.setenv("AR_MODEL", str(folder))
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    readable = prepare.train_read_paths()
    assert folder in readable and (blobs / "model.safetensors").resolve() in readable


def test_gguf_conversion_is_keyed_by_content_not_size_and_mtime(tiny_assets, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    monkeypatch.setenv("AR_MODEL", str(gguf))
    monkeypatch.setenv("AR_CACHE", str(tmp_path / "cache"))
    contents = [b"GGUF first model " * 64, b"GGUF other model " * 64]
    for content in contents:  # stand-ins for converted folders, so that nothing is converted
        key = hashlib.sha256(content).hexdigest()[:16]
        shutil.copytree(tiny_assets["model"], tmp_path / "cache" / "models" / f"model-{key}")
    gguf.write_bytes(contents[0])
    first = prepare.model_dir()
    before = gguf.stat()
    gguf.write_bytes(contents[1])
    os.utime(gguf, ns=(before.st_atime_ns, before.st_mtime_ns))
    prepare._GGUF_SHA256.clear()  # a fresh process, as the evaluator is
    assert prepare.model_dir() != first


# ---------------------------------------------------------------- invalid submissions
def corrupt(sub: dict, how: str) -> dict:
    name = next(iter(sub["ternary"]))
    entry = sub["ternary"][name]
    if how == "non-ternary code":
        entry["codes"][0, 0] = 2
    elif how == "missing layer":
        del sub["ternary"][name]
    elif how == "wrong shape":
        entry["codes"] = entry["codes"][:, :-1].contiguous()
    elif how == "NaN scale":
        entry["scales"][0] = float("nan")
    elif how == "float codes":
        entry["codes"] = entry["codes"].float()
    elif how == "full-precision layer smuggled in fp":
        del sub["ternary"][name]
        sub["fp"][f"{name}.weight"] = torch.randn(3, 3)
    elif how == "NaN in fp parameter":
        first = next(iter(sub["fp"]))
        sub["fp"][first] = torch.full_like(sub["fp"][first], float("nan"))
    return sub


REASONS = {"non-ternary code": "not in {-1, 0, 1}", "missing layer": "missing from the submission",
           "wrong shape": "shape", "NaN scale": "finite", "float codes": "torch.int8",
           "full-precision layer smuggled in fp": "missing from the submission",
           "NaN in fp parameter": "NaN"}


@pytest.mark.parametrize("how", list(REASONS))
def test_invalid_submission_is_rejected_with_a_reason(tiny_env, tmp_path, capsys, how):
    ternary_submission(tiny_env)
    sub = torch.load(tiny_env["AR_SUBMISSION"], weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save(corrupt(sub, how), bad)
    assert prepare.main(["eval", str(bad), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invalid submission:") and REASONS[how] in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content", [b"not a torch file at all", None])
def test_a_file_that_is_not_a_submission_is_rejected(tiny_env, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, bad)
    else:
        bad.write_bytes(content)
    assert prepare.main(["eval", str(bad)]) == 2
    assert "not a" in capsys.readouterr().err


def test_submit_names_a_layer_left_full_precision(tiny_env):
    model = prepare.load_model()
    train.quantize_model(model, torch.tensor(1.0))
    model.model.layers[1].mlp.up_proj = nn.Linear(64, 128, bias=False)
    with pytest.raises(prepare.SubmissionError, match=r"model\.layers\.1\.mlp\.up_proj .*Linear"):
        prepare.submit(model)


def test_bad_environment_gives_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("AR_MODEL", str(tmp_path))
    with pytest.raises(prepare.HarnessError, match="has no config.json; pass a hub id"):
        prepare.model_dir()
    monkeypatch.setenv("AR_MODEL", "nobody/nothing-here")
    with pytest.raises(prepare.HarnessError, match="run `python prepare.py` once"):
        prepare.model_dir()
    monkeypatch.setenv("AR_DEADLINE", "tomorrow")
    with pytest.raises(prepare.HarnessError, match="not a unix time"):
        prepare.deadline()
    monkeypatch.setenv("AR_TRAIN_SPLIT", "validation")
    with pytest.raises(prepare.HarnessError, match="never the validation split"):
        prepare.load_train_tokens()


# ---------------------------------------------------------------- train.py end to end
def run_train(workdir, env, deadline_s, **constants):
    """Run train.py; return the finished process, its AR_DEADLINE and a time by which it had exited."""
    patch_constants(workdir / "train.py", **constants)
    deadline = time.time() + deadline_s
    full_env = {**os.environ, **env, "AR_DEADLINE": str(deadline)}
    done = subprocess.run([sys.executable, "train.py"], cwd=workdir, env=full_env, capture_output=True,
                          text=True, timeout=deadline_s + 120)
    return done, deadline, time.time()


FAST = dict(BATCH_SIZE=2, SEQ_LEN=128, EXPORT_RESERVE_S=3.0, LOG_EVERY_S=1.0, LAMBDA_WARMUP_STEPS=5)
FAKE_SCORE = "val_ppl:        1.0000  (protocol v1)"  # what the stock train.py prints after its own evaluation


def test_train_py_end_to_end_before_the_deadline(tiny_env, workdir):
    env = {**tiny_env, "AR_SUBMISSION": str(workdir / "runs" / "x" / "submission.pt")}
    done, deadline, _ = run_train(workdir, env, deadline_s=25, **FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    # training stops and submits before the deadline (the file's write time says when); the in-process
    # evaluation of a manual run comes after
    submission = workdir / "runs" / "x" / "submission.pt"
    assert "submitted" in done.stdout and submission.stat().st_mtime < deadline
    assert "val_ppl:" in done.stdout and "step " in done.stdout
    ledger = pd.read_csv(workdir / "results.tsv", sep="\t")
    assert list(ledger.columns) == prepare.LEDGER_COLUMNS
    row = ledger.iloc[-1]
    assert row["status"] == "manual" and row["steps"] > 0 and row["protocol"] == "v1"
    printed = float(done.stdout.split("val_ppl:")[1].split()[0])
    assert row["val_ppl"] == pytest.approx(printed, rel=1e-4)


def test_train_py_exits_before_deadline_when_scored_externally(tiny_env, workdir):
    """The submission is written before AR_DEADLINE, and the process is gone before the driver would kill it: the
    interpreter's own exit may take a moment past the deadline (a CI run under load: 0.38 s)."""
    env = {**tiny_env, "AR_EVAL": "external"}
    done, deadline, exited_by = run_train(workdir, env, deadline_s=20, **FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(env["AR_SUBMISSION"]).stat().st_mtime < deadline
    assert exited_by < deadline + EXIT_GRACE_S and "val_ppl" not in done.stdout
    assert not (workdir / "results.tsv").exists()


def test_max_steps_ends_training_long_before_the_deadline(tiny_env, workdir):
    """MAX_STEPS: a quick check of a change (and the tests' real runs) takes a few steps, not the whole budget."""
    env = {**tiny_env, "AR_EVAL": "external"}
    done, deadline, exited_by = run_train(workdir, env, deadline_s=90, **{**FAST, "MAX_STEPS": 3})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "after 3 steps" in done.stdout and exited_by < deadline - 45, done.stdout


def test_fake_score_printed_by_train_py_is_not_the_score(tiny_env, tmp_path, llm):
    """The trust boundary, through the driver: train.py prints a fake val_ppl; the ledger holds the score a
    fresh evaluator gives its submission."""
    repo = make_research_repo(tmp_path / "research", real=True)
    path = repo / "train.py"
    path.write_text(path.read_text().replace('print(f"submitted', f'print("{FAKE_SCORE}")\n    print(f"submitted'))
    patch_constants(path, **{**FAST, "MAX_STEPS": 2})  # 2 steps, however loaded the machine
    subprocess.run(["git", "commit", "-qam", "train.py prints a fake score"], cwd=repo, check=True)
    env = {k: v for k, v in tiny_env.items() if k != "AR_SUBMISSION"}
    done = run_agent(repo, llm.url, "--max-experiments", "0", "--timeout", "60", "--eval-windows", "1", timeout=300,
                     **env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert FAKE_SCORE in (repo / "runs" / TAG / "0" / "train.log").read_text()
    scored = subprocess.run([sys.executable, "prepare.py", "eval", str(repo / "runs" / TAG / "0" / "submission.pt"),
                             "--max-windows", "1", "--json"], cwd=repo, env={**os.environ, **env}, capture_output=True,
                            text=True)
    assert scored.returncode == 0, scored.stderr
    honest = json.loads(scored.stdout.strip().splitlines()[-1])["ppl"]
    rows = ledger(repo)
    assert honest > 10 and rows["val_ppl"].tolist() == [pytest.approx(honest, rel=1e-6)]
    # what the row says of the run comes from the real submission's meta and the evaluator's protocol
    assert rows["steps"].tolist() == [2] and rows["protocol"].tolist() == ["v1-smoke1w"], rows.to_dict("records")
