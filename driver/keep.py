"""The keep rule: whether an experiment's score is kept, pure (no I/O), from the branch's rows.

A result is compared with the best kept score under the same evaluation protocol; a gain within the
run-to-run noise is run once more (a confirmation run) before it is kept."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

import prepare
from driver.common import one_line
from driver.records import RunResult

CONFIRM_SIGMAS = 2.0           # a gain within this many noise widths is re-run once before it is kept
BASELINE_TRIES = 3             # baseline runs that fail in a row before the night stops


@dataclass(frozen=True)
class Decision:
    status: str            # the row's status: baseline, keep, discard, crash, timeout, invalid
    reason: str            # why, naming the protocol whose scores were compared
    best: float | None     # the best kept val_ppl after this decision (the rows' best_val_ppl)
    confirm: bool = False  # a marginal gain: run it once more, then ask again with the confirmation
    reapply: bool = False  # measured on a stale parent that it beat: re-apply the change on the best (stale_parent)


def keep_rule(rows: pd.DataFrame, result: RunResult, confirm: RunResult | None = None, *, baseline: bool = False,
              strict: bool = False, protocol: str | None = None) -> Decision:
    """THE keep rule. rows: the branch's ledger, of which only the rows scored under the result's protocol
    (else `protocol`) are compared, each kept commit by the mean of its runs. result, confirm: a run's
    fields (`status` and `reason` when it failed, else `val_ppl` and `protocol`). The seed's rule, keep only
    a strictly lower val_ppl, plus: a gain within CONFIRM_SIGMAS noise widths is run once more and judged
    by the mean of both runs (not with strict)."""
    protocol = result.get("protocol") or protocol
    same = same_protocol(rows, protocol)
    means = kept_means(same)
    best = float(means.min()) if len(means) else None
    if result.get("status"):  # crash, timeout, invalid: no score; a failed baseline is no reference either
        return Decision(result["status"], result.get("reason") or "", best)
    value, sigma, under = result["val_ppl"], noise(same), f"protocol {protocol}"
    if baseline:  # the reference: the mean of the unmodified train.py's runs (all of one commit)
        runs = [*same.loc[same["status"] == "baseline", "val_ppl"].dropna(), value]
        mean = sum(runs) / len(runs)
        return Decision("baseline", f"unmodified train.py, run {len(runs)}: mean {mean:.4g} ({under})", mean)
    if best is None:  # never keep without a reference (run_baselines scores one first)
        return Decision("discard", f"no scored baseline under {under} to compare with", None)
    marginal = f"gain {best - value:.4g} within {CONFIRM_SIGMAS:g} noise widths ({CONFIRM_SIGMAS * (sigma or 0):.4g})"
    if confirm is None and not strict and sigma and 0 < best - value <= CONFIRM_SIGMAS * sigma:
        return Decision("confirm", f"{marginal}: confirming ({under})", best, confirm=True)
    if confirm is None:
        why = f"val_ppl {value:.4g} vs best {best:.4g}"
    elif confirm.get("val_ppl") is None:
        return Decision("discard", f"{marginal}: confirmation run failed ({confirm.get('reason')}) ({under})", best)
    else:
        value = (value + confirm["val_ppl"]) / 2
        why = f"{marginal}: confirmation run gave {confirm['val_ppl']:.4g}, mean {value:.4g} vs best {best:.4g}"
    if value < best:
        return Decision("keep", f"val_ppl improved: {why} ({under})", value)
    return Decision("discard", f"val_ppl not lower than the best kept: {why} ({under})", best)


def confirmation_needed(rows: pd.DataFrame, result: RunResult, *, baseline: bool = False, strict: bool = False,
                        protocol: str | None = None) -> bool:
    """A first run's marginal gain over the best (keep_rule's confirm): it is run once more before the decision.
    Never a baseline run, nor a run without a score."""
    if baseline or result.get("status") or result.get("val_ppl") is None:
        return False
    return keep_rule(rows, result, strict=strict, protocol=protocol).confirm


def stale_parent(rows: pd.DataFrame, result: RunResult, decision: Decision, parent: str, head: str,
                 confirm: RunResult | None = None, *, strict: bool = False, protocol: str | None = None) -> Decision:
    """keep_rule's `decision` on a result measured on `parent` while another experiment moved the best to `head`.
    A change that beat the best, or beat its own parent beyond the noise (as keep_rule judges a gain: more than
    CONFIRM_SIGMAS noise widths, or any gain with --strict, without a noise estimate, or by the mean of a
    confirmation), is not kept on a parent that is no longer the branch's: discarded here, and re-applied on the
    best (reapply), where its own run decides. Any other decision stands as keep_rule made it."""
    if parent == head or decision.status not in ("keep", "discard"):
        return decision
    stale = f"stale parent: {decision.reason}, but measured on {parent[:8]}, which is no longer the best ({head[:8]})"
    if decision.status == "keep":
        return Decision("discard", stale, decision.best, reapply=True)
    same = same_protocol(rows, result.get("protocol") or protocol)
    means = kept_means(same)
    if parent not in means.index:  # no score of its own parent to compare with
        return decision
    own, value = float(means[parent]), result["val_ppl"]
    confirmed = confirm is not None and confirm.get("val_ppl") is not None
    if confirmed:
        value = (value + confirm["val_ppl"]) / 2
    sigma = noise(same)
    margin = 0.0 if strict or confirmed or not sigma else CONFIRM_SIGMAS * sigma
    if own - value <= margin:
        return decision
    beyond = f", beyond the noise margin {margin:.4g}" if margin else ""
    return Decision("discard", f"{stale}; it beat that parent's {own:.4g} with {value:.4g} (a gain of {own - value:.4g}"
                               f"{beyond})", decision.best, reapply=True)


def scored_baselines(rows: pd.DataFrame, protocol: str) -> int:
    """How many baseline runs scored under `protocol`."""
    return int((same_protocol(rows, protocol)["status"] == "baseline").sum())


def baseline_complete(rows: pd.DataFrame, protocol: str, runs: int) -> bool:
    """The reference under `protocol` is done: `runs` scored baseline runs, or its experiments have begun (a keep)."""
    return scored_baselines(rows, protocol) >= runs or bool((same_protocol(rows, protocol)["status"] == "keep").any())


def baseline_description(rows: pd.DataFrame, protocol: str, run: int) -> str:
    """A baseline run's description: the branch's train.py as it started, or as kept when a new protocol needs
    its own reference."""
    what = "unmodified train.py" if not (rows["status"] == "keep").any() else f"train.py as kept, under {protocol}"
    return f"baseline: {what}" + (f" (run {run})" if run > 1 else "")


def baseline_failures(failures: int, row: pd.Series | None, protocol: str) -> int:
    """Baseline runs in a row that did not score under `protocol`, after one more run (its row; None: it wrote
    none): BASELINE_TRIES of them stop the night, whatever the number of workers."""
    scored = row is not None and row["status"] == "baseline" and row["protocol"] == protocol
    return 0 if scored else failures + 1


def baseline_failure(rows: pd.DataFrame, protocol: str, tag: str) -> str:
    """Why the night stops after BASELINE_TRIES baseline runs that did not score: the last run's reason and folder."""
    last = rows.iloc[-1]
    why = last["reason"] if last["status"] != "baseline" else f"scored under protocol {last['protocol']}"
    return (f"train.py as committed did not score under protocol {protocol} in {BASELINE_TRIES} tries "
            f"(last: {one_line(why, 200)}); see runs/{tag}/{int(last['experiment'])}/: fix train.py (or the harness) "
            "and start again")


def same_protocol(rows: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """The rows scored under `protocol` (default: the latest scored row's): only these are compared."""
    labels = rows["protocol"].astype(object).fillna("").astype(str)
    if protocol is None:
        scored = labels[rows["val_ppl"].notna()]
        protocol = scored.iloc[-1] if len(scored) else ""
    return rows[labels == protocol]


def kept_means(rows: pd.DataFrame) -> pd.Series:
    """Each kept commit's mean val_ppl (repeated baselines and confirmed keeps count by their mean),
    in the order the commits were first scored. Callers pass rows of one protocol."""
    kept = rows[rows["status"].isin(["baseline", "keep"])].dropna(subset=["val_ppl"])
    return kept.groupby("commit", sort=False)["val_ppl"].mean()


def best_kept(rows: pd.DataFrame, protocol: str | None = None) -> float | None:
    """The score to beat under `protocol` (default: the latest): the lowest kept commit's mean val_ppl."""
    means = kept_means(same_protocol(rows, protocol))
    return float(means.min()) if len(means) else None


def noise(rows: pd.DataFrame, protocol: str | None = None) -> float | None:
    """Run-to-run noise under `protocol` (default: the latest): the std of the repeated baseline runs."""
    runs = same_protocol(rows, protocol)
    runs = runs[runs["status"] == "baseline"]["val_ppl"].dropna()
    return float(runs.std()) if len(runs) >= 2 else None


def night_protocol(args) -> str:
    """The protocol label this start's scores carry: full, or a smoke run of --eval-windows windows."""
    return prepare.protocol_label({"protocol": prepare.PROTOCOL_VERSION, "max_windows": args.eval_windows,
                                   "windows": args.eval_windows})
