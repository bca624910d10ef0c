"""The fixed harness: protocol constants, data, model loading, the submission format, the evaluator.

Read-only during research: the driver records this file's hash before each run and refuses to
score if it changed. `train.py` imports it; the driver runs `python prepare.py eval` in a fresh
process so that the score never comes from code the LLM wrote.

    python prepare.py                          # one-time download + cache of model and data
    python prepare.py eval SUBMISSION [--split validation|test] [--json] [--max-windows N]
                       [--expect-model DIGESTS.json]   # refuse if the model changed (driver)
    python prepare.py eval --base              # the unquantized base model, for reference
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import io
import json
import math
import numbers
import os
import re
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path


class _TorchOnFirstUse:
    """torch, imported when first used: the driver imports this module for its ledger functions alone and
    starts a second sooner (train.py and the evaluator use torch at once, so nothing changes for them)."""

    def __getattr__(self, name: str):
        module = importlib.import_module("torch")
        globals()["torch"] = module
        return getattr(module, name)


torch = _TorchOnFirstUse()

# ---------------------------------------------------------------- the protocol (fixed)
# Changing any of these breaks comparability with every earlier ledger row: bump the version.
PROTOCOL_VERSION = 1
DEFAULT_MODEL = "HuggingFaceTB/SmolLM-135M"
DATASET_ID, DATASET_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
ROW_SEPARATOR = "\n\n"
EVAL_WINDOW = 2048            # tokens per non-overlapping window; the tail is dropped
TIME_BUDGET_S = 300           # wall-clock for train.py when AR_DEADLINE is not set
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# sha256 of each scored split's text (its rows joined by ROW_SEPARATOR, UTF-8), verified on every load:
# the same for the hub dataset, the .raw files and the parquet files. AR_DATA_SHA256 replaces them for
# data of your own. The train split is not pinned: what train.py learns from is its own business.
SPLIT_SHA256 = {"validation": "b44fb967f92b525731216a507d1fbc44b97446b7ef0a2b4d1a893f81f1bbc29e",
                "test": "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"}
# sha256 of the WikiText-2 .raw files themselves (the official zip's members), for a precise error
RAW_FILE_SHA256 = {"wiki.valid.raw": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
                   "wiki.test.raw": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"}
# The quantization grid, closed: each quantized linear has one scale per group of GROUP_SIZES consecutive
# weights of its row-major flattened weight, one per output row, or one for the whole tensor. Nothing finer:
# one scale per weight (codes = sign(w), scales = |w|) is the full-precision weight in disguise. The grid left
# PROTOCOL_VERSION at 1: every submission it accepts scores exactly as before; one it refuses has no score.
GROUP_SIZES = (32, 64, 128, 256)
QUANT_GRID = ("groups of 32, 64, 128 or 256 consecutive weights of the row-major flattened weight, "
              "one scale per output row, or one per tensor")
# bits_per_weight in the eval JSON: (every code at log2(3) bits + every scale and bias at 16 bits) / the
# number of quantized weights, over all quantized linears. 16 bits, not the float32 stored: a bf16/fp16
# scale loses nothing that matters, and the figure should not change with the container's dtype.
CODE_BITS, SCALE_BITS = math.log2(3), 16

# ---------------------------------------------------------------- configuration (not protocol)
ROOT = Path(__file__).resolve().parent
LEDGER_PATH = ROOT / "results.tsv"
RUNS_DIR = ROOT / "runs"
EVAL_BATCH_GPU, EVAL_BATCH_CPU = 8, 2   # windows per forward; does not change the result
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
TOKENIZER_PREFIXES = ("tokenizer", "vocab", "merges", "special", "added_tokens")
EVAL_CACHE, TRAIN_CACHE = "eval-tokens", "train-tokens"  # apart: train.py may read only the second
# A submission is opened as a zip before torch.load: its members must be stored uncompressed and together hold
# no more than the model's shapes need (int8 codes, the grid's most scales, biases and the full-precision
# parameters, all float32) plus this slack for the pickle, the zip's headers and meta.
SUBMISSION_SLACK_BYTES = 1 << 20
SUBMISSION_SLACK_MEMBERS = 64   # beyond one member per tensor: torch's own records, tensors in meta
META_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # meta keys that reach the eval JSON
META_MAX_KEYS, META_MAX_DROPPED = 64, 20

LEDGER_COLUMNS = [
    "experiment", "timestamp", "branch", "commit", "parent", "status", "reason",
    "val_ppl", "best_val_ppl", "train_s", "eval_s", "peak_mem_gb", "train_tokens", "steps",
    "eval_windows", "protocol", "prompt_tokens", "completion_tokens", "cost_usd", "seen",
    "description", "bits_per_weight",
]
# columns that hold numbers: a cell is a finite number or empty, never text
LEDGER_NUMBERS = {"experiment", "val_ppl", "best_val_ppl", "train_s", "eval_s", "peak_mem_gb", "train_tokens", "steps",
                  "eval_windows", "prompt_tokens", "completion_tokens", "cost_usd", "seen", "bits_per_weight"}
# a text cell's most characters: far under the csv reader's field limit (131,072 characters), past which one cell
# made the whole ledger unreadable
LEDGER_CELL_CHARS = 32_000

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


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    target = cache_dir() / "models" / f"{gguf.stem}-{_gguf_sha256(gguf)[:16]}"
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


_GGUF_SHA256: dict[str, str] = {}


def _gguf_sha256(gguf: Path) -> str:
    """The GGUF's content digest, hashed once per process (0.2 s for 93 MB; model_dir() runs often).
    The evaluator is a fresh process: it always hashes what is on disk now."""
    key = str(gguf.resolve())
    if key not in _GGUF_SHA256:
        _GGUF_SHA256[key] = _file_sha256(gguf)
    return _GGUF_SHA256[key]


def model_files() -> list[Path]:
    """Every file of model_dir() (config, weights, tokenizer, ...), symlinks followed, sorted."""
    folder = model_dir()
    return sorted(p for p in folder.rglob("*") if p.is_file())


def model_digests() -> dict[str, str]:
    """{file name relative to model_dir(): sha256 of its content}; the driver records it at the start
    of the night and passes it to `prepare.py eval --expect-model`."""
    folder = model_dir()
    return {p.relative_to(folder).as_posix(): _file_sha256(p) for p in model_files()}


def check_model_digests(expected: dict[str, str]) -> None:
    """Raise HarnessError naming the first file of model_dir() that differs from `expected`."""
    actual = model_digests()
    for name in sorted(set(expected) | set(actual)):
        if actual.get(name) != expected.get(name):
            raise HarnessError(f"the model changed since the night started: {name} sha256 "
                               f"{actual.get(name, '(file missing)')} (expected {expected.get(name, 'no such file')})")


def _read_expected_digests(path: str) -> dict[str, str]:
    try:
        expected = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"--expect-model {path}: {exc}; write it with json.dump(prepare.model_digests())") from None
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        raise HarnessError(f"--expect-model {path} is not a JSON object of file name -> sha256; write it "
                           "with json.dump(prepare.model_digests())")
    return expected


def load_config():
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir())


def load_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir())


def load_model(dtype: torch.dtype | None = None):
    """The pretrained base model (full precision), from the local copy."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a bar per load floods the run logs
    return AutoModelForCausalLM.from_pretrained(model_dir(), dtype=dtype or torch.float32)


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
def _raw_rows(data: bytes) -> list[str]:
    # HF row semantics: one row per line with its "\n" (only "\n" ends a line); a blank line is "".
    return [r if r.strip() else "" for r in io.StringIO(data.decode("utf-8"), newline="\n")]


def _data_sha256_override() -> dict[str, str]:
    """AR_DATA_SHA256 (`validation=<hex>,test=<hex>`): digests of data of your own, replacing the pins."""
    override = {}
    for item in filter(None, (part.strip() for part in os.environ.get("AR_DATA_SHA256", "").split(","))):
        split, _, digest = (s.strip() for s in item.partition("="))
        if split not in SPLIT_FILES or len(digest) != 64 or set(digest.lower()) - set("0123456789abcdef"):
            raise HarnessError(f"AR_DATA_SHA256 item {item!r} is not <split>=<sha256>: write e.g. "
                               "AR_DATA_SHA256=validation=<64 hex digits>,test=<64 hex digits>, the sha256 of "
                               "each split's rows joined by a blank line (the error for your data prints it)")
        override[split] = digest.lower()
    return override


def _split_rows_from_folder(folder: Path, split: str) -> list[str]:
    raw = folder / SPLIT_FILES[split]
    if raw.is_file():
        data = raw.read_bytes()  # read once: the digest and the rows come from the same bytes
        rows = _raw_rows(data)
        _check_raw_file(raw, split, data, rows)
        return rows
    parquet = sorted(folder.rglob(f"{split}-*.parquet"))
    if parquet:
        # pyarrow, not datasets.load_dataset: that would leave a copy of the split in the datasets cache
        import pyarrow.parquet as pq
        return [row for p in parquet for row in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    hint = " (the train split: set AR_TRAIN_SPLIT=test to train on the test split as an offline stand-in)" \
        if split == "train" else ""
    raise HarnessError(f"AR_DATA={folder} has neither {SPLIT_FILES[split]} nor {split}-*.parquet{hint}")


def _check_raw_file(raw: Path, split: str, data: bytes, rows: list[str]) -> None:
    """A WikiText-2 .raw file must be byte-identical to the official one (unless AR_DATA_SHA256 names the split)."""
    pinned = RAW_FILE_SHA256.get(raw.name)
    if pinned is None or split in _data_sha256_override():
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != pinned:
        text_sha = hashlib.sha256(ROW_SEPARATOR.join(rows).encode("utf-8")).hexdigest()
        raise HarnessError(f"{raw} has sha256 {actual}, but WikiText-2's {raw.name} has {pinned}: the file was "
                           "changed. If it came through git, core.autocrlf may have changed its line endings "
                           "(`git config core.autocrlf false`, then check it out again; `sha256sum -c SHA256SUMS` "
                           f"checks the original files); if it is data of your own, set AR_DATA_SHA256={split}={text_sha}")


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


def _split_text(split: str) -> tuple[str, str]:
    """The split's text (rows joined by ROW_SEPARATOR) and its sha256, verified against the pinned digest
    (or AR_DATA_SHA256's) wherever the split has one: a changed text is an error, never a score."""
    text = ROW_SEPARATOR.join(_split_rows(split))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    override = _data_sha256_override()
    expected = override.get(split, SPLIT_SHA256.get(split))
    if expected is not None and digest != expected:
        origin = "AR_DATA_SHA256" if split in override else "WikiText-2's, pinned in prepare.py"
        source = f"the files in AR_DATA={os.environ['AR_DATA']}" if os.environ.get("AR_DATA") else \
            "the datasets cache (delete it and run `python prepare.py`)"
        raise HarnessError(f"the {split} text has sha256 {digest}, expected {expected} ({origin}): the data was "
                           f"changed. Restore {source}; for data of your own, set AR_DATA_SHA256={split}={digest}")
    return text, digest


def _tokenizer_sha256(folder: Path) -> str:
    """One digest of the tokenizer files' contents: part of every token cache's key."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_PREFIXES))
    return hashlib.sha256(json.dumps([[p.name, _file_sha256(p)] for p in files]).encode()).hexdigest()


def _tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def _read_token_cache(path: Path, identity: dict) -> torch.Tensor | None:
    """The cached int32 tokens if the file is intact (their sha256 matches the stored one) and of this
    identity (protocol, text, tokenizer); else None, with a one-line warning if there was a file."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True, map_location="cpu")
        tokens = entry.get("tokens") if isinstance(entry, dict) else None
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int32 or tokens.dim() != 1:
            problem = "not a token cache entry"
        elif entry.get("sha256") != _tokens_sha256(tokens):
            problem = "the tokens do not match their sha256"
        elif any(entry.get(k) != v for k, v in identity.items()):
            problem = "made from another text or tokenizer"
        else:
            return tokens
    except Exception as exc:  # torch.load raises many types for a damaged file
        problem = f"unreadable: {type(exc).__name__}"
    print(f"warning: token cache {path} failed its check ({problem}); rebuilding it from the verified text",
          file=sys.stderr)
    return None


def _cached_tokens(path: Path, text: str, identity: dict) -> torch.Tensor:
    tokens = _read_token_cache(path, identity)
    if tokens is None:
        ids = load_tokenizer()(text, add_special_tokens=False, verbose=False)["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.int32)
        _atomic_save({"tokens": tokens, "sha256": _tokens_sha256(tokens), **identity}, path)
    return tokens.long()


def load_tokens(split: str, expect_sha256: str | None = None) -> torch.Tensor:
    """The split as one 1-D token tensor. The text is verified by content on every call; the tokens come
    from a cache keyed by content (protocol, text sha256, tokenizer sha256) that stores their sha256,
    checked on every load. validation/test are cached apart from the training tokens (EVAL_CACHE).
    expect_sha256 (the driver's, taken at the start of the night): a cache whose tokens differ, even one
    forged with a matching stored digest, is rebuilt from the verified text."""
    if split not in SPLIT_FILES:
        raise HarnessError(f"unknown split {split!r}; use one of {', '.join(SPLIT_FILES)}")
    if split == "train":
        return _training_tokens(split)
    text, text_sha = _split_text(split)
    identity = {"protocol": PROTOCOL_VERSION, "text_sha256": text_sha,
                "tokenizer_sha256": _tokenizer_sha256(model_dir())}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / EVAL_CACHE / f"{split}-{key}.pt"
    tokens = _cached_tokens(path, text, identity)
    if expect_sha256 and _tokens_sha256(tokens.int()) != expect_sha256:
        print(f"warning: token cache {path} differs from the tokens of the night's start; rebuilding it",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        tokens = _cached_tokens(path, text, identity)
        if _tokens_sha256(tokens.int()) != expect_sha256:
            raise HarnessError(f"the {split} tokens differ from those of the night's start although the text "
                               "and the tokenizer verify: restart the night")
    return tokens


def _train_cache_path(split: str) -> Path:
    """The training cache file: named by the data source and the tokenizer's content, not by the text's
    digest, so that train.py finds it in the sandbox, where the text is not readable."""
    data = os.environ.get("AR_DATA")
    source = str(Path(data).expanduser().resolve()) if data else f"{DATASET_ID}/{DATASET_CONFIG}"
    key = hashlib.sha256(json.dumps([PROTOCOL_VERSION, split, source, _tokenizer_sha256(model_dir())])
                         .encode()).hexdigest()[:16]
    return cache_dir() / TRAIN_CACHE / f"{split}-{key}.pt"


def _training_tokens(split: str) -> torch.Tensor:
    """Tokens to train on, from the training cache (TRAIN_CACHE), rebuilt when the text changed."""
    path = _train_cache_path(split)
    identity = {"protocol": PROTOCOL_VERSION, "tokenizer_sha256": _tokenizer_sha256(model_dir())}
    try:
        text, text_sha = _split_text(split)
    except HarnessError:
        raise
    except Exception as exc:  # in the sandbox: the cache that train_read_paths() built serves
        tokens = _read_token_cache(path, identity)
        if tokens is None:
            raise HarnessError(f"cannot read the {split} text ({type(exc).__name__}: {exc}) and there is no "
                               f"valid token cache at {path}: run `python prepare.py` where the data is readable") from exc
        return tokens.long()
    return _cached_tokens(path, text, {**identity, "text_sha256": text_sha})


def _train_split() -> str:
    split = os.environ.get("AR_TRAIN_SPLIT", "train")
    if split not in ("train", "test"):
        raise HarnessError(f"AR_TRAIN_SPLIT={split!r}: training may use 'train' (or 'test' as an "
                           "offline stand-in), never the validation split that is scored")
    return split


def load_train_tokens() -> torch.Tensor:
    """Training tokens: the train split, or AR_TRAIN_SPLIT=test where train is unavailable offline.
    Never the validation split: training on it would make val_ppl meaningless."""
    return _training_tokens(_train_split())


# ---------------------------------------------------------------- sandbox paths (for the driver)
def train_read_paths() -> list[Path]:
    """What train.py needs to read besides the Python install and the repo: the model folder
    (and realpaths of any symlink targets, e.g. hub snapshots), and the TRAINING token cache file,
    which this call builds first if missing (the sandboxed train.py cannot write the cache)."""
    folder = model_dir()
    paths = [folder]
    if folder.parent.name == "snapshots":  # a hub snapshot: the hub reads refs/ beside it to find it
        paths.append(folder.parent.parent)
    inside = folder.resolve()
    for target in sorted({p.resolve() for p in model_files()}):
        if not target.is_relative_to(inside) and not any(target.is_relative_to(p) for p in paths[1:]):
            paths.append(target)
    source = os.environ.get("AR_MODEL", DEFAULT_MODEL)
    if source.endswith(".gguf"):  # model_dir() hashes it to find the converted folder
        paths.append(Path(source).expanduser().resolve())
    load_train_tokens()
    paths.append(_train_cache_path(_train_split()))
    return paths


def eval_private_paths() -> list[Path]:
    """Paths that must never be readable by train.py: the validation (and test, unless
    AR_TRAIN_SPLIT=test) source files (AR_DATA's files, or the hub datasets cache folder) and the
    evaluation token cache folder. The driver refuses/warns if any lies under a readable root."""
    splits = ["validation"] + ([] if _train_split() == "test" else ["test"])
    data = os.environ.get("AR_DATA")
    if data:
        folder = Path(data).expanduser().resolve()
        paths = [p for split in splits for p in
                 [folder / SPLIT_FILES[split], *sorted(folder.rglob(f"{split}-*.parquet"))] if p.is_file()]
    else:
        import datasets.config
        from huggingface_hub import constants
        paths = [Path(datasets.config.HF_DATASETS_CACHE),
                 Path(constants.HF_HUB_CACHE) / f"datasets--{DATASET_ID.replace('/', '--')}"]
    evaluation = cache_dir() / EVAL_CACHE
    evaluation.mkdir(exist_ok=True)
    paths.append(evaluation)
    legacy = cache_dir() / "tokens"  # the cache of earlier versions holds validation tokens too
    if legacy.exists():
        paths.append(legacy)
    return paths


def sandbox_info() -> dict:
    """For the driver at the start of a night (`python prepare.py sandbox-info --json`): what train.py
    may read, what must stay private to the evaluator, and the digests every later scoring is held to."""
    return {"train_read": [str(p) for p in train_read_paths()],
            "eval_private": [str(p) for p in eval_private_paths()],
            "model": model_digests(),
            "tokens": {"validation": _tokens_sha256(load_tokens("validation").int())}}


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

    Each targeted module must have `export_ternary() -> {"codes", "scales"[, "bias"]}`, its scales on
    the quantization grid (QUANT_GRID)."""
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
        entry = {k: _own_copy(v) for k, v in module.export_ternary().items() if v is not None}
        _check_ternary_entry(name, entry, tuple(skeleton.get_submodule(name).weight.shape))
        ternary[name] = entry
    state = model.state_dict()
    missing = [n for n in _fp_names(skeleton, targets) if n not in state]
    if missing:
        raise SubmissionError(f"the model lacks full-precision parameters {missing[:3]}: submit the "
                              "base architecture with its linears replaced, nothing removed")
    fp = {n: _own_copy(state[n]) for n in _fp_names(skeleton, targets)}
    info = {"model": os.environ.get("AR_MODEL", DEFAULT_MODEL), "protocol": PROTOCOL_VERSION,
            **(meta or {})}
    path = submission_path()
    _atomic_save({"ternary": ternary, "fp": fp, "meta": info}, path)
    return path


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor with a storage of its own: torch.save writes a view's whole storage, which would count
    against the submission's size limit."""
    return tensor.detach().cpu().clone(memory_format=torch.contiguous_format)


def _plain_tensor(value) -> bool:
    """A dense CPU tensor (or Parameter): what torch.save writes for a tensor of the submission."""
    return type(value) in (torch.Tensor, torch.nn.Parameter) and value.layout == torch.strided \
        and value.device.type == "cpu"


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return "nothing" if value is None else f"a {type(value).__name__}"


def _names(keys) -> str:
    """Up to three untrusted keys, each short and on one line, for a message."""
    keys = list(keys)
    shown = [repr(k)[:80] if isinstance(k, (str, int)) else f"<{type(k).__name__}>" for k in keys[:3]]
    return ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def grid_group_counts(shape: tuple[int, int]) -> set[int]:
    """The scale counts QUANT_GRID allows for a weight of this shape: one per tensor, one per output row,
    one per group of g consecutive weights for each g of GROUP_SIZES that divides the element count."""
    numel = math.prod(shape)
    return {1, shape[0]} | {numel // g for g in GROUP_SIZES if numel % g == 0}


def _layer_bits(entry: dict) -> tuple[float, int]:
    """(bits, quantized weights) of one checked entry, by the accounting of CODE_BITS and SCALE_BITS."""
    n_codes = entry["codes"].numel()
    n_floats = entry["scales"].numel() + (entry["bias"].numel() if entry.get("bias") is not None else 0)
    return n_codes * CODE_BITS + n_floats * SCALE_BITS, n_codes


def bits_per_weight(entries) -> float:
    """(codes at log2(3) bits + scales and biases at 16 bits) / quantized weights, over checked entries."""
    bits, weights = map(sum, zip(*(_layer_bits(e) for e in entries)))
    return bits / weights


def _check_ternary_entry(name: str, entry: dict, shape: tuple[int, int]) -> None:
    """One quantized linear, checked before any value of it is used: types and dtypes first, then shapes,
    then values (cast to float32, the evaluator's dtype, before their finiteness is checked)."""
    if not isinstance(entry, dict):
        raise SubmissionError(f"layer {name}: entry must be a dict of codes/scales/bias, not {_kind(entry)}")
    unknown = [k for k in entry if k not in ("codes", "scales", "bias")]
    if unknown:
        raise SubmissionError(f"layer {name}: unknown keys {_names(unknown)}: an entry holds 'codes', "
                              "'scales' and optionally 'bias'")
    codes, scales, bias = entry.get("codes"), entry.get("scales"), entry.get("bias")
    if not _plain_tensor(codes) or not _plain_tensor(scales):
        raise SubmissionError(f"layer {name}: needs tensors 'codes' and 'scales', got {_kind(codes)} and "
                              f"{_kind(scales)}")
    if codes.dtype != torch.int8:
        raise SubmissionError(f"layer {name}: codes are {codes.dtype}, must be torch.int8")
    if tuple(codes.shape) != shape:
        raise SubmissionError(f"layer {name}: codes have shape {list(codes.shape)}, the base model's "
                              f"weight is {list(shape)}")
    bad = ((codes != -1) & (codes != 0) & (codes != 1)).sum().item()
    if bad:
        raise SubmissionError(f"layer {name}: {bad} codes are not in {{-1, 0, 1}}: not ternary")
    if scales.dim() != 1 or not scales.is_floating_point():
        raise SubmissionError(f"layer {name}: scales must be a 1-D float tensor, got {_kind(scales)}")
    allowed = grid_group_counts(shape)
    if scales.numel() not in allowed:
        n, numel = scales.numel(), math.prod(shape)
        bits = _layer_bits({"codes": codes, "scales": scales})[0] / numel
        raise SubmissionError(
            f"layer {name}: {n} scales for its {list(shape)} weight" + (f", one per {numel / n:.4g} weights" if n else "")
            + f", would be {bits:.3f} bits per weight: off the quantization grid, which allows only {QUANT_GRID} "
            f"({', '.join(map(str, sorted(allowed)))} scales for this layer; in train.py GROUP_SIZE = 32 | 64 | 128 "
            '| 256 | "row" | "tensor")')
    if not torch.isfinite(scales.float()).all():
        raise SubmissionError(f"layer {name}: scales must be finite floats (as float32, the evaluator's dtype)")
    if bias is not None:
        if not _plain_tensor(bias) or not bias.is_floating_point() or tuple(bias.shape) != (shape[0],):
            raise SubmissionError(f"layer {name}: bias must be a float tensor of shape [{shape[0]}], got {_kind(bias)}")
        if not torch.isfinite(bias.float()).all():
            raise SubmissionError(f"layer {name}: bias must be finite (as float32, the evaluator's dtype)")


def dequantize(entry: dict) -> torch.Tensor:
    """W = (codes viewed as [n_groups, -1] * scales[:, None]) viewed as [out, in], in float32.
    Only the shapes are checked here; _check_ternary_entry checks the rest against the base model."""
    codes = entry.get("codes") if isinstance(entry, dict) else None
    scales = entry.get("scales") if isinstance(entry, dict) else None
    if not (_plain_tensor(codes) and codes.dtype == torch.int8 and codes.dim() == 2 and _plain_tensor(scales)
            and scales.is_floating_point() and scales.dim() == 1 and scales.numel()
            and codes.numel() % scales.numel() == 0):
        raise SubmissionError(f"cannot dequantize {_kind(codes)} codes with {_kind(scales)} scales: codes must be "
                              "int8 [out, in], scales a 1-D float tensor whose length divides the codes' count")
    grouped = codes.float().reshape(scales.numel(), -1) * scales.float()[:, None]
    return grouped.reshape(codes.shape)


def submission_limits() -> tuple[int, int]:
    """(bytes, zip members): the most a submission for AR_MODEL's shapes can hold uncompressed: int8 codes,
    the grid's most scales and a bias per linear, the full-precision parameters, all float32, plus the slack."""
    skeleton = _base_skeleton()
    targets = targeted_linears(skeleton)
    nbytes = 0
    for name in targets:
        shape = tuple(skeleton.get_submodule(name).weight.shape)
        nbytes += math.prod(shape) + 4 * (max(grid_group_counts(shape)) + shape[0])
    params = dict(skeleton.named_parameters())
    fp = _fp_names(skeleton, targets)
    nbytes += sum(4 * params[n].numel() for n in fp)
    return nbytes + SUBMISSION_SLACK_BYTES, 3 * len(targets) + len(fp) + SUBMISSION_SLACK_MEMBERS


def _check_submission_zip(file, path: Path, max_bytes: int, max_members: int) -> None:
    """Refuse, before torch.load reads a byte of it, an archive that is cut or damaged, has a compressed
    member (it could inflate without bound: 2 MB on disk became 2.2 GB) or holds more than max_bytes."""
    how = "write it with prepare.submit"
    size = os.fstat(file.fileno()).st_size
    if size > max_bytes:
        raise SubmissionError(f"{path} is {size:,} bytes, more than the {max_bytes:,} a submission for this model "
                              f"can need (int8 codes, float32 scales, biases and parameters): {how}")
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
    except Exception as exc:  # zipfile raises several types for a cut or damaged archive
        raise SubmissionError(f"{path} is not a torch submission file (not a complete zip archive: "
                              f"{type(exc).__name__}: {_one_line(exc)}): {how}") from None
    if len(members) > max_members:
        raise SubmissionError(f"{path} has {len(members):,} zip members, more than the {max_members} a submission "
                              f"for this model can need: {how}")
    total = 0
    for member in members:
        label = repr(member.filename[:100])
        if member.compress_type != zipfile.ZIP_STORED:
            raise SubmissionError(f"{path}: zip member {label} is compressed (method {member.compress_type}): "
                                  "torch.save stores every member as is, and a compressed one can inflate far "
                                  f"beyond its size on disk: {how}")
        if member.file_size != member.compress_size:
            raise SubmissionError(f"{path}: zip member {label} declares {member.file_size:,} bytes but stores "
                                  f"{member.compress_size:,}: a damaged or forged archive: {how}")
        total += member.file_size
    if total > max_bytes:
        raise SubmissionError(f"{path}: its zip members hold {total:,} bytes, more than the {max_bytes:,} a "
                              f"submission for this model can need: {how}")


def load_submission(path: str | Path) -> dict:
    """The submission at path, loaded with weights_only=True after its zip passed _check_submission_zip
    (the same open file: a rename in between changes nothing). SubmissionError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"no submission at {path}")
    max_bytes, max_members = submission_limits()
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise SubmissionError(f"cannot read the submission {path}: {exc}") from None
    with file:
        _check_submission_zip(file, path, max_bytes, max_members)
        file.seek(0)
        try:
            sub = torch.load(file, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch.load raises many types for a damaged file
            raise SubmissionError(f"{path} is not a torch submission file ({type(exc).__name__}: "
                                  f"{_one_line(exc)})") from None
    if not isinstance(sub, dict) or not {"ternary", "fp"} <= set(sub) \
            or not isinstance(sub["ternary"], dict) or not isinstance(sub["fp"], dict):
        raise SubmissionError(f"{path} is not a submission: expected a dict with 'ternary' and 'fp'")
    unknown = [k for k in sub if k not in ("ternary", "fp", "meta")]
    if unknown:
        raise SubmissionError(f"{path}: unknown keys {_names(unknown)}: a submission holds 'ternary', 'fp' "
                              "and 'meta' (write it with prepare.submit)")
    return sub


def build_submitted_model(sub: dict) -> tuple[torch.nn.Module, dict]:
    """The base architecture from AR_MODEL's config with the submission's weights; returns the model
    and {"zero_frac" (of its ternary codes), "bits_per_weight"}. Raises SubmissionError on anything
    not ternary, off the grid, of the wrong type or shape, or not finite."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(load_config(), dtype=torch.float32)
    targets = targeted_linears(model)
    modules = dict(model.named_modules())
    ternary, fp = sub["ternary"], sub["fp"]
    extra = [k for k in ternary if k not in modules or k not in targets]
    if extra:
        raise SubmissionError(f"ternary entries {_names(extra)} are not linears of the base model")
    absent = [name for name in targets if name not in ternary]
    if absent:
        raise SubmissionError(f"layer {absent[0]} is missing from the submission's ternary weights")
    params = dict(model.named_parameters())
    expected = _fp_names(model, targets)
    missing = [n for n in expected if n not in fp]
    unexpected = [n for n in fp if n not in params or n not in expected]
    if missing or unexpected:
        raise SubmissionError(f"full-precision parameters do not match the base model: missing "
                              f"{_names(missing) or 'none'}, unexpected {_names(unexpected) or 'none'}")
    zeros = 0
    with torch.no_grad():
        for name in expected:  # first: a linear's own bias among them must not overwrite its ternary bias
            value = fp[name]
            if not _plain_tensor(value) or not value.is_floating_point() or value.shape != params[name].shape:
                raise SubmissionError(f"full-precision parameter {name}: expected a float tensor of shape "
                                      f"{list(params[name].shape)}, got {_kind(value)}")
            value = value.float()
            if not torch.isfinite(value).all():
                raise SubmissionError(f"full-precision parameter {name} has NaN or inf values (as float32)")
            params[name].copy_(value)
        for name in targets:
            entry, linear = ternary[name], modules[name]
            _check_ternary_entry(name, entry, tuple(linear.weight.shape))
            linear.weight.copy_(dequantize(entry))
            if entry.get("bias") is not None:
                bias = entry["bias"].float()
                if linear.bias is None:
                    linear.bias = torch.nn.Parameter(bias.clone())
                else:
                    linear.bias.add_(bias)
                    if not torch.isfinite(linear.bias).all():
                        raise SubmissionError(f"layer {name}: bias plus the parameter {name}.bias overflows float32")
            zeros += (entry["codes"] == 0).sum().item()
    codes = sum(ternary[name]["codes"].numel() for name in targets)
    return model, {"zero_frac": zeros / max(codes, 1),
                   "bits_per_weight": bits_per_weight(ternary[name] for name in targets)}


def safe_meta(meta) -> tuple[dict, list[str]]:
    """The submission's meta as the eval JSON carries it: ({name: finite int or float}, [names dropped]).
    A name is kept when it is a str matching META_NAME (at most META_MAX_KEYS of them) and its value a finite
    int (|n| < 2**63) or float, or a 0-d tensor holding one; everything else is dropped and named (cut to 64
    characters, at most META_MAX_DROPPED). The keys prepare.submit adds itself (model, protocol) are left out:
    the eval JSON has the evaluator's own."""
    if meta is None:
        return {}, []
    if not isinstance(meta, dict):
        return {}, ["meta"]
    kept, dropped = {}, []
    for key, value in meta.items():
        if key in ("model", "protocol"):
            continue
        number = _finite_number(value)
        if isinstance(key, str) and META_NAME.fullmatch(key) and number is not None and len(kept) < META_MAX_KEYS:
            kept[key] = number
        elif len(dropped) < META_MAX_DROPPED:
            name = key if isinstance(key, str) else f"<{type(key).__name__}>"
            dropped.append(re.sub(r"[^\x20-\x7e]", "?", name[:64]))
    return kept, dropped


def _finite_number(value) -> int | float | None:
    """finite_number for meta: a 0-d tensor's number too; a plain int or float for the JSON (not numpy's)."""
    if isinstance(value, torch.Tensor):
        if not _plain_tensor(value) or value.dim() != 0:
            return None
        try:
            value = value.item()
        except Exception:  # a dtype without a Python number
            return None
    if type(value) not in (int, float):
        return None
    number = finite_number(value)
    return None if number is None or abs(number) >= 2**63 else number


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


def evaluate(path: str | Path | None, split: str = "validation", max_windows: int | None = None,
             expect_tokens: str | None = None) -> dict:
    """Score a submission (or, with path None, the unquantized base model) by the protocol."""
    start = time.time()
    if path is None:
        model, stats, (meta, dropped) = load_model(), {"zero_frac": None, "bits_per_weight": None}, ({}, [])
    else:
        sub = load_submission(path)
        model, stats = build_submitted_model(sub)
        meta, dropped = safe_meta(sub.get("meta"))
    result = perplexity(model, load_tokens(split, expect_tokens), max_windows)
    return {**result, "split": split, **stats, "eval_s": round(time.time() - start, 3),
            "max_windows": max_windows, "protocol": PROTOCOL_VERSION, "device": device().type,
            "submission": str(path) if path else None, "meta": meta, "meta_dropped": dropped}


# ---------------------------------------------------------------- ledger
def finite_number(value) -> int | float | None:
    """value when it is a finite real number (bool is not one), else None: the only numbers a ledger row or a
    state file takes from what a run reports."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return value if math.isfinite(float(value)) else None
    except (OverflowError, ValueError):  # an int beyond float's range
        return None


def ledger_cell(column: str, value) -> str:
    """One cell: a finite number in a number column, else empty; in a text column the value's text on one line
    (whitespace and control characters become single spaces, lone surrogates U+FFFD), cut to LEDGER_CELL_CHARS."""
    if column in LEDGER_NUMBERS:
        number = finite_number(value)
        if number is None:
            return ""
        exact = isinstance(number, numbers.Integral) and abs(number) <= 2 ** 53  # a reader's float holds it exactly
        return str(int(number)) if exact else repr(float(number))
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return one_line_text(str(value))[:LEDGER_CELL_CHARS].rstrip()


def one_line_text(text: str) -> str:
    """text on one line, writable anywhere: control characters and whitespace runs become one space, lone
    surrogates (from JSON escapes; UTF-8 cannot encode them) U+FFFD."""
    return " ".join(_SURROGATES.sub("\ufffd", _CONTROLS.sub(" ", text)).split())


_CONTROLS, _SURROGATES = re.compile("[\x00-\x1f\x7f-\x9f]"), re.compile("[\ud800-\udfff]")


def ledger_lines(rows: list[dict], header: bool = False) -> bytes:
    """Rows as ledger lines: one line each whatever the values (quotes CSV-escaped, as spreadsheets expect)."""
    unknown = set().union(*rows) - set(LEDGER_COLUMNS)
    if unknown:
        raise ValueError(f"unknown ledger columns {sorted(unknown)}")
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    if header:
        writer.writerow(LEDGER_COLUMNS)
    writer.writerows([ledger_cell(c, row.get(c)) for c in LEDGER_COLUMNS] for row in rows)
    return text.getvalue().encode("utf-8")


def append_ledger_row(row: dict, path: Path = LEDGER_PATH) -> None:
    """Append one row (header on first use), flushed and fsynced: it survives a kill right after."""
    append_ledger_rows([row], path)


def append_ledger_rows(rows: list[dict], path: Path = LEDGER_PATH) -> None:
    """Append rows in ONE write, flushed and fsynced: the rows of one decision land together or not at all. A
    write that fails (a full disk: OSError ENOSPC) is undone before the error is raised: the file is as before."""
    migrate_ledger(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = ledger_lines(rows, header=size == 0)
        if size and os.pread(fd, 1, size - 1) != b"\n":  # saved by a spreadsheet, or cut by a kill: never glue two rows
            data = b"\n" + data
        try:
            written = 0
            while written < len(data):  # a short write happens when the disk fills up mid-row
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)  # all or nothing: no half row for the next append to glue onto
            raise
    finally:
        os.close(fd)


def migrate_ledger(path: Path) -> bool:
    """A ledger whose header is an earlier LEDGER_COLUMNS (columns are only ever added at the end) is rewritten
    with today's header, each whole row given empty cells for the new columns, in one step (a kill leaves the old
    file or the new one). Returns whether it rewrote the file."""
    try:
        with open(path, "rb") as f:
            header = f.readline()
    except FileNotFoundError:
        return False
    names = header.rstrip(b"\r\n").decode("utf-8", "replace").split("\t")
    if not header.endswith(b"\n") or len(names) >= len(LEDGER_COLUMNS) or names != LEDGER_COLUMNS[:len(names)]:
        return False
    pad, width = b"\t" * (len(LEDGER_COLUMNS) - len(names)), len(names) - 1
    lines = path.read_bytes().partition(b"\n")[2].split(b"\n")
    lines = [line.rstrip(b"\r") + pad if line and line.count(b"\t") == width else line for line in lines]
    tmp = path.with_name(f".{path.name}.migrate{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(ledger_lines([], header=True) + b"\n".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


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
        "steps": report.get("steps"), "bits_per_weight": result.get("bits_per_weight"), "description": "manual run",
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
    for label, load in (("train", load_train_tokens), ("validation", lambda: load_tokens("validation")),
                        ("test", lambda: load_tokens("test"))):
        try:
            tokens = load()
        except HarnessError as exc:
            print(f"{label:>10}: unavailable ({exc})")
            continue
        stand_in = " (the test split: AR_TRAIN_SPLIT=test)" if label == "train" and _train_split() == "test" else ""
        print(f"{label:>10}: {tokens.numel():,} tokens, {tokens.numel() // EVAL_WINDOW} windows{stand_in}")
    print(f"cache:  {cache_dir()}\nledger: {LEDGER_PATH}\nNext: python train.py (a baseline run), "
          "or python agent.py (the overnight loop)")


def build_parser() -> argparse.ArgumentParser:
    """The command line (`python prepare.py [eval ... | sandbox-info]`); the README's commands are checked against it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("eval", help="score a submission by the fixed protocol")
    ev.add_argument("submission", nargs="?", help="path written by prepare.submit")
    ev.add_argument("--base", action="store_true", help="score the unquantized base model instead")
    ev.add_argument("--split", default="validation", choices=["validation", "test"])
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--max-windows", type=int, help="smoke runs only: score the first N windows")
    ev.add_argument("--expect-model", metavar="DIGESTS.json",
                    help="refuse to score if model_dir() differs from these digests (from model_digests())")
    ev.add_argument("--expect-tokens", metavar="SHA256",
                    help="the split's token digest at the start of the night: a cache that differs is rebuilt")
    info = sub.add_parser("sandbox-info", help="for the driver: train.py's read paths, private paths, digests")
    info.add_argument("--json", action="store_true", help="print one JSON object (the only format)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            setup()
            return 0
        if args.command == "sandbox-info":
            print(json.dumps(sandbox_info()))
            return 0
        if bool(args.submission) == args.base:
            parser.error("give a SUBMISSION path or --base (not both)")
        if args.expect_model:  # before anything of the model is read
            check_model_digests(_read_expected_digests(args.expect_model))
        result = evaluate(None if args.base else args.submission, args.split, args.max_windows, args.expect_tokens)
    except HarnessError as exc:
        print(f"{'invalid submission' if isinstance(exc, SubmissionError) else 'error'}: {exc}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        label = "val_ppl" if args.split == "validation" else "test_ppl"
        bits = f", {result['bits_per_weight']:.3f} bits per weight" if result["bits_per_weight"] else ""
        print(f"{label}: {result['ppl']:.4f}  ({result['windows']} windows, {result['tokens']} tokens, "
              f"{result['eval_s']:.1f} s, protocol {protocol_label(result)}{bits})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
