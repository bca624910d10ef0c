"""A hostile train.py for the sandbox tests: it tries one attack, then submits an honest, deterministic
round-to-nearest ternary model (no training), so that every run of the corpus has the same honest score."""
import json  # noqa: F401 (for the attacks)
import os
from pathlib import Path

import torch

import prepare

REPO = Path(__file__).resolve().parent
RUN = Path(os.environ.get("AR_SUBMISSION", REPO / "runs" / "manual" / "submission.pt")).parent


class Ternary(torch.nn.Module):
    """Per-row absmean round-to-nearest: codes in {-1, 0, 1}, the same every run."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def export_ternary(self) -> dict:
        w = self.weight.detach().float()
        scale = w.abs().mean(dim=1).clamp(min=1e-8)
        return {"codes": (w / scale[:, None]).round().clamp(-1, 1).to(torch.int8), "scales": scale}


def attack() -> None:
    pass  # ATTACK


def main() -> None:
    try:
        attack()
        print("ATTACK finished without an error", flush=True)
    except Exception as exc:  # the sandbox said no: carry on and submit honestly
        print(f"ATTACK blocked: {type(exc).__name__}: {exc}", flush=True)
    model = prepare.load_model()
    for name in prepare.targeted_linears(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Ternary(model.get_submodule(name)))
    prepare.submit(model, {"steps": 0, "tokens": 0})


if __name__ == "__main__":
    main()
