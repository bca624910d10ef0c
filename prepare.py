"""The fixed harness: protocol constants, data, model loading, the submission format, the evaluator.

Read-only during research: the driver records this file's hash before each run and refuses to
score if it changed. `train.py` imports it; the driver runs `python prepare.py eval` in a fresh
process so that the score never comes from code the LLM wrote.

    python prepare.py                          # one-time download + cache of model and data
    python prepare.py eval SUBMISSION [--split validation|test] [--json] [--max-windows N]
    python prepare.py eval --base              # the unquantized base model, for reference
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# ---------------------------------------------------------------- the protocol (fixed)
# Changing any of these breaks comparability with every earlier ledger row: bump the version.
PROTOCOL_VERSION = 1
DEFAULT_MODEL = "HuggingFaceTB/SmolLM-135M"
DATASET_ID, DATASET_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
ROW_SEPARATOR = "\n\n"
EVAL_WINDOW = 2048            # tokens per non-overlapping window; the tail is dropped
TIME_BUDGET_S = 300           # wall-clock for train.py when AR_DEADLINE is not set
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}

# ---------------------------------------------------------------- configuration (not protocol)
ROOT = Path(__file__).resolve().parent
LEDGER_PATH = ROOT / "results.tsv"
RUNS_DIR = ROOT / "runs"
EVAL_BATCH_GPU, EVAL_BATCH_CPU = 8, 2   # windows per forward; does not change the result
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]

LEDGER_COLUMNS = [
    "experiment", "timestamp", "branch", "commit", "parent", "status", "reason",
    "val_ppl", "best_val_ppl", "train_s", "eval_s", "peak_mem_gb", "train_tokens", "steps",
    "eval_windows", "protocol", "prompt_tokens", "completion_tokens", "cost_usd", "seen",
    "description",
]

_PROCESS_START = time.time()


class HarnessError(Exception):
    """A problem the user or train.py must fix; the message says how."""


class SubmissionError(HarnessError):
    """The submission is not a valid ternary model; the message names what is wrong."""


# ---------------------------------------------------------------- environment
def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ternary-autoresearch"
    path = Path(os.environ.get("AR_CACHE", default)).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def deadline() -> float:
    """Unix time by which train.py must have exited (AR_DEADLINE, else start + TIME_BUDGET_S)."""
    raw = os.environ.get("AR_DEADLINE")
    if not raw:
        return _PROCESS_START + TIME_BUDGET_S
    try:
        return float(raw)
    except ValueError:
        raise HarnessError(f"AR_DEADLINE={raw!r} is not a unix time; set it to e.g. "
                           f"{int(time.time()) + TIME_BUDGET_S} or unset it for {TIME_BUDGET_S} s") from None


def seconds_left() -> float:
    return deadline() - time.time()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stat_identity(paths: list[Path]) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(paths)]


# ---------------------------------------------------------------- model
def model_dir(download: bool = False) -> Path:
    """AR_MODEL as a local folder with config.json: a folder, a .gguf (converted once), or a hub id."""
    source = os.environ.get("AR_MODEL", DEFAULT_MODEL)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise HarnessError(f"AR_MODEL points to {path}, which does not exist; pass a hub id, "
                               "a model folder or an existing .gguf file")
        return _gguf_as_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HarnessError(f"AR_MODEL points to {path}, which has no config.json; pass a hub id, "
                               "a model folder or a .gguf file")
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise HarnessError(f"AR_MODEL={source!r} is neither a model folder, a .gguf file nor a hub id "
                           "like HuggingFaceTB/SmolLM-135M")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES, local_files_only=not download))
    except Exception as exc:  # the hub raises several types for "not cached" / "offline"
        if download:
            raise HarnessError(f"could not download {source} from the hub: {exc}") from exc
        raise HarnessError(f"model {source} is not in the local cache: run `python prepare.py` once "
                           "with network access, or set AR_MODEL to a local folder or .gguf file") from exc


def _gguf_as_folder(gguf: Path) -> Path:
    """Dequantize a GGUF once into a plain HF folder: later loads take a fraction of the time and the
    model is no longer flagged as quantized (which blocks save_pretrained and training)."""
    key = hashlib.sha256(json.dumps(_stat_identity([gguf])).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf.name} to {target} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def load_config():
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir())


def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir())


def load_model(dtype: torch.dtype = torch.float32):
    """The pretrained base model (full precision), from the local copy."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a bar per load floods the run logs
    return AutoModelForCausalLM.from_pretrained(model_dir(), dtype=dtype)


def targeted_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linears that must be ternary: every nn.Linear except the output head."""
    head = model.get_output_embeddings()
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and mod is not head]


def _base_skeleton():
    """The base architecture from AR_MODEL's config, weights left uninitialised (meta device)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config())


def _fp_names(skeleton: torch.nn.Module, targets: list[str]) -> list[str]:
    weights = {f"{t}.weight" for t in targets}
    return [name for name, _ in skeleton.named_parameters() if name not in weights]


# ---------------------------------------------------------------- data
def _split_rows_from_folder(folder: Path, split: str) -> list[str]:
    raw = folder / SPLIT_FILES[split]
    if raw.is_file():
        # HF row semantics: one row per line with its "\n"; a blank line is "".
        with open(raw, encoding="utf-8", newline="\n") as f:
            rows = [r if r.strip() else "" for r in f]
        return rows
    parquet = sorted(folder.rglob(f"{split}-*.parquet"))
    if parquet:
        from datasets import load_dataset
        ds = load_dataset("parquet", data_files={split: [str(p) for p in parquet]}, split=split)
        return list(ds["text"])
    hint = " (the train split: set AR_TRAIN_SPLIT=test to train on the test split as an offline stand-in)" \
        if split == "train" else ""
    raise HarnessError(f"AR_DATA={folder} has neither {SPLIT_FILES[split]} nor {split}-*.parquet{hint}")


def _split_rows(split: str) -> list[str]:
    folder = os.environ.get("AR_DATA")
    if folder:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise HarnessError(f"AR_DATA points to {path}, which is not a folder; point it at a folder "
                               "with wiki.{train,valid,test}.raw or the parquet files, or unset it")
        return _split_rows_from_folder(path, split)
    from datasets import load_dataset
    ds = load_dataset(DATASET_ID, DATASET_CONFIG, split=split)
    return list(ds["text"])


def load_tokens(split: str) -> torch.Tensor:
    """The split as one 1-D token tensor, tokenized once and cached, keyed by tokenizer and data."""
    if split not in SPLIT_FILES:
        raise HarnessError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    folder = model_dir()
    tok_files = [p for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "merges", "special"))]
    data_key = [os.environ.get("AR_DATA", ""), split] + _data_identity(split)
    key = hashlib.sha256(json.dumps([PROTOCOL_VERSION, str(folder), _stat_identity(tok_files), data_key],
                                    default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{split}-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True).long()
    rows = _split_rows(split)
    ids = load_tokenizer()(ROW_SEPARATOR.join(rows), add_special_tokens=False, verbose=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.int32)
    _atomic_save(tokens, path)
    return tokens.long()


def _data_identity(split: str) -> list:
    """Cheap identity of a split's source (file sizes and times) for the cache key."""
    folder = os.environ.get("AR_DATA")
    if not folder:
        return [DATASET_ID, DATASET_CONFIG]
    path = Path(folder).expanduser()
    files = [path / SPLIT_FILES[split]] if (path / SPLIT_FILES[split]).is_file() \
        else sorted(path.rglob(f"{split}-*.parquet"))
    return _stat_identity(files) if files else []


def load_train_tokens() -> torch.Tensor:
    """Training tokens: the train split, or AR_TRAIN_SPLIT=test where train is unavailable offline.
    Never the validation split: training on it would make val_ppl meaningless."""
    split = os.environ.get("AR_TRAIN_SPLIT", "train")
    if split not in ("train", "test"):
        raise HarnessError(f"AR_TRAIN_SPLIT={split!r}: training may use 'train' (or 'test' as an "
                           "offline stand-in), never the validation split that is scored")
    return load_tokens(split)


# ---------------------------------------------------------------- submission
def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def submission_path() -> Path:
    return Path(os.environ.get("AR_SUBMISSION", RUNS_DIR / "manual" / "submission.pt")).expanduser()


def submit(model: torch.nn.Module, meta: dict | None = None) -> Path:
    """Write the submission: ternary codes + scales (+ bias) of every targeted linear, the base
    model's remaining parameters in full precision, and informative meta.

    Each targeted module must have `export_ternary() -> {"codes", "scales"[, "bias"]}`."""
    skeleton = _base_skeleton()
    targets = targeted_linears(skeleton)
    modules = dict(model.named_modules())
    ternary = {}
    for name in targets:
        module = modules.get(name)
        if module is None or not hasattr(module, "export_ternary"):
            kind = "missing" if module is None else f"a {type(module).__name__} without export_ternary()"
            raise SubmissionError(f"layer {name} is {kind}: every decoder linear must be quantized "
                                  "(replace it with BitLinear) before prepare.submit")
        entry = {k: v.detach().cpu().contiguous() for k, v in module.export_ternary().items() if v is not None}
        _check_ternary_entry(name, entry, tuple(modules[name].weight.shape))
        ternary[name] = entry
    state = model.state_dict()
    missing = [n for n in _fp_names(skeleton, targets) if n not in state]
    if missing:
        raise SubmissionError(f"the model lacks full-precision parameters {missing[:3]}: submit the "
                              "base architecture with its linears replaced, nothing removed")
    fp = {n: state[n].detach().cpu().contiguous() for n in _fp_names(skeleton, targets)}
    info = {"model": os.environ.get("AR_MODEL", DEFAULT_MODEL), "protocol": PROTOCOL_VERSION,
            **(meta or {})}
    path = submission_path()
    _atomic_save({"ternary": ternary, "fp": fp, "meta": info}, path)
    return path


def _check_ternary_entry(name: str, entry: dict, shape: tuple[int, int]) -> None:
    codes, scales, bias = entry.get("codes"), entry.get("scales"), entry.get("bias")
    if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise SubmissionError(f"layer {name}: needs tensors 'codes' and 'scales'")
    if codes.dtype != torch.int8:
        raise SubmissionError(f"layer {name}: codes are {codes.dtype}, must be torch.int8")
    if tuple(codes.shape) != shape:
        raise SubmissionError(f"layer {name}: codes have shape {list(codes.shape)}, the base model's "
                              f"weight is {list(shape)}")
    bad = ((codes != -1) & (codes != 0) & (codes != 1)).sum().item()
    if bad:
        raise SubmissionError(f"layer {name}: {bad} codes are not in {{-1, 0, 1}}: not ternary")
    if scales.dim() != 1 or scales.numel() == 0 or codes.numel() % scales.numel():
        raise SubmissionError(f"layer {name}: scales must be 1-D with a group count dividing "
                              f"{codes.numel()}, got shape {list(scales.shape)}")
    if not scales.is_floating_point() or not torch.isfinite(scales).all():
        raise SubmissionError(f"layer {name}: scales must be finite floats")
    if bias is not None and (tuple(bias.shape) != (shape[0],) or not torch.isfinite(bias).all()):
        raise SubmissionError(f"layer {name}: bias must be finite with shape [{shape[0]}], "
                              f"got {list(bias.shape)}")


def dequantize(entry: dict) -> torch.Tensor:
    """W = (codes viewed as [n_groups, -1] * scales[:, None]) viewed as [out, in]."""
    codes, scales = entry["codes"], entry["scales"]
    grouped = codes.float().view(scales.numel(), -1) * scales.float()[:, None]
    return grouped.view(codes.shape)


def load_submission(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"no submission at {path}")
    try:
        sub = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise SubmissionError(f"{path} is not a torch submission file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(sub, dict) or not {"ternary", "fp"} <= set(sub) \
            or not isinstance(sub["ternary"], dict) or not isinstance(sub["fp"], dict):
        raise SubmissionError(f"{path} is not a submission: expected a dict with 'ternary' and 'fp'")
    return sub


def build_submitted_model(sub: dict) -> tuple[torch.nn.Module, float]:
    """The base architecture from AR_MODEL's config with the submission's weights; returns the model
    and the zero fraction of its ternary codes. Raises SubmissionError on anything not ternary."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(load_config(), dtype=torch.float32)
    targets = targeted_linears(model)
    modules = dict(model.named_modules())
    extra = sorted(set(sub["ternary"]) - set(targets))
    if extra:
        raise SubmissionError(f"ternary entries {extra[:3]} are not linears of the base model")
    zeros = total = 0
    with torch.no_grad():
        for name in targets:
            if name not in sub["ternary"]:
                raise SubmissionError(f"layer {name} is missing from the submission's ternary weights")
            entry, linear = sub["ternary"][name], modules[name]
            if not isinstance(entry, dict):
                raise SubmissionError(f"layer {name}: entry must be a dict of codes/scales/bias")
            _check_ternary_entry(name, entry, tuple(linear.weight.shape))
            linear.weight.copy_(dequantize(entry))
            if entry.get("bias") is not None:
                bias = entry["bias"].float()
                if linear.bias is None:
                    linear.bias = torch.nn.Parameter(bias.clone())
                else:
                    linear.bias.add_(bias)
            zeros += (entry["codes"] == 0).sum().item()
            total += entry["codes"].numel()
        params = dict(model.named_parameters())
        expected = _fp_names(model, targets)
        missing = [n for n in expected if n not in sub["fp"]]
        unexpected = [n for n in sub["fp"] if n not in expected]
        if missing or unexpected:
            raise SubmissionError(f"full-precision parameters do not match the base model: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
        for name in expected:
            value = sub["fp"][name]
            if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
                raise SubmissionError(f"full-precision parameter {name}: expected shape "
                                      f"{list(params[name].shape)}")
            if not torch.isfinite(value).all():
                raise SubmissionError(f"full-precision parameter {name} has NaN or inf values")
            params[name].copy_(value.float())
    return model, zeros / max(total, 1)


# ---------------------------------------------------------------- evaluation
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, max_windows: int | None = None,
               batch_size: int | None = None) -> dict:
    """exp(mean NLL over every predicted token) on non-overlapping EVAL_WINDOW windows."""
    dev = device()
    n = tokens.numel() // EVAL_WINDOW
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise HarnessError(f"the split has {tokens.numel()} tokens, fewer than one {EVAL_WINDOW}-token window")
    windows = tokens[: n * EVAL_WINDOW].view(n, EVAL_WINDOW)
    batch_size = batch_size or (EVAL_BATCH_GPU if dev.type == "cuda" else EVAL_BATCH_CPU)
    model = model.to(dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    nll = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = windows[start: start + batch_size].to(dev)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").double()
    predicted = n * (EVAL_WINDOW - 1)
    mean_loss = (nll / predicted).item()
    return {"ppl": math.exp(mean_loss), "mean_loss": mean_loss, "tokens": predicted, "windows": n}


def evaluate(path: str | Path | None, split: str = "validation", max_windows: int | None = None) -> dict:
    """Score a submission (or, with path None, the unquantized base model) by the protocol."""
    start = time.time()
    if path is None:
        model, zero_frac = load_model(), None
    else:
        model, zero_frac = build_submitted_model(load_submission(path))
    result = perplexity(model, load_tokens(split), max_windows)
    return {**result, "split": split, "zero_frac": zero_frac, "eval_s": round(time.time() - start, 3),
            "max_windows": max_windows, "protocol": PROTOCOL_VERSION, "device": device().type,
            "submission": str(path) if path else None}


# ---------------------------------------------------------------- ledger
def append_ledger_row(row: dict, path: Path = LEDGER_PATH) -> None:
    """Append one row (header on first use), flushed and fsynced: it survives a kill right after."""
    append_ledger_rows([row], path)


def append_ledger_rows(rows: list[dict], path: Path = LEDGER_PATH) -> None:
    """Append rows in ONE write, flushed and fsynced: the rows of one decision land together or not at all."""
    import io

    import pandas as pd
    clean = [{k: (" ".join(str(v).split()) if isinstance(v, str) else v) for k, v in row.items()} for row in rows]
    unknown = set().union(*clean) - set(LEDGER_COLUMNS)
    if unknown:
        raise ValueError(f"unknown ledger columns {sorted(unknown)}")
    new = not path.exists() or path.stat().st_size == 0
    text = io.StringIO()
    if not new and not _ends_with_newline(path):  # saved by a spreadsheet, or cut by a kill: never glue two rows
        text.write("\n")
    pd.DataFrame(clean, columns=LEDGER_COLUMNS).to_csv(text, sep="\t", header=new, index=False, na_rep="",
                                                        lineterminator="\n")
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_manual_run(result: dict, report: dict) -> None:
    """The ledger row of a `python train.py` run made by hand."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""
    append_ledger_row({
        "timestamp": utc_now(), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "commit": git("rev-parse", "--short", "HEAD"), "status": "manual",
        "reason": "python train.py by hand" + (" (uncommitted changes)" if git("status", "--porcelain", "train.py") else ""),
        "val_ppl": result["ppl"], "eval_s": result["eval_s"], "eval_windows": result["windows"],
        "protocol": protocol_label(result), "train_s": report.get("train_seconds"),
        "peak_mem_gb": report.get("peak_mem_gb"), "train_tokens": report.get("tokens"),
        "steps": report.get("steps"), "description": "manual run",
    })


def protocol_label(result: dict) -> str:
    """The protocol version, marked when --max-windows cut the split (a smoke number)."""
    limited = result.get("max_windows") is not None
    return f"v{result['protocol']}" + (f"-smoke{result['windows']}w" if limited else "")


# ---------------------------------------------------------------- CLI
def setup() -> None:
    """Download and cache model and data once, then print where everything is."""
    folder = model_dir(download=True)
    print(f"model:  {folder}")
    for split in SPLIT_FILES:
        try:
            tokens = load_tokens(split)
        except HarnessError as exc:
            print(f"{split:>10}: unavailable ({exc})")
            continue
        print(f"{split:>10}: {tokens.numel():,} tokens, {tokens.numel() // EVAL_WINDOW} windows")
    print(f"cache:  {cache_dir()}\nledger: {LEDGER_PATH}\nNext: python train.py (a baseline run), "
          "or python agent.py (the overnight loop)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("eval", help="score a submission by the fixed protocol")
    ev.add_argument("submission", nargs="?", help="path written by prepare.submit")
    ev.add_argument("--base", action="store_true", help="score the unquantized base model instead")
    ev.add_argument("--split", default="validation", choices=["validation", "test"])
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--max-windows", type=int, help="smoke runs only: score the first N windows")
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            setup()
            return 0
        if bool(args.submission) == args.base:
            parser.error("give a SUBMISSION path or --base (not both)")
        result = evaluate(None if args.base else args.submission, args.split, args.max_windows)
    except HarnessError as exc:
        print(f"{'invalid submission' if isinstance(exc, SubmissionError) else 'error'}: {exc}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        label = "val_ppl" if args.split == "validation" else "test_ppl"
        print(f"{label}: {result['ppl']:.4f}  ({result['windows']} windows, {result['tokens']} tokens, "
              f"{result['eval_s']:.1f} s, protocol {protocol_label(result)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
