"""What a researcher reads in the morning: `status`, `report` (report.md, with the best's test-split score),
`plot` (progress.png, and several nights overlaid)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import git
import pandas as pd

from driver.common import log, one_line
from driver.keep import CONFIRM_SIGMAS, best_kept, kept_means, noise, same_protocol
from driver.ledger import branch_ledger, ledger_backup_of, read_ledger, reconcile_ledger
from driver.runner import clean_env
from driver.scoring import EVAL_TIMEOUT_S

# the worker that ran a row, named in its reason by the pool (--workers/--gpus/--ray); rows without it ran
# on the one local worker. `;` may end the reason: the ledger strips a cell's trailing space
WORKER_RE = re.compile(r"(?:^|; )worker ([^;\s]+);(?: |$)")
LOCAL_WORKER = "local"


def worker_of(reason) -> str:
    """The worker named in a row's reason; LOCAL_WORKER for a row the one-GPU path ran."""
    found = WORKER_RE.search(reason) if isinstance(reason, str) else None
    return found.group(1) if found else LOCAL_WORKER


def runs_text(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def natural_key(name: str) -> list:
    """gpu2 before gpu10: digit runs compare as numbers (re.split alternates text and digits, so the types line up)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def night_seconds(rows: pd.DataFrame) -> float:
    """The night's wall-clock span: from the earliest run's start (a timestamp is written as a run ENDS, so its
    train_s and eval_s are taken off) to the latest timestamp. 0 for an empty ledger."""
    stamps = pd.to_datetime(rows["timestamp"], utc=True, errors="coerce")
    if stamps.isna().all():
        return 0.0
    took = pd.to_timedelta(rows["train_s"].fillna(0) + rows["eval_s"].fillna(0), unit="s")
    return max((stamps.max() - (stamps - took).min()).total_seconds(), 0.0)


def worker_occupancy(rows: pd.DataFrame) -> pd.DataFrame:
    """Per worker (one GPU): the runs that trained, the seconds in train.py and in the evaluator, and the shares
    of the night (night_seconds) they took. An idle GPU is the cost of many workers: this shows where it went.
    Rows that never ran (invalid) belong to no worker; a crash with no train_s still names its worker."""
    columns = ["worker", "experiments", "train_s", "eval_s", "busy_share", "train_share"]
    ran = rows[rows["status"] != "invalid"]
    if ran.empty:
        return pd.DataFrame(columns=columns)
    night = night_seconds(rows)
    per = ran.assign(worker=ran["reason"].map(worker_of), trained=ran["train_s"].notna(),
                     train=ran["train_s"].fillna(0).astype(float), scoring=ran["eval_s"].fillna(0).astype(float))
    table = per.groupby("worker").agg(experiments=("trained", "sum"), train_s=("train", "sum"),
                                      eval_s=("scoring", "sum")).reset_index()
    table["experiments"] = table["experiments"].astype(int)
    scale = 1 / night if night > 0 else 0.0
    table["busy_share"] = (table["train_s"] + table["eval_s"]) * scale
    table["train_share"] = table["train_s"] * scale
    order = sorted(table["worker"], key=natural_key)
    return table.set_index("worker").loc[order].reset_index()[columns]


def plot_progress(rows: pd.DataFrame, branch: str, path: Path) -> Path:
    """progress.png: every scored experiment, kept ones labelled on the running-best line, failures
    marked along the bottom."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory
    rows = rows.dropna(subset=["experiment"])
    scored = same_protocol(rows).dropna(subset=["val_ppl"])  # one protocol's scores: others do not compare
    kept = scored[scored["status"].isin(["baseline", "keep"])]
    occupancy = worker_occupancy(rows)
    if len(occupancy) > 1:  # many GPUs: a strip below shows how much of each one's night went to training
        strip = min(0.35 * len(occupancy), 4.0) + 0.9  # a 64-GPU cluster still leaves the main plot its room
        fig, (ax, occ) = plt.subplots(2, 1, figsize=(12, 6 + strip), gridspec_kw={"height_ratios": [6, strip]})
        draw_occupancy(occ, occupancy, night_seconds(rows))
    else:
        fig, ax = plt.subplots(figsize=(12, 6))
    discarded = scored[scored["status"] == "discard"]
    ax.scatter(discarded["experiment"], discarded["val_ppl"], s=16, color="0.55", alpha=0.45, label="discarded")
    ax.scatter(kept["experiment"], kept["val_ppl"], s=44, color="tab:green", zorder=3, label="kept")
    means = kept_means(scored)  # what the keep rule compares
    if len(kept):
        since = kept.groupby("commit", sort=False)["experiment"].min()
        xs = rows["experiment"].astype(float).tolist()
        line = [min((means[c] for c in means.index if since[c] <= x), default=None) for x in xs]
        ax.step(xs, line, where="post", color="tab:green", lw=1.5, label="best so far (mean of a commit's runs)")
        band = CONFIRM_SIGMAS * (noise(scored) or 0.0)
        if band:  # a gain inside the band is confirmed by a second run before it is kept
            ys = pd.Series(line, dtype=float)
            ax.fill_between(xs, ys - band, ys + band, step="post", color="tab:green", alpha=0.12, lw=0,
                            label=f"noise band (± {CONFIRM_SIGMAS:g} σ = {band:.3g})")
        for _, row in kept.drop_duplicates("commit").iterrows():  # one label per kept change
            ax.annotate(one_line(row["description"], 40), (row["experiment"], row["val_ppl"]), xytext=(4, 6),
                        textcoords="offset points", fontsize=7, rotation=18, color="darkgreen")
        ax.margins(y=0.15)  # room for the labels under the title
    marks = {"crash": ("x", "tab:red"), "timeout": ("v", "tab:orange"), "invalid": ("|", "tab:purple")}
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    for status, (marker, color) in marks.items():
        failed = rows[rows["status"] == status]
        if len(failed):
            ax.scatter(failed["experiment"], [0.03] * len(failed), marker=marker, color=color, transform=bottom,
                       label=f"{status} ({len(failed)})", clip_on=False)
    if len(scored) and scored["val_ppl"].max() > 3 * scored["val_ppl"].min():
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are whole numbers
    ax.margins(x=0.03)
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_ppl (WikiText-2 validation, lower is better)")
    title = f"{branch}: {len(rows)} experiments"
    if len(kept):
        title += f", baseline {means.iloc[0]:.2f} → best {means.min():.2f}"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: never over a point
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_occupancy(ax, occupancy: pd.DataFrame, night: float) -> None:
    """One horizontal bar per worker: its share of the night in train.py, then in the evaluator."""
    from matplotlib.ticker import PercentFormatter
    ys = range(len(occupancy))
    ax.barh(ys, occupancy["train_share"], color="tab:blue", height=0.6, label="training")
    ax.barh(ys, occupancy["busy_share"] - occupancy["train_share"], left=occupancy["train_share"], color="tab:blue",
            alpha=0.35, height=0.6, label="scoring")
    labelled = len(occupancy) <= 16  # beyond that the words overlap: the bars and `report` say it
    for y, (_, row) in zip(ys, occupancy.iterrows() if labelled else ()):
        ax.text(min(row["busy_share"], 1.0) + 0.01, y, f"{row['train_share']:.0%} training, "
                f"{row['busy_share']:.0%} with scoring, {runs_text(row['experiments'])}", va="center", fontsize=7)
    ax.set_yticks(list(ys), occupancy["worker"], fontsize=8 if labelled else 5)
    ax.invert_yaxis()  # the first worker on top, as in status and the report
    ax.set_xlim(0, 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel(f"share of the night ({night / 3600:.2f} h) per worker", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def running_best(rows: pd.DataFrame) -> pd.DataFrame:
    """Per ledger row (one protocol's): experiment, hours since the night's first row, the best kept mean so far
    (NaN before the baseline) and the noise band's half-width (CONFIRM_SIGMAS noise widths, 0 when unknown)."""
    rows = rows.dropna(subset=["experiment"])
    scored = same_protocol(rows)  # failed rows have no protocol: they still count as experiments of the night
    stamps = pd.to_datetime(rows["timestamp"], utc=True, errors="coerce")
    best, sigma = [], []
    for index in rows.index:
        seen = scored.loc[scored.index <= index]
        best.append(best_kept(seen))
        sigma.append(CONFIRM_SIGMAS * (noise(seen) or 0.0))
    return pd.DataFrame({"experiment": rows["experiment"].astype(int).to_numpy(),
                         "hours": ((stamps - stamps.min()).dt.total_seconds() / 3600).to_numpy(),
                         "best": pd.array(best, dtype="Float64").astype(float), "band": sigma})


def plot_overlay(ledger: Path, tags: list[str], path: Path) -> Path:
    """Several nights' running-best curves side by side: against experiment number and against wall-clock
    hours, each with its noise band, so that an LLM night can be held against a sweep night of the same length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for tag, color in zip(tags, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        curve = running_best(branch_ledger(ledger, f"autoresearch/{tag}")).dropna(subset=["best"])
        if curve.empty:
            log(f"plot: no scored rows for --tag {tag}")
            continue
        label = f"{tag}: {curve['experiment'].nunique()} experiments, best {curve['best'].iloc[-1]:.4g}"
        for ax, x in zip(axes, ("experiment", "hours")):
            ax.step(curve[x], curve["best"], where="post", color=color, lw=1.8, label=label)
            ax.fill_between(curve[x], curve["best"] - curve["band"], curve["best"] + curve["band"], step="post",
                            color=color, alpha=0.15, lw=0)
            ax.plot(curve[x], curve["best"], "o", color=color, ms=3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("experiment")
    axes[1].set_xlabel("hours since the night's first run")
    axes[0].set_ylabel("best kept val_ppl so far (shaded: ± the confirmation threshold)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.margins(x=0.03, y=0.08)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), fontsize=9, frameon=False)
    fig.suptitle(f"running best: {' vs '.join(tags)}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend below the axes: never over a point
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def test_split_ppl(root: Path, submission: Path) -> str:
    """The best kept submission on the test split (never shown to the LLM)."""
    if not submission.exists():
        return "n/a (the best submission is not on disk)"
    done = subprocess.run([sys.executable, "-I", "prepare.py", "eval", str(submission), "--split", "test", "--json"],
                          cwd=root, capture_output=True, text=True, env=clean_env(), timeout=EVAL_TIMEOUT_S)
    if done.returncode:
        return f"n/a ({one_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'eval failed', 150)})"
    return f"{json.loads(done.stdout.strip().splitlines()[-1])['ppl']:.4f}"


def night_report(rows: pd.DataFrame, branch: str, runs: Path, root: Path, with_test: bool = True) -> str:
    numbered = rows.dropna(subset=["experiment"])
    same = same_protocol(numbered)  # the latest protocol's scores: others are never compared with them
    kept = same[same["status"].isin(["baseline", "keep"])].dropna(subset=["val_ppl"])
    if kept.empty:
        return f"# {branch}\n\nno scored baseline yet ({len(numbered)} rows)\n"
    means = kept_means(same)
    best_row = kept[kept["commit"] == means.idxmin()].iloc[0].copy()
    best_row["val_ppl"] = means.min()
    baseline = float(means.iloc[0])
    protocol = kept.iloc[-1]["protocol"] if pd.notna(kept.iloc[-1]["protocol"]) else "unrecorded"
    labels = numbered.dropna(subset=["val_ppl"])["protocol"].astype(object).fillna("unrecorded")
    others = ", ".join(f"{k} ({v} scored)" for k, v in labels.value_counts().items() if k != protocol)
    lines = [f"# {branch}", "",
             f"- protocol {protocol}: every score below" + (f" (rows under {others} are not compared with them)"
                                                            if others else ""),
             f"- baseline val_ppl {baseline:.4f}; best {best_row['val_ppl']:.4f} "
             f"({(baseline - best_row['val_ppl']) / baseline:.1%} lower) at experiment {int(best_row['experiment'])}, "
             f"commit {str(best_row['commit'])[:10]}; {bits_text(kept[kept['commit'] == means.idxmin()])}"]
    sigma = noise(same)
    lines.append(f"- run-to-run noise (std of the baseline runs): {sigma:.4f}" if sigma is not None
                 else "- run-to-run noise: n/a (one baseline run; use --baseline-runs 2)")
    counts = numbered["status"].value_counts()
    lines.append("- experiments: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    ran = numbered[numbered["status"].isin(["baseline", "keep", "discard", "crash", "timeout"])]
    bare = int(ran["reason"].astype(object).fillna("").str.contains("unsandboxed;").sum())
    lines.append(f"- sandbox: {'every run in Landlock' if not bare else f'{bare} of {len(ran)} runs UNSANDBOXED'}")
    lines.append(f"- LLM: {int(numbered['prompt_tokens'].fillna(0).sum()):,} prompt + "
                 f"{int(numbered['completion_tokens'].fillna(0).sum()):,} completion tokens, "
                 f"${numbered['cost_usd'].fillna(0).sum():.2f}")
    stamps = pd.to_datetime(numbered["timestamp"], utc=True, errors="coerce")  # as each experiment ends: add the first run
    first = numbered.iloc[0]
    wall = (stamps.max() - stamps.min()).total_seconds() + (first["train_s"] or 0) + (first["eval_s"] or 0)
    gpus = max(len(worker_occupancy(numbered)), 1)  # many workers: the share of all their GPU-hours, not over 100%
    if wall > 0:
        lines.append(f"- wall-clock share spent training: {numbered['train_s'].fillna(0).sum() / (wall * gpus):.0%} "
                     f"of {wall / 3600:.2f} h" + (f" on each of {gpus} workers" if gpus > 1 else ""))
    on_disk = [runs / str(int(e)) / "submission.pt" for e in kept[kept["commit"] == means.idxmin()]["experiment"]]
    best_submission = next((path for path in on_disk if path.exists()), on_disk[0])  # repeated runs: any one
    test = test_split_ppl(root, best_submission) if with_test else "not run"
    lines.append(f"- best commit on the test split: test_ppl {test}")
    lines += ["", "## Kept changes (mean val_ppl over each commit's runs)", "",
              "| experiment | runs | val_ppl | gain | noise widths | bits/weight | description |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    previous = None
    for commit, runs_of in kept.groupby("commit", sort=False):
        value, first_row = runs_of["val_ppl"].mean(), runs_of.iloc[0]
        gain = "" if previous is None else f"{previous - value:.4f}"
        sig = "" if previous is None or not sigma else f"{(previous - value) / sigma:.1f}"
        bits = runs_of["bits_per_weight"].dropna()
        lines.append(f"| {int(first_row['experiment'])} | {len(runs_of)} | {value:.4f} | {gain} | {sig} | "
                     f"{f'{bits.iloc[0]:.3f}' if len(bits) else ''} | {one_line(first_row['description'], 80)} |")
        previous = value
    lines += occupancy_table(numbered)
    return "\n".join(lines) + "\n"


def bits_text(runs: pd.DataFrame) -> str:
    """A commit's bits per weight (codes, scales and biases of its ternary layers, from the evaluator)."""
    bits = runs["bits_per_weight"].dropna()
    return f"{bits.iloc[0]:.3f} bits per weight" if len(bits) else "bits per weight not recorded"


def occupancy_table(rows: pd.DataFrame) -> list[str]:
    """The report's markdown lines for worker_occupancy (none when no run has happened)."""
    occupancy = worker_occupancy(rows)
    if occupancy.empty:
        return []
    lines = ["", f"## Per-worker occupancy (share of the night's {night_seconds(rows) / 3600:.2f} h)", "",
             "| worker | experiments | training share | training+scoring share |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {row.worker} | {row.experiments} | {row.train_share:.0%} | {row.busy_share:.0%} |"
              for row in occupancy.itertuples()]
    return lines


def branch_rows(args) -> tuple[Path, str, pd.DataFrame]:
    """report/plot/status: the ledger checked against the driver's copy first, then the branch's rows."""
    root = Path(args.repo).resolve()
    for note in reconcile_ledger(root / "results.tsv", ledger_backup_of(root)):
        log(note)
    args.tag = args.tag or default_tag(root)
    branch = f"autoresearch/{args.tag}"
    return root, branch, branch_ledger(root / "results.tsv", branch)


def default_tag(root: Path) -> str:
    """No --tag for report/plot/status: the checked-out autoresearch/* branch, else the tag of the newest
    research row in the ledger (the morning after a night started with the date's default tag)."""
    with contextlib.suppress(git.InvalidGitRepositoryError, git.NoSuchPathError, TypeError, ValueError):
        branch = git.Repo(root).active_branch.name  # TypeError: a detached HEAD
        if branch.startswith("autoresearch/"):
            return branch.split("/", 1)[1]
    rows = read_ledger(root / "results.tsv")
    research = rows[rows["branch"].fillna("").str.startswith("autoresearch/") & (rows["status"] != "manual")]
    if len(research):
        stamps = pd.to_datetime(research["timestamp"], utc=True, errors="coerce")
        newest = research.assign(t=stamps).sort_values("t", kind="stable")
        return newest.iloc[-1]["branch"].split("/", 1)[1]
    return datetime.now().strftime("%b%d").lower()


def show_status(args) -> int:
    root, branch, rows = branch_rows(args)
    if rows.empty:
        print(f"no experiments on {branch} in {root / 'results.tsv'}")
        return 0
    same = same_protocol(rows)
    means = kept_means(same)
    print(f"branch {branch}: {len(rows)} experiments")
    if len(means):
        best = same[same["commit"] == means.idxmin()].iloc[0]
        print(f"baseline val_ppl {means.iloc[0]:.4f}; best {means.min():.4f} (experiment {int(best['experiment'])}, "
              f"commit {str(best['commit'])[:10]}; protocol {best['protocol']}; "
              f"{bits_text(same[same['commit'] == means.idxmin()])})")
    print("by status: " + ", ".join(f"{k} {v}" for k, v in rows["status"].value_counts().items()))
    print(f"LLM tokens: {int(rows['prompt_tokens'].fillna(0).sum())} prompt, "
          f"{int(rows['completion_tokens'].fillna(0).sum())} completion; cost ${rows['cost_usd'].fillna(0).sum():.4f}")
    occupancy = worker_occupancy(rows)
    if len(occupancy):  # the share of each GPU's night spent training: idle GPUs show here
        print(f"occupancy of the night's {night_seconds(rows) / 3600:.2f} h:")
        for row in occupancy.itertuples():
            print(f"  {row.worker}: {runs_text(row.experiments)}, training {row.train_share:.0%}, "
                  f"training+scoring {row.busy_share:.0%}")
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print(rows[["experiment", "status", "val_ppl", "best_val_ppl", "protocol", "train_s", "bits_per_weight",
                    "description"]].tail(15)
              .to_string(index=False))
    return 0
