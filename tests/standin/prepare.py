"""Stand-in harness for fast driver tests: same CLI and submit() contract as the real prepare.py,
no model. A "submission" is JSON; the score is the ppl train.py put in it, times TEST_SPLIT_FACTOR on the test
split (the real evaluator's honesty is tested in test_harness.py). Its `meta`, `meta_dropped` and `bits_per_weight`
reach the eval JSON as they are: unlike the real evaluator's, unsanitised, so tests can feed hostile values to the
driver."""
import json
import os
import sys
import time

TEST_SPLIT_FACTOR = 1.25  # the test split scores this much worse than validation, so the two never agree


def submit(payload: dict) -> str:
    path = os.environ["AR_SUBMISSION"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)
    return path


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["sandbox-info"]:  # nothing to read outside the repo, nothing private, no model
        print(json.dumps({"train_read": [], "eval_private": [], "model": {}}))
        return 0
    if not args or args[0] != "eval":
        print("usage: prepare.py eval PATH --json", file=sys.stderr)
        return 2
    time.sleep(float(os.environ.get("STANDIN_EVAL_SLEEP", "0")))
    if os.path.exists("evalfail.txt"):  # evaluator failures, scripted by a test: the next N evaluations fail
        left = int(open("evalfail.txt").read() or 0)
        if left > 0:
            open("evalfail.txt", "w").write(str(left - 1))
            print(f"error: scripted evaluator failure ({left - 1} more to come)", file=sys.stderr)
            return 2
    try:
        sub = json.load(open(args[1]))
        ppl = float(sub["ppl"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"invalid submission: {args[1]} is not a submission file", file=sys.stderr)
        return 2
    if not sub.get("ternary", True):
        print("invalid submission: layer model.layers.0.mlp.up_proj: 7 codes are not in {-1, 0, 1}: not ternary",
              file=sys.stderr)
        return 2
    if os.path.exists("jitter.txt"):  # run-to-run noise, scripted by a test: one offset per evaluation
        offsets = open("jitter.txt").read().split()
        if offsets:
            ppl += float(offsets[0])
            open("jitter.txt", "w").write(" ".join(offsets[1:]))
    split = args[args.index("--split") + 1] if "--split" in args else "validation"
    if split == "test":  # the report's test-split score must visibly come from the test split
        ppl *= TEST_SPLIT_FACTOR
    smoke = int(args[args.index("--max-windows") + 1]) if "--max-windows" in args else None
    windows = smoke or 4
    if smoke:  # a smoke score is not comparable with a full one: make that visible
        ppl *= 0.5
    print(json.dumps({"ppl": ppl, "mean_loss": 0.0, "tokens": windows * 2047, "windows": windows, "split": split,
                      "zero_frac": 0.3, "eval_s": 0.01, "max_windows": smoke, "protocol": 1,
                      "bits_per_weight": sub.get("bits_per_weight", 1.6), "meta": sub.get("meta", {}),
                      "meta_dropped": sub.get("meta_dropped", [])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
