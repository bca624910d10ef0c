"""SmolLM2-135M-Instruct on CPU: full-precision ppl, untrained (round-to-nearest) ternary ppl, and the
ppl after a short run of train.py, on the first N validation windows. WikiText-2's train split is not
available offline, so train.py trains on the test split here (AR_TRAIN_SPLIT=test).

    python bench/smollm2_cpu.py [--windows 4] [--seconds 240] [--set BATCH_SIZE=4 --set SEQ_LEN=256 ...]
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, header, use_real_assets
from conftest import patch_constants

CPU_KNOBS = {"BATCH_SIZE": 4, "SEQ_LEN": 256, "LAMBDA_WARMUP_STEPS": 10, "EXPORT_RESERVE_S": 20.0, "LOG_EVERY_S": 30.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE for train.py")
    args = parser.parse_args()
    knobs = {**CPU_KNOBS, **{k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}}
    work = Path(tempfile.mkdtemp())
    use_real_assets(cache=os.environ.get("AR_CACHE", str(work / "cache")))
    os.environ["AR_SUBMISSION"] = str(work / "rtn.pt")
    import prepare
    import train
    fp = prepare.evaluate(None, max_windows=args.windows)
    model = train.quantize_model(prepare.load_model(), torch.tensor(1.0))
    rtn = prepare.evaluate(prepare.submit(model), max_windows=args.windows)
    del model
    for name in ("prepare.py", "train.py"):
        shutil.copy(ROOT / name, work / name)
    patch_constants(work / "train.py", **knobs)
    env = {**os.environ, "AR_EVAL": str(args.windows), "AR_TRAIN_SPLIT": "test", "AR_SUBMISSION": str(work / "trained.pt"),
           "AR_DEADLINE": str(time.time() + args.seconds)}
    done = subprocess.run([sys.executable, "train.py"], cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    out = dict(line.split(":", 1) for line in done.stdout.split("---")[-1].strip().splitlines())
    print(header("SmolLM2-135M-Instruct on CPU: full precision, untrained ternary, a short train.py run"))
    print(f"first {args.windows} validation windows ({args.windows * 2047} predicted tokens); train.py trained on the "
          f"test split (train is not offline) with {knobs}, {args.seconds:.0f} s deadline\n")
    print("| model | val ppl | ratio to FP |\n| --- | ---: | ---: |")
    print(f"| full precision | {fp['ppl']:.2f} | 1.00 |")
    print(f"| ternary, untrained (round-to-nearest, per-row absmean) | {rtn['ppl']:,.0f} | {rtn['ppl'] / fp['ppl']:,.0f} |")
    trained = float(out["val_ppl"].split()[0])
    print(f"| ternary after train.py: {out['steps'].strip()} steps, {out['train_seconds'].strip()} s, "
          f"{out['tokens'].strip()} tokens | {trained:,.1f} | {trained / fp['ppl']:,.1f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
