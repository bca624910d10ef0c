"""Stand-in train.py for driver tests: the LLM's edits change PPL (the score it will get) or MODE."""
import os
import subprocess
import sys
import time

import prepare

PPL = 20.0
PPL_SCALE = 1.0  # a second knob: proposals that touch different lines can be applied on top of each other
MODE = "ok"
SLEEP_S = 0.0


def misbehave() -> None:
    if MODE == "crash":
        raise RuntimeError("boom: a deliberate crash")
    if MODE == "hang":
        time.sleep(3600)
    if MODE == "orphan":  # a child that ignores SIGTERM, then hang
        subprocess.Popen([sys.executable, "-c", "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "open('orphan.pid','w').write(str(__import__('os').getpid())); time.sleep(3600)"])
        time.sleep(3600)
    if MODE == "flood":
        line = "x" * 1023 + "\n"
        for _ in range(20_000):
            sys.stdout.write(line)
    if MODE == "fake":
        print("val_ppl: 0.0001")
    if MODE == "tamper":
        with open("prepare.py", "a") as f:
            f.write("\n# tampered\n")
    if MODE == "ledger":
        open("results.tsv", "w").close()
    if MODE == "vandal":
        open("results.tsv", "w").write("not\ta ledger\n1\t2\n")
    if MODE == "oom":
        raise MemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if MODE == "rmruns":
        import shutil
        shutil.rmtree("runs")
    if MODE == "env":
        with open("env.dump", "w") as f:
            f.write("\n".join(f"{k}={v}" for k, v in os.environ.items()))


def main() -> None:
    time.sleep(SLEEP_S)
    misbehave()
    if MODE == "nosubmit":
        return
    prepare.submit({"ppl": float("nan") if MODE == "nan" else PPL * PPL_SCALE, "ternary": MODE != "nonternary"})
    if MODE == "garbage":
        with open(os.environ["AR_SUBMISSION"], "wb") as f:
            f.write(b"\x00not a submission")


if __name__ == "__main__":
    main()
