"""A hostile train.py for the sandbox tests: it tries its attacks one after another, prints each one's
outcome, a line `PROBE {json}` (the driver keeps the output in train.log and removes the run's folder; the
test checks every attack by name), then submits honestly: a copy of honest.pt, the deterministic ternary
model the test built once by running this file where no honest.pt lies beside it. So every run of the
corpus has the same honest score, and no run loads a model."""
import json
import os
import shutil
import time
from pathlib import Path

import prepare

REPO = Path(__file__).resolve().parent
RUN = Path(os.environ.get("AR_SUBMISSION", REPO / "runs" / "manual" / "submission.pt")).parent
HONEST = REPO / "honest.pt"
PROBE = "PROBE "  # an attack's outcome in the output: train.log outlives the run's folder


def wait_for(path: Path, timeout: float = 60) -> None:
    """A process an attack started is under way (it wrote `path`): train.py no longer takes the seconds a
    model load took, and must not exit before its leftovers are running."""
    end = time.time() + timeout
    while not path.exists() and time.time() < end:
        time.sleep(0.01)


def round_to_nearest(weight) -> dict:
    """Per-row absmean round-to-nearest: codes in {-1, 0, 1}, the same every run."""
    w = weight.detach().float()
    scale = w.abs().mean(dim=1).clamp(min=1e-8)
    return {"codes": (w / scale[:, None]).round().clamp(-1, 1).to(prepare.torch.int8), "scales": scale}


def submit_honestly() -> None:
    if HONEST.exists():
        shutil.copyfile(HONEST, prepare.submission_path())
        return
    model = prepare.load_model()
    for name in prepare.targeted_linears(model):
        linear = model.get_submodule(name)
        linear.export_ternary = lambda weight=linear.weight: round_to_nearest(weight)
    prepare.submit(model, {"steps": 0, "tokens": 0})


# ATTACKS


def main() -> None:
    for name, attack in ATTACKS.items():  # noqa: F821 (written in by the test)
        try:
            attack()
            outcome = "ATTACK finished without an error"
        except Exception as exc:  # the sandbox said no: carry on with the next attack, then submit honestly
            outcome = f"ATTACK blocked: {type(exc).__name__}: {exc}"
        print(PROBE + json.dumps({"attack": name, "outcome": outcome}), flush=True)
    submit_honestly()


if __name__ == "__main__":
    main()
