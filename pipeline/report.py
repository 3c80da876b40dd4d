"""What each stage of a run achieved, as rows, a table and plots: `write_report(recipe, root, baseline)`.

    reasoning-qat report recipes/demo.yaml [--artifacts DIR] [--baseline EVAL_STAGE] [--json]   # pipeline/cli/report.py

Reads only manifests and `metrics.jsonl` files (nothing runs). Writes `<root>/<recipe>/report/`:
  report.md         the table below, plus the plots
  report.json       the same rows as data
  training.png      loss against step for every training stage (sft, kd_qat, rl)
  eval_accuracy.png held-out accuracy against step, for training stages that evaluated as they went
  accuracy.png      accuracy of every eval / gate stage, the baseline's as a line

Retention = accuracy / the baseline's accuracy. The baseline is `--baseline`, else the eval stage of
the teacher: the first eval stage whose model is an `sft` stage trained from scratch or the recipe's
base model. Until that default has an accuracy (a run part way through) the report has no retention and says why;
a `--baseline` must name a stage that measures accuracy and has. A plot needs at least one stage with something to
draw; otherwise it is not written.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.engine.errors import InputError
from pipeline.engine.logs import format_number

# The metrics a row shows, per stage type, in order.
COLUMNS = {
    "eval": ("accuracy", "pass_at_k", "perplexity", "kl_to_teacher", "mean_tokens", "truncation_rate", "tokens_per_s"),
    "gate": ("accuracy", "teacher_accuracy", "retention", "passed"),
    "sft": ("final_loss", "steps", "train_seconds"),
    "kd_qat": ("final_loss", "steps", "train_seconds"),
    "rl": ("reward", "accuracy", "steps"),
    "ptq": ("output_sqnr_mean", "logits_sqnr", "wall_time_s"),
    "traces": ("count", "kept", "accuracy", "mean_tokens"),
    "export": ("bits_per_weight", "bits_per_param", "bytes_on_disk"),
}
TRAINING = ("sft", "kd_qat", "rl")


def _evaluated(recipe, name: str) -> str | None:
    """The stage an eval / gate stage evaluates."""
    config = recipe.stages[name]
    return getattr(config, "model", None) or getattr(config, "init", None)


def default_baseline(recipe) -> str | None:
    for name, config in recipe.stages.items():
        if config.type != "eval" or not config.generate:  # a perplexity-only eval has no accuracy to retain
            continue
        target = _evaluated(recipe, name)
        if target == "model":
            return name
        source = recipe.stages.get(target)
        if source is not None and source.type == "sft" and getattr(source, "init", None) is None:
            return name
    return None


def build_rows(recipe, root: str | Path, baseline: str | None) -> list[dict]:
    """A row per stage: its state and metrics, and an eval's retention when the `baseline` stage has an accuracy."""
    from pipeline.engine.runner import status
    from pipeline.engine.store import Store

    store = Store(root, recipe.name)
    decisions = status(recipe, store)
    manifests = {d.name: store.manifest(d.name) for d in decisions}
    base_accuracy = (manifests.get(baseline) or {}).get("metrics", {}).get("accuracy")
    rows = []
    for d in decisions:
        manifest = manifests[d.name] or {}
        metrics = manifest.get("metrics", {})
        row = {
            "stage": d.name,
            "type": d.type,
            "state": d.state,
            "of": _evaluated(recipe, d.name) if d.type in ("eval", "gate") else None,
            "wall_seconds": manifest.get("wall_seconds"),
            "metrics": {_column(d.type, k): metrics[k] for k in COLUMNS.get(d.type, ()) if k in metrics},
            "problems": metrics.get("num_problems") or getattr(recipe.stages[d.name], "limit", None),
            "loss": _loss_kind(recipe.stages[d.name]),
        }
        if d.type == "eval" and base_accuracy and "accuracy" in metrics:
            row["metrics"]["retention"] = metrics["accuracy"] / base_accuracy
        rows.append(row)
    return rows


def _column(stage_type: str, metric: str) -> str:
    """A metric's name in the report: an rl stage's accuracy is over its own rollouts, not an eval's."""
    return "rollout_accuracy" if (stage_type, metric) == ("rl", "accuracy") else metric


def _loss_kind(config) -> str | None:
    """What a training stage's `loss` column measures."""
    if config.type == "sft" or getattr(config, "objective", None) == "sft":
        return "cross-entropy"
    if config.type == "kd_qat":
        return {"forward_kl": "forward KL", "reverse_kl": "reverse KL", "jsd": "JSD"}[config.loss]
    return None


def format_value(value) -> str:
    if isinstance(value, float):
        return format_number(value)
    return "" if value is None else str(value)


def markdown(recipe_name: str, rows: list[dict], baseline: str | None, plots: list[str], note: str | None) -> str:
    lines = [f"# {recipe_name}", ""]
    if note:
        lines += [note[0].upper() + note[1:] + ".", ""]
    elif baseline:
        lines += [f"Retention is accuracy over `{baseline}`'s.", ""]
    lines += ["| stage | type | state | of | wall (s) | metrics |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        metrics = ", ".join(f"{k} {format_value(v)}" for k, v in r["metrics"].items())
        of = (r["of"] or "") + (f" ({r['problems']} problems)" if r["of"] and r.get("problems") else "")
        lines.append(
            f"| {r['stage']} | {r['type']} | {r['state']} | {of} | {format_value(r['wall_seconds'])} | {metrics} |"
        )
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _curves(root: Path, recipe_name: str, rows: list[dict]) -> dict[str, list[dict]]:
    curves = {}
    for r in rows:
        path = root / recipe_name / r["stage"] / "metrics.jsonl"
        if r["type"] in TRAINING and r["state"] in ("complete", "stale") and path.is_file():
            curves[r["stage"]] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return curves


def plot(out_dir: Path, rows: list[dict], curves: dict[str, list[dict]], baseline: str | None) -> list[str]:
    """Write the plots that have data; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    kinds = {r["stage"]: r["type"] for r in rows}
    losses = {r["stage"]: r.get("loss") or "training loss" for r in rows}
    rl_curves = {n: pts for n, pts in curves.items() if kinds[n] == "rl"}
    curves = {n: pts for n, pts in curves.items() if kinds[n] != "rl"}
    evaluated = {n: [p for p in pts if "eval_accuracy" in p] for n, pts in curves.items()}
    figures = [
        ("training.png", curves and (lambda: _training_figure(curves, losses))),
        ("eval_accuracy.png", any(evaluated.values()) and (lambda: _eval_accuracy_figure(evaluated))),
        ("rl.png", rl_curves and (lambda: _rl_figure(rl_curves))),
        ("accuracy.png", _bars_figure(rows, "accuracy", baseline)),
        ("perplexity.png", _bars_figure(rows, "perplexity", None)),
    ]
    written = []
    for name, draw in figures:
        fig = draw() if callable(draw) else draw
        if fig:
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=120)
            matplotlib.pyplot.close(fig)
            written.append(name)
    return written


def _training_figure(curves: dict[str, list[dict]], losses: dict[str, str]):
    """One panel per kind of loss: cross-entropy and a KL are different quantities, not one log axis."""
    import matplotlib.pyplot as plt

    kinds = sorted({losses[n] for n in curves})
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, points in curves.items():
            if losses[name] == kind:
                ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=name)
        ax.set(xlabel="step", ylabel=kind, yscale="log", title=f"training: {kind}")
        ax.legend()
    return fig


def _eval_accuracy_figure(evaluated: dict[str, list[dict]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in evaluated.items():
        if points:
            ax.plot([p["step"] for p in points], [p["eval_accuracy"] for p in points], marker="o", label=name)
    ax.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1), title="accuracy during training")
    ax.legend()
    return fig


def _rl_figure(rl_curves: dict[str, list[dict]]):
    """GRPO's loss says little; what the studies compare is reward and entropy (of the rollouts, which are
    training samples: their accuracy is not an eval's)."""
    import matplotlib.pyplot as plt

    panels = [
        (k, label)
        for k, label in (
            ("accuracy", "rollout accuracy"),
            ("entropy", "entropy"),
            ("completion_length", "completion tokens"),
        )
        if any(k in p for pts in rl_curves.values() for p in pts)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, points in rl_curves.items():
            shown = [p for p in points if key in p]
            ax.plot([p["step"] for p in shown], [p[key] for p in shown], label=name)
        ax.set(xlabel="step", ylabel=label, title=label)
    axes[0][0].legend(fontsize=8)
    return fig


def _bars_figure(rows: list[dict], metric: str, baseline: str | None):
    """`metric` of every eval / gate stage that has it, one bar each, labelled with what it measured and
    on how many problems (a gate's 100 beside an eval's 200 is not the same measurement)."""
    scored = [r for r in rows if r["type"] in ("eval", "gate") and metric in r["metrics"]]
    if not scored:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(scored)), 4))
    names = [f"{r['stage']}\n({r['of']}" + (f", n={r['problems']})" if r.get("problems") else ")") for r in scored]
    ax.bar(names, [r["metrics"][metric] for r in scored], color="tab:blue")
    base = next((r for r in scored if r["stage"] == baseline), None)
    if base is not None:
        ax.axhline(base["metrics"][metric], color="tab:red", linestyle="--", label=f"{baseline}")
        ax.legend()
    ax.set(ylabel=metric, title=f"{metric} by stage", **({"ylim": (0, 1)} if metric == "accuracy" else {}))
    ax.tick_params(axis="x", labelsize=8)
    return fig


def write_report(recipe, root: str | Path, baseline: str | None = None) -> tuple[Path, list[dict], str | None]:
    """The report's folder, its rows and a note saying why there is no retention when the default baseline has not
    measured an accuracy yet (a run part way through). A `baseline` the caller named must have one."""
    if baseline is not None:
        _check_baseline(recipe, baseline)
    chosen = baseline or default_baseline(recipe)
    rows = build_rows(recipe, root, chosen)
    if not any(r["state"] in ("complete", "skipped") for r in rows):
        raise InputError(
            str(Path(root) / recipe.name),
            f"nothing to report: no stage of {recipe.name!r} has run (reasoning-qat run {recipe.source})",
        )
    base = next((r for r in rows if r["stage"] == chosen), None)
    note = None
    if base is not None and _column(recipe.stages[chosen].type, "accuracy") not in base["metrics"]:
        if baseline is not None:
            raise InputError("--baseline", f"stage {baseline!r} has not measured an accuracy yet ({base['state']})")
        note = f"no retention: the baseline {chosen!r} has not measured an accuracy yet ({base['state']})"
    out_dir = Path(root) / recipe.name / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(out_dir, rows, _curves(Path(root), recipe.name, rows), chosen)
    (out_dir / "report.json").write_text(json.dumps({"baseline": chosen, "stages": rows}, indent=2) + "\n")
    (out_dir / "report.md").write_text(markdown(recipe.name, rows, chosen, plots, note))
    return out_dir, rows, note


def _check_baseline(recipe, baseline: str) -> None:
    """A baseline the user named must be a stage that measures accuracy, whether or not it has run."""
    if baseline not in recipe.stages:
        raise InputError("--baseline", f"no stage named {baseline!r}")
    config = recipe.stages[baseline]
    if config.type == "eval" and not config.generate:
        raise InputError(
            "--baseline", f"stage {baseline!r} measures perplexity only (generate: false), no accuracy to compare with"
        )
    if "accuracy" not in COLUMNS.get(config.type, ()):
        raise InputError("--baseline", f"stage {baseline!r} is a {config.type} stage; it measures no accuracy")
