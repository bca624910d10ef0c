"""Issue 19 items 1 and 2: "provably ternary" means a bounded number of scales (the closed quantization grid,
bits per weight, meta made safe for the eval JSON), and every malformed submission is a clear rejection
(types, dtypes, shapes, values, the zip before torch.load), on the tiny real Llama model."""
import copy
import json
import math
import os
import resource
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from driver.common import ReplyError
from driver.knobs import find_knobs
from driver.edits import knob_edit
import prepare
import train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = (ROOT / "train.py").read_text()
GRID = [32, 64, 128, 256, "row", "tensor"]


pytestmark = pytest.mark.usefixtures("restore_train_constants")  # tests set train.py's constants in place


# ---------------------------------------------------------------- helpers
def quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder linears, found here without prepare: every nn.Linear but the output head."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}


def train_submission(group, deadzone: str = "none", meta: dict | None = None) -> Path:
    """What train.py submits with GROUP_SIZE = group, at λ = 1, without training."""
    train.GROUP_SIZE, train.DEADZONE = group, deadzone
    model = prepare.load_model()
    train.quantize_model(model, torch.tensor(1.0))
    return prepare.submit(model, meta if meta is not None else {"steps": 0})


def one_scale_per_weight(path: Path) -> Path:
    """The attack: codes = sign(w), scales = |w|, i.e. the full-precision weights exactly."""
    model = prepare.load_model()
    linears = quantized_linears(model)
    ternary = {name: {"codes": torch.sign(m.weight.detach()).to(torch.int8).contiguous(),
                      "scales": m.weight.detach().abs().flatten().clone()} for name, m in linears.items()}
    weights = {f"{name}.weight" for name in linears}
    fp = {n: p.detach().clone() for n, p in model.named_parameters() if n not in weights}
    torch.save({"ternary": ternary, "fp": fp, "meta": {"steps": 0}}, path)
    return path


def eval_json(path: Path, capsys) -> dict:
    code = prepare.main(["eval", str(path), "--json", "--max-windows", "1"])
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.strip().splitlines()
    return json.loads(lines[-1])


def eval_subprocess(path: Path, limit_as: int | None = None) -> subprocess.CompletedProcess:
    """`python prepare.py eval PATH --json` in a fresh process (tiny_env's variables), optionally under RLIMIT_AS."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), "eval", str(path), "--json", "--max-windows", "1"],
                          capture_output=True, text=True, timeout=300, preexec_fn=cap if limit_as else None)


def assert_rejected(done: subprocess.CompletedProcess, *phrases: str) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("invalid submission: "), done.stderr[-3000:]
    for phrase in phrases:
        assert phrase in last, last
    return last


def independent_bits(model: nn.Module, scales_of, with_bias: bool) -> float:
    """Bits per weight by hand: log2(3) per code, 16 per scale and per bias entry, over the decoder linears."""
    bits = weights = 0
    for m in quantized_linears(model).values():
        out, numel = m.weight.shape[0], m.weight.numel()
        bits += numel * math.log2(3) + 16 * (scales_of(m.weight) + (out if with_bias else 0))
        weights += numel
    return bits / weights


# ---------------------------------------------------------------- item 1: the closed grid
def test_one_scale_per_weight_is_rejected_by_the_evaluator_and_would_have_scored_full_precision(
        tiny_env, tmp_path, monkeypatch):
    attack = one_scale_per_weight(tmp_path / "attack.pt")
    done = eval_subprocess(attack)
    last = assert_rejected(done, prepare.QUANT_GRID, f"{math.log2(3) + 16:.3f} bits per weight")
    assert "one per 1 weights" in last
    # the control: without the grid the same file is the full-precision model, scored as such
    monkeypatch.setattr(prepare, "grid_group_counts", lambda shape: {math.prod(shape)})
    cheat = prepare.evaluate(attack, max_windows=1)
    base = prepare.evaluate(None, max_windows=1)
    assert cheat["ppl"] == pytest.approx(base["ppl"], rel=1e-4)


@pytest.mark.parametrize("group", GRID)
def test_every_grid_option_of_train_py_is_accepted(tiny_env, capsys, group):
    result = eval_json(train_submission(group), capsys=capsys)
    assert math.isfinite(result["ppl"]) and math.log2(3) < result["bits_per_weight"] < math.log2(3) + 16 / 32 + 1e-9


def test_bits_per_weight_of_a_per_row_submission(tiny_env, capsys):
    result = eval_json(train_submission("row"), capsys=capsys)
    expected = independent_bits(prepare.load_model(), lambda w: w.shape[0], with_bias=False)
    assert result["bits_per_weight"] == pytest.approx(expected, rel=1e-12)


def test_bits_per_weight_of_a_group_128_submission_with_biases(tiny_env, capsys):
    path = train_submission(128, deadzone="tequila")  # tequila folds into an exported bias per layer
    assert all(e["bias"] is not None for e in torch.load(path, weights_only=True)["ternary"].values())
    result = eval_json(path, capsys=capsys)
    expected = independent_bits(prepare.load_model(), lambda w: w.numel() // 128, with_bias=True)
    assert result["bits_per_weight"] == pytest.approx(expected, rel=1e-12)
    assert result["bits_per_weight"] > math.log2(3) + 16 / 128  # the biases count


def grid_entry(shape, n_scales: int) -> dict:
    return {"codes": torch.ones(shape, dtype=torch.int8), "scales": torch.ones(n_scales)}


@pytest.mark.parametrize("n_scales, why", [
    (64 * 64, "one per weight"), (64 * 64 // 2, "groups of 2"), (64 * 64 // 16, "groups of 16"),
    (8, "groups of 512: coarser than 256 but neither per row nor per tensor"), (3, "a count that divides nothing"),
])
def test_scale_counts_off_the_grid_name_the_grid_and_the_bits(n_scales, why):
    with pytest.raises(prepare.SubmissionError) as err:
        prepare._check_ternary_entry("q", grid_entry((64, 64), n_scales), (64, 64))
    message = str(err.value)
    bits = (64 * 64 * math.log2(3) + 16 * n_scales) / (64 * 64)
    assert prepare.QUANT_GRID in message and f"{bits:.3f} bits per weight" in message, why
    assert "1, 16, 32, 64, 128 scales for this layer" in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("shape, n_scales", [((64, 64), 1), ((64, 64), 64), ((64, 64), 128), ((64, 64), 16),
                                             ((32, 64), 32), ((32, 64), 2048 // 256), ((576, 576), 576 * 576 // 128)])
def test_grid_counts_pass_the_check(shape, n_scales):
    prepare._check_ternary_entry("q", grid_entry(shape, n_scales), shape)


def test_train_py_refuses_a_group_size_off_the_grid():
    train.GROUP_SIZE = 1
    layer = train.BitLinear(nn.Linear(64, 32, bias=False), torch.tensor(1.0))
    with pytest.raises(ValueError, match="off the evaluator's grid: groups of 32, 64, 128 or 256"):
        layer.export_ternary()


def test_submit_refuses_a_train_py_that_quantizes_off_the_grid(tiny_env, monkeypatch):
    monkeypatch.setattr(train, "n_groups", lambda weight: weight.numel())  # an edit that removes train.py's guard
    model = prepare.load_model()
    train.quantize_model(model, torch.tensor(1.0))
    with pytest.raises(prepare.SubmissionError, match="off the quantization grid"):
        prepare.submit(model)


@pytest.mark.parametrize("value", ["1", 1, "16", "512", "1.0", '"1"', "True"])
def test_the_knob_format_refuses_group_sizes_off_the_grid(value):
    reply = json.dumps({"description": "finer groups", "set": {"GROUP_SIZE": value}})
    with pytest.raises(ReplyError) as err:
        knob_edit(TRAIN_PY, reply, "stop")
    assert "is not one of its options: 32, 64, 128, 256, 'row', 'tensor'" in str(err.value)


def test_the_knob_format_still_takes_grid_values():
    for value in ("64", "256", '"tensor"', "tensor"):
        _, new = knob_edit(TRAIN_PY, json.dumps({"description": "x", "set": {"GROUP_SIZE": value}}), "stop")
        assert find_knobs(new)["GROUP_SIZE"]["value"] in (64, 256, "tensor")
    assert find_knobs(TRAIN_PY)["GROUP_SIZE"]["options"] == GRID


# ---------------------------------------------------------------- item 1: meta, made safe for the eval JSON
HOSTILE_META = {
    "steps": 12, "tokens": 2 ** 40, "peak_mem_gb": 1.5, "final_loss": torch.tensor(2.25),
    "nan": float("nan"), "inf": float("inf"), "big_int": 2 ** 80, "flag": True, "zero_d_bool": torch.tensor(True),
    "zero_d_inf": torch.tensor(float("inf")), "matrix": torch.ones(2, 3), "text": "fine\tbut\nnot a number",
    "nested": {"a": 1}, "listed": [1, 2], "none": None, "bad name": 1.0, "1starts_with_digit": 1.0,
    "newline_at_end\n": 2.0, "x" * 65: 3.0, 7: 1.0,
}
SAFE_META = {"steps": 12, "tokens": 2 ** 40, "peak_mem_gb": 1.5, "final_loss": 2.25}
DROPPED = ["nan", "inf", "big_int", "flag", "zero_d_bool", "zero_d_inf", "matrix", "text", "nested", "listed", "none",
           "bad name", "1starts_with_digit", "newline_at_end?", "x" * 64, "<int>"]


def test_safe_meta_keeps_finite_numbers_under_plain_names_only():
    meta, dropped = prepare.safe_meta({"model": "/some/path", "protocol": 1, **HOSTILE_META})
    assert meta == SAFE_META and all(type(v) in (int, float) for v in meta.values())
    assert dropped == DROPPED  # the keys prepare.submit adds itself are not train.py's to report
    assert prepare.safe_meta(None) == ({}, []) and prepare.safe_meta([1, 2]) == ({}, ["meta"])
    many = {f"k{i}": "x" for i in range(100)} | {f"n{i}": i for i in range(100)}
    meta, dropped = prepare.safe_meta(many)
    assert len(dropped) == prepare.META_MAX_DROPPED and len(meta) == prepare.META_MAX_KEYS


def test_eval_json_carries_the_safe_meta_on_one_line(tiny_env):
    path = train_submission("row", meta=HOSTILE_META)
    done = eval_subprocess(path)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)  # one line, strict JSON (no NaN)
    assert result["meta"] == SAFE_META and result["meta_dropped"] == DROPPED
    assert "NaN" not in last and "Infinity" not in last


def test_base_eval_json_has_the_same_keys(tiny_env, capsys):
    assert prepare.main(["eval", "--base", "--json", "--max-windows", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["meta"] == {} and result["meta_dropped"] == [] and result["bits_per_weight"] is None


# ---------------------------------------------------------------- item 2: every malformed submission is a clear rejection
@pytest.fixture
def valid_sub(tiny_env) -> dict:
    return torch.load(train_submission(128, deadzone="tequila"), weights_only=True)


LAYER = "model.layers.0.self_attn.k_proj"  # [32, 64]: not square, so a transposed code matrix is a wrong shape


def first(sub) -> dict:
    return sub["ternary"][LAYER]


def set_entry(key, make):
    def mutate(sub):
        entry = first(sub)
        entry[key] = make(entry)
    return mutate


def drop_entry(key):
    return lambda sub: first(sub).pop(key)


def set_fp(make):
    def mutate(sub):
        name = next(iter(sub["fp"]))
        sub["fp"][name] = make(sub["fp"][name])
    return mutate


HUGE = 10 ** 6  # 10**12 elements declared over one stored element: a regression allocates terabytes and fails fast
MUTATIONS = {
    # the file's top level
    "a list, not a dict": (lambda sub: [sub], "expected a dict"),
    "no fp": (lambda sub: sub.pop("fp"), "expected a dict"),
    "no ternary": (lambda sub: sub.pop("ternary"), "expected a dict"),
    "ternary is a list": (lambda sub: sub.update(ternary=list(sub["ternary"].values())), "expected a dict"),
    "extra top-level key": (lambda sub: sub.update(weights=torch.zeros(3)), "unknown keys 'weights'"),
    # the ternary layers
    "an extra layer": (lambda sub: sub["ternary"].update({"model.layers.9.mlp.up_proj": first(sub)}),
                       "are not linears of the base model"),
    "a layer keyed by an int": (lambda sub: sub["ternary"].update({7: first(sub)}), "ternary entries 7"),
    "a missing layer": (lambda sub: sub["ternary"].pop(next(iter(sub["ternary"]))), "missing from the submission"),
    "entry is a tensor": (lambda sub: sub["ternary"].update({LAYER: torch.zeros(3)}),
                          "entry must be a dict"),
    "entry is None": (lambda sub: sub["ternary"].update({LAYER: None}), "entry must be a dict"),
    "entry with an extra key": (set_entry("zero_point", lambda e: torch.zeros(1)), "unknown keys 'zero_point'"),
    "entry without codes": (drop_entry("codes"), "needs tensors 'codes' and 'scales'"),
    "entry without scales": (drop_entry("scales"), "needs tensors 'codes' and 'scales'"),
    "codes as a list": (set_entry("codes", lambda e: e["codes"].tolist()), "got a list"),
    "codes float32": (set_entry("codes", lambda e: e["codes"].float()), "must be torch.int8"),
    "codes int16": (set_entry("codes", lambda e: e["codes"].to(torch.int16)), "must be torch.int8"),
    "codes bool": (set_entry("codes", lambda e: e["codes"] != 0), "must be torch.int8"),
    "codes transposed": (set_entry("codes", lambda e: e["codes"].t().contiguous()), "the base model's weight is"),
    "codes flattened": (set_entry("codes", lambda e: e["codes"].flatten()), "the base model's weight is"),
    "codes of a huge declared shape": (set_entry("codes", lambda e: torch.zeros(1, dtype=torch.int8).expand(HUGE, HUGE)),
                                       "the base model's weight is"),
    "codes sparse": (set_entry("codes", lambda e: e["codes"].to_sparse()), "needs tensors"),
    "a code of 2": (set_entry("codes", lambda e: e["codes"].index_fill(0, torch.tensor([0]), 2)), "not ternary"),
    "a code of -128": (set_entry("codes", lambda e: e["codes"].index_fill(0, torch.tensor([0]), -128)), "not ternary"),
    "scales as a float": (set_entry("scales", lambda e: 0.5), "and a float"),
    "scales int": (set_entry("scales", lambda e: e["scales"].long()), "1-D float tensor"),
    "scales complex": (set_entry("scales", lambda e: e["scales"].to(torch.complex64)), "1-D float tensor"),
    "scales 2-D": (set_entry("scales", lambda e: e["scales"][:, None]), "1-D float tensor"),
    "scales empty": (set_entry("scales", lambda e: e["scales"][:0]), "off the quantization grid"),
    "scales one per weight": (set_entry("scales", lambda e: torch.ones(e["codes"].numel())), "off the quantization grid"),
    "scales of a huge declared size": (set_entry("scales", lambda e: torch.ones(1).expand(HUGE * HUGE)),
                                       "off the quantization grid"),
    "scales NaN": (set_entry("scales", lambda e: e["scales"].index_fill(0, torch.tensor([0]), float("nan"))), "finite"),
    "scales -inf": (set_entry("scales", lambda e: e["scales"].index_fill(0, torch.tensor([0]), -float("inf"))), "finite"),
    "scales float64 1e300": (set_entry("scales", lambda e: torch.full_like(e["scales"], 1e300, dtype=torch.float64)),
                             "finite"),
    "bias as a list": (set_entry("bias", lambda e: e["bias"].tolist()), "bias must be a float tensor"),
    "bias as a string": (set_entry("bias", lambda e: "0.0"), "bias must be a float tensor"),
    "bias int": (set_entry("bias", lambda e: e["bias"].long()), "bias must be a float tensor"),
    "bias of the wrong shape": (set_entry("bias", lambda e: e["bias"][:-1]), "bias must be a float tensor of shape"),
    "bias 2-D": (set_entry("bias", lambda e: e["bias"][None]), "bias must be a float tensor of shape"),
    "bias NaN": (set_entry("bias", lambda e: torch.full_like(e["bias"], float("nan"))), "bias must be finite"),
    "bias float64 1e300": (set_entry("bias", lambda e: torch.full_like(e["bias"], 1e300, dtype=torch.float64)),
                           "bias must be finite"),
    # the full-precision parameters
    "an fp parameter missing": (lambda sub: sub["fp"].pop(next(iter(sub["fp"]))), "do not match the base model"),
    "an extra fp parameter": (lambda sub: sub["fp"].update(extra=torch.zeros(3)), "unexpected 'extra'"),
    "an fp parameter keyed by an int": (lambda sub: sub["fp"].update({7: torch.zeros(3)}), "unexpected 7"),
    "a layer's weight smuggled into fp": (lambda sub: sub["fp"].update({"model.layers.0.mlp.up_proj.weight":
                                                                        torch.zeros(128, 64)}), "unexpected"),
    "fp as a list": (set_fp(lambda v: v.tolist()), "expected a float tensor"),
    "fp int": (set_fp(lambda v: v.long()), "expected a float tensor"),
    "fp of the wrong shape": (set_fp(lambda v: v[:-1]), "expected a float tensor"),
    "fp of a huge declared shape": (set_fp(lambda v: torch.zeros(1).expand(HUGE, HUGE)), "expected a float tensor"),
    "fp NaN": (set_fp(lambda v: torch.full_like(v, float("nan"))), "NaN or inf"),
    "fp float64 1e300": (set_fp(lambda v: torch.full_like(v, 1e300, dtype=torch.float64)), "NaN or inf"),
}


def mutated(valid_sub: dict, mutate) -> object:
    sub = copy.deepcopy(valid_sub)
    result = mutate(sub)
    return result if isinstance(result, list) else sub


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_every_malformed_submission_is_a_submission_error(valid_sub, tmp_path, case):
    mutate, reason = MUTATIONS[case]
    path = tmp_path / "bad.pt"
    torch.save(mutated(valid_sub, mutate), path)
    with pytest.raises(prepare.SubmissionError) as err:  # any other exception fails the test
        prepare.build_submitted_model(prepare.load_submission(path))
    message = str(err.value)
    assert reason in message and len(message.splitlines()) == 1 and len(message) < 1000, message


def test_the_valid_submission_the_fuzz_starts_from_is_accepted(valid_sub, tmp_path):
    torch.save(valid_sub, tmp_path / "good.pt")
    _, stats = prepare.build_submitted_model(prepare.load_submission(tmp_path / "good.pt"))
    assert 0 < stats["zero_frac"] < 1 and stats["bits_per_weight"] > math.log2(3)


@pytest.mark.parametrize("entry", [None, [], {"codes": torch.zeros(2, 2, dtype=torch.int8)},
                                   {"codes": torch.zeros(2, 2, dtype=torch.int8), "scales": torch.ones(3)},
                                   {"codes": torch.zeros(2, 2), "scales": torch.ones(1)},
                                   {"codes": torch.zeros(4, dtype=torch.int8), "scales": torch.ones(1)},
                                   {"codes": torch.zeros(2, 2, dtype=torch.int8), "scales": torch.ones(1, 1)},
                                   {"codes": torch.zeros(2, 2, dtype=torch.int8), "scales": torch.ones(0)},
                                   {"codes": torch.zeros(2, 2, dtype=torch.int8), "scales": [1.0]}])
def test_dequantize_refuses_what_does_not_fit_together(entry):
    with pytest.raises(prepare.SubmissionError, match="cannot dequantize"):
        prepare.dequantize(entry)
    if isinstance(entry, dict):
        with pytest.raises(prepare.SubmissionError):
            prepare._check_ternary_entry("q", entry, (2, 2))


# ---------------------------------------------------------------- item 2: the zip, before torch.load
def rezip(source: Path, target: Path, compression=zipfile.ZIP_STORED, only=None) -> Path:
    """A copy of a torch.save zip with its members stored (or compressed) as asked."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            chosen = compression if only is None or info.filename.endswith(only) else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=chosen)
    return target


def biggest_member(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return max(z.infolist(), key=lambda i: i.file_size).filename


def declare_size(source: Path, target: Path, member: str, size: int) -> Path:
    """The central directory's uncompressed size of one member set to `size` (the data left as is)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as z:
        info = z.getinfo(member)
    name = info.filename.encode()
    at = data.find(b"PK\x01\x02")  # the central directory's entry naming this member
    while at >= 0 and data[at + 46: at + 46 + len(name)] != name:
        at = data.find(b"PK\x01\x02", at + 4)
    assert at >= 0
    data[at + 24: at + 28] = size.to_bytes(4, "little")
    target.write_bytes(bytes(data))
    return target


def test_a_compressed_member_is_refused_before_it_is_inflated(tiny_env, tmp_path):
    good = train_submission("row")
    bad = rezip(good, tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED, only=biggest_member(good))
    with pytest.raises(prepare.SubmissionError, match=r"zip member '.*' is compressed \(method 8\)"):
        prepare.load_submission(bad)
    torch.load(bad, weights_only=True)  # the control: torch itself would have loaded it, inflating it in full


def test_a_huge_declared_size_is_refused(tiny_env, tmp_path):
    good = train_submission("row")
    bad = declare_size(good, tmp_path / "declared.pt", biggest_member(good), 2 ** 32 - 2)
    with pytest.raises(prepare.SubmissionError, match="declares 4,294,967,294 bytes but stores"):
        prepare.load_submission(bad)


@pytest.mark.parametrize("how", ["truncated", "empty", "random bytes", "legacy torch format", "too many members",
                                 "too big", "a directory"])
def test_archives_that_are_not_a_submission_are_refused(tiny_env, tmp_path, how):
    good = train_submission("row")
    bad = tmp_path / "bad.pt"
    if how == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "random bytes":
        bad.write_bytes(os.urandom(4096))
    elif how == "legacy torch format":
        torch.save(torch.load(good, weights_only=True), bad, _use_new_zipfile_serialization=False)
    elif how == "too many members":
        with zipfile.ZipFile(bad, "w") as z:
            for i in range(prepare.submission_limits()[1] + 1):
                z.writestr(f"archive/data/{i}", b"")
    elif how == "too big":
        sub = torch.load(good, weights_only=True)
        sub["fp"]["padding"] = torch.zeros(prepare.submission_limits()[0] // 4)
        torch.save(sub, bad)
    else:
        bad.mkdir()
    reasons = {"truncated": "not a complete zip archive", "empty": "not a complete zip archive",
               "random bytes": "not a complete zip archive", "legacy torch format": "not a complete zip archive",
               "too many members": "zip members, more than", "too big": "bytes, more than the",
               "a directory": "no submission at"}
    with pytest.raises(prepare.SubmissionError, match=reasons[how]):
        prepare.load_submission(bad)


def test_cli_rejections_are_one_clear_line(tiny_env, tmp_path, valid_sub):
    """Through `prepare.py eval --json` in a fresh process: the cases that ended in a traceback or overflowed."""
    cases = {"bias as a list": "bias must be a float tensor", "scales float64 1e300": "finite",
             "fp float64 1e300": "NaN or inf"}
    for case, reason in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.pt"
        torch.save(mutated(valid_sub, MUTATIONS[case][0]), path)
        assert_rejected(eval_subprocess(path), reason)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(train_submission("row").read_bytes()[:5000])
    assert_rejected(eval_subprocess(truncated), "not a complete zip archive")


def evaluator_peak_bytes(path: Path) -> int:
    """The address space a scoring of `path` needs (VmPeak), measured in a fresh process."""
    code = ("import sys, prepare; prepare.main(['eval', sys.argv[1], '--json', '--max-windows', '1']); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])")
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def zeros_deflated(size: int) -> bytes:
    """A raw DEFLATE stream of `size` zero bytes (a multiple of 8 MiB) made in a blink: one fully flushed
    block of 8 MiB of zeros needs nothing before it, so the stream is that block repeated, then the end."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(8 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // (8 << 20)) + compressor.flush(zlib.Z_FINISH)


def deflate_bomb(source: Path, target: Path, inflated: int) -> Path:
    """The submission with its biggest member replaced by `inflated` zero bytes, DEFLATE-compressed (~1000:1);
    the zip is written by hand, as zipfile would take minutes to compress that much."""
    bomb = biggest_member(source)
    local, central = bytearray(), bytearray()
    with zipfile.ZipFile(source) as zin:
        for info in zin.infolist():
            data = zin.read(info)
            method, size = (zipfile.ZIP_DEFLATED, inflated) if info.filename == bomb else (zipfile.ZIP_STORED, len(data))
            if info.filename == bomb:
                data = zeros_deflated(inflated)
            name, crc = info.filename.encode(), zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
            fields = (method, 0, 0, crc, len(data), size, len(name))
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, *fields, 0, 0, 0, 0, 0, len(local)) + name
            local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, *fields, 0) + name + data
    count = len(zin.infolist())
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(local), 0)
    target.write_bytes(bytes(local + central + end))
    return target


def test_a_deflate_bomb_is_refused_within_a_memory_cap(tiny_env, tmp_path):
    good = train_submission("row")
    headroom = 256 << 20
    cap = evaluator_peak_bytes(good) + headroom  # what a valid scoring needs, and a little more
    bomb = deflate_bomb(good, tmp_path / "bomb.pt", inflated=3 * headroom)  # inflated, it would break the cap
    assert bomb.stat().st_size < prepare.submission_limits()[0]  # small on disk: only its compression gives it away
    assert_rejected(eval_subprocess(bomb, limit_as=cap), "is compressed (method 8)")
