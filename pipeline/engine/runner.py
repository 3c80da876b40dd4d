"""The runner: decide which stages are up to date, run the others in DAG order, record what ran.

A stage is up to date (skipped) when it has a manifest of status `complete` that recorded the type, code
version, config, recipe sections and input fingerprints the stage has now, whose inputs were not re-run
since, and every file it lists is present with its sha256; the checks run cheapest first and the first
failing one is the reason shown by `status` and the plan. Otherwise the stage runs, and with it everything
downstream. Config fields marked OPERATIONAL (pipeline.engine.stage_api) are held at their default in all of
this: changing one re-runs nothing and keeps a stage's checkpoints. A manifest is judged by these parts
rather than by its fingerprint, and downstream stages see the fingerprint it recorded, so artifacts
written before a field was marked operational stay up to date whatever value they ran with.

A stage that runs resumes from the checkpoints of an interrupted attempt with the same fingerprint;
those of an attempt with another one are discarded, and the plan says so and why.

Signals: pipeline.engine.signals (a first SIGINT/SIGTERM stops a training loop at its next checkpoint, any
other work at once; the CLI exits 130 / 143). `status` shows the stage another process is running,
with its pid (Store.holder).

Gates: a stage with `when: <gate>` is skipped (a manifest of status `skipped`) when the gate's metrics
say `passed` 0; a stage downstream of a skipped stage reads the skipped stage's own input named by its
module's `PASSTHROUGH`, recursively, so downstream stages use the last stage that did run.

Several processes (`accelerate launch -m pipeline.cli run ...`): every rank decides the same plan from
the same files and runs each stage with the same context; only the main rank takes the lock, writes
manifests, renames directories and writes run.log; all ranks meet at a barrier around each stage.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.engine import dag, logs, signals
from pipeline.engine.errors import InputError
from pipeline.engine.recipe import Recipe, did_you_mean
from pipeline.engine.stage_api import BASE_MODEL_REF, StageContext, result_config
from pipeline.engine.store import NotWritable, Store, fingerprint, now_iso, sha256_json

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A failure at run time, reported as one line (exit code 1)."""


class StageFailed(RunError):
    pass


class RunStopped(RunError):
    """The run stopped on SIGINT/SIGTERM; checkpoints are kept for the next run."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass(frozen=True)
class Options:
    from_stage: str | None = None
    """Re-run this stage and everything downstream of it, even if up to date."""
    only: str | None = None
    """Run just this stage (even if up to date); its inputs must be complete and up to date."""
    force: bool = False
    """Re-run every selected stage, and run stages whose gate did not pass."""


@dataclass
class Effective:
    """What a reference to a stage resolves to once gates have been applied."""

    stage: str
    """The stage whose artifact is read (`model` for the base model); a skipped stage's passthrough."""
    fingerprint: str
    run_id: str | None
    manifest: dict = field(default_factory=dict)
    pending: str | None = None
    """Set when the artifact is not there yet: why it will (re-)run."""
    unavailable: str | None = None
    """Set when there is nothing to read: a skipped stage without PASSTHROUGH."""


@dataclass
class Decision:
    name: str
    type: str
    action: str
    """`run`, `skip` (up to date) or `gate` (skipped because its gate did not pass)."""
    state: str
    """What `status` shows: complete, stale, pending, skipped, failed, or running (in another process)."""
    reason: str
    fingerprint: str
    inputs: dict[str, Effective]
    warning: str | None = None


@dataclass
class Outcome:
    name: str
    state: str
    wall_seconds: float | None = None
    headline: str = ""


# -- planning -----------------------------------------------------------------------------------------


class Planner:
    """Decides stages in DAG order; `record` feeds each decision (or a fresh manifest) back in."""

    def __init__(self, recipe: Recipe, store: Store, deep: bool = True):
        self.recipe = recipe
        self.store = store
        self.deep = deep
        self.effective: dict[str, Effective] = {}
        self.base = Effective(BASE_MODEL_REF, sha256_json(recipe.section("model")), None)

    def decide(self, name: str, forced: str | None = None, past_gate: bool = False) -> Decision:
        """Run, skip or gate-skip `name`, given the decisions already recorded for its inputs.

        `forced` (why, e.g. "--from ptq") makes an otherwise up-to-date stage run; `past_gate` (--force)
        runs a forced stage whose gate did not pass, with a warning.
        """
        refs = self.recipe.refs(name)
        inputs = {f: self.base if t == BASE_MODEL_REF else self.effective[t] for f, t in refs.items()}
        now = self._now(name, inputs)
        fp = fingerprint(now["type"], now["config"], now["sections"], now["inputs"], now["code_version"])

        def decision(action, state, reason, warning=None):
            return Decision(name, now["type"], action, state, reason, fp, inputs, warning)

        unavailable = next((f"input '{f}': {e.unavailable}" for f, e in inputs.items() if e.unavailable), None)
        if unavailable:
            return decision("gate", "skipped", unavailable)
        manifest = self.store.manifest(name)
        warning = None
        gate_failed = self._gate_failed(refs, inputs)
        if gate_failed:
            if forced and past_gate:
                warning = f"{gate_failed}; running anyway ({forced})"
            elif self._ran_past_this_gate(name, manifest, now, inputs):
                # a run forced past this very gate result (any change to the gate makes it stale):
                # it stays what downstream reads until something changes, rather than being skipped over
                return decision(
                    "skip", "complete", f"up to date (ran past the failed gate with --force: {gate_failed})"
                )
            else:
                return decision("gate", "skipped", gate_failed)

        state, reason, files_warning = self._state(name, manifest, now, inputs, fp, forced)
        warning = files_warning or warning
        if state == "complete" and not forced:
            return decision("skip", state, reason, warning)
        reason = forced or reason
        note = self._checkpoints_note(name, fp, now, inputs)
        return decision("run", state, f"{reason}; {note}" if note else reason, warning)

    def _now(self, name: str, inputs: dict[str, Effective]) -> dict[str, Any]:
        """What the fingerprint hashes, and what a manifest or an attempt's record is compared with."""
        config, module = self.recipe.stages[name], self.recipe.modules[name]
        return {
            "type": config.type,
            "config": result_config(type(config), config.model_dump(mode="json")),
            "sections": {s: self.recipe.section(s) for s in module.USES},
            "inputs": {f: e.fingerprint for f, e in inputs.items()},
            "code_version": module.CODE_VERSION,
        }

    def _gate_failed(self, refs: dict[str, str], inputs: dict[str, Effective]) -> str | None:
        """Why the stage's `when` gate did not pass; None when it has none or it passed."""
        if "when" in inputs and self._gate_passed(inputs["when"]) is False:
            return self._gate_reason(refs["when"], inputs["when"])
        return None

    def _ran_past_this_gate(self, name: str, manifest: dict | None, now: dict, inputs: dict[str, Effective]) -> bool:
        """The stage's complete manifest is still up to date (and so was made running past the gate's result)."""
        return (
            manifest is not None
            and manifest.get("status") == "complete"
            and not any(e.pending for e in inputs.values())
            and self._stale_reason(name, manifest, now, inputs) is None
        )

    def _state(
        self, name: str, manifest: dict | None, now: dict, inputs: dict[str, Effective], fp: str, forced: str | None
    ) -> tuple[str, str, str | None]:
        """(state, reason, warning) of a stage its gate lets run: pending, complete, stale, or failed when the last
        attempt with this very fingerprint failed (and it is not complete)."""
        failed = self.store.failed(name)
        failure = (
            f"failed: {failed.get('error', 'unknown error')}" if failed and failed.get("fingerprint") == fp else None
        )
        if manifest is None:
            return ("failed", failure, None) if failure else ("pending", "never run", None)
        reason, warning = self._why_stale(name, manifest, now, inputs, forced)
        if reason is None:
            return "complete", "up to date", warning
        return ("failed", failure, warning) if failure else ("stale", reason, warning)

    def _why_stale(
        self, name: str, manifest: dict, now: dict, inputs: dict[str, Effective], forced: str | None
    ) -> tuple[str | None, str | None]:
        """(why the recorded stage is out of date, a warning to show for it); (None, None) when it is up to date."""
        reason = self._stale_reason(name, manifest, now, inputs)
        reason = reason or next(
            (f"input '{f}' will re-run ({e.pending})" for f, e in inputs.items() if e.pending), None
        )
        if reason is None and manifest.get("status") == "skipped":
            refs = self.recipe.refs(name)
            reason = f"gate '{refs['when']}' passes now" if "when" in refs else "was skipped"
        if reason is None and self.deep and not forced:
            reason = self.store.check_files(name, manifest, deep=True)
            if reason:
                return reason, f"{reason}; re-running"
        return reason, None

    def _gate_reason(self, name: str, gate: Effective) -> str:
        """`gate 'g' did not pass`, with the measured numbers when the gate module can `explain` them."""
        reason = f"gate '{name}' did not pass"
        explain = getattr(self.recipe.modules[name], "explain", None)
        if explain is not None and not gate.unavailable:
            reason += f": {explain(self.recipe.stages[name], gate.manifest.get('metrics', {}))}"
        return reason

    @staticmethod
    def _gate_passed(gate: Effective) -> bool | None:
        if gate.unavailable:
            return False
        if gate.pending:
            return None  # not known until the gate has run
        metrics = gate.manifest.get("metrics", {})
        if "passed" not in metrics:
            raise RunError(f"stages.{gate.stage}: a gate must report the metric 'passed' (1.0 or 0.0)")
        return bool(metrics["passed"])

    def _stale_reason(self, name: str, manifest: dict, now: dict, inputs: dict[str, Effective]) -> str | None:
        """Why a stage's manifest does not match what it would be now, cheapest check first (no sha256)."""
        if manifest.get("status") not in ("complete", "skipped"):
            return f"manifest has status {manifest.get('status')!r}"
        reason = self._changed(name, manifest, now, inputs)
        if reason is not None:
            return reason
        runs = manifest.get("input_runs", {})
        for f, e in inputs.items():
            if not e.pending and runs.get(f) != e.run_id:
                return f"input '{f}' was re-run"
        if manifest.get("status") == "complete":
            return self.store.check_files(name, manifest, deep=False)
        return None

    def _changed(self, name: str, recorded: dict, now: dict, inputs: dict[str, Effective]) -> str | None:
        """What differs between `recorded` (a manifest, or an attempt's record) and `now`, the parts of the
        stage's fingerprint; operational config fields are at their defaults in `now` and compared so."""
        if recorded.get("type") != now["type"]:
            return f"type changed: {recorded.get('type')} -> {now['type']}"
        if recorded.get("code_version") != now["code_version"]:
            return f"code version {recorded.get('code_version')} -> {now['code_version']}"
        config_cls = type(self.recipe.stages[name])
        changes = _diff(result_config(config_cls, recorded.get("config", {})), now["config"])
        if changes:
            return f"config changed: {changes}"
        for section, value in now["sections"].items():
            changes = _diff(recorded.get("sections", {}).get(section), value)
            if changes:
                return f"recipe section '{section}' changed: {changes}"
        for f, e in inputs.items():
            if recorded.get("inputs", {}).get(f) != e.fingerprint:
                was = recorded.get("input_stages", {}).get(f)
                return f"input '{f}' changed" + (f" (now from '{e.stage}', was '{was}')" if was != e.stage else "")
        return None

    def _checkpoints_note(self, name: str, fp: str, now: dict, inputs: dict[str, Effective]) -> str | None:
        """What running the stage does with the checkpoints of an interrupted attempt: resumes from them
        (same fingerprint), or discards them, saying which step and why."""
        step = self.store.checkpoint_step(name)
        if step is None:
            return None
        if self.store.partial_fingerprint(name) == fp:
            return f"resumes from step {step}"
        attempt = self.store.attempt(name)  # None for an attempt of an older version, which kept no record
        why = self._changed(name, attempt, now, inputs) if attempt else None
        return f"discards the checkpoint of step {step}, made with other settings" + (f" ({why})" if why else "")

    def record(self, decision: Decision, manifest: dict | None = None) -> None:
        """What a reference to this stage resolves to from now on."""
        name = decision.name
        if decision.action == "gate":
            passthrough = getattr(self.recipe.modules[name], "PASSTHROUGH", None)
            if passthrough in decision.inputs:
                self.effective[name] = decision.inputs[passthrough]
            else:
                self.effective[name] = Effective(
                    name, decision.fingerprint, None, unavailable=f"'{name}' was skipped and passes nothing through"
                )
            return
        if manifest is None and decision.action == "skip":
            manifest = self.store.manifest(name)
        if manifest is None:  # planned, not run
            self.effective[name] = Effective(name, decision.fingerprint, None, pending=decision.reason)
        else:
            # downstream manifests recorded the fingerprint this one holds, which differs from the one computed
            # now if it was written before one of its config fields was marked operational
            self.effective[name] = Effective(
                name, manifest.get("fingerprint", decision.fingerprint), manifest.get("run_id"), manifest
            )


def _diff(old: Any, new: Any, prefix: str = "") -> str:
    """Short description of what changed between two JSON values: `lr 0.0003 -> 1e-05, ...`."""
    changes = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key, "<unset>"), b.get(key, "<unset>"), f"{path}.{key}" if path else key)
        elif a != b:
            changes.append(f"{path or 'value'} {_short(a)} -> {_short(b)}")

    walk(old, new, prefix)
    if len(changes) > 3:
        changes = changes[:3] + [f"and {len(changes) - 3} more"]
    return ", ".join(changes)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- selection ------------------------------------------------------------------------------------


def selection(recipe: Recipe, options: Options) -> tuple[list[str], dict[str, str]]:
    """(stages considered, in order; stage -> why it is forced to run)."""
    order = dag.topological_order(recipe)
    for flag, stage in (("--from", options.from_stage), ("--only", options.only)):
        if stage is not None and stage not in recipe.stages:
            raise InputError(flag, f"no stage named '{stage}'{did_you_mean(stage, list(recipe.stages))}")
    if options.only:
        selected = {options.only}
        forced = {options.only: "--only"}
    elif options.from_stage:
        heads = {options.from_stage} | dag.downstream(recipe, options.from_stage)
        selected = heads.union(*(dag.upstream(recipe, s) for s in heads))
        forced = {s: f"--from {options.from_stage}" for s in heads}
    else:
        selected, forced = set(order), {}
    if options.force:
        # what --from / --only name, or else every stage: the upstream stages --from brings along run only when
        # missing or stale (forcing them would retrain the teacher to re-run an export)
        forced = {s: "--force" for s in (forced or selected)}
    return [s for s in order if s in selected], forced


def plan(recipe: Recipe, store: Store, options: Options | None = None, deep: bool = True) -> list[Decision]:
    """The decision for every stage, in DAG order, without running or writing anything."""
    options = options or Options()
    selected, forced = selection(recipe, options)
    planner = Planner(recipe, store, deep=deep)
    decisions = []
    for name in dag.topological_order(recipe):
        decision = planner.decide(name, forced.get(name), options.force)
        planner.record(decision)
        if name in selected:
            decisions.append(decision)
    if options.only:
        _check_only_inputs(decisions[0])
    return decisions


def status(recipe: Recipe, store: Store) -> list[Decision]:
    """Each stage's state and why; reads files, never writes. The stage another process is running now
    shows as `running`, with its pid."""
    decisions = plan(recipe, store)
    holder = store.holder()
    for d in decisions:
        if holder and d.name == holder.get("stage"):
            d.state, d.reason = "running", f"by pid {holder['pid']} since {holder['stage_started']}"
    return decisions


def _check_only_inputs(decision: Decision) -> None:
    for f, e in decision.inputs.items():
        if e.pending:
            raise InputError(
                f"--only {decision.name}",
                f"input '{f}' (stage '{e.stage}') is not up to date ({e.pending}); run it first, or use --from",
            )


# -- running ----------------------------------------------------------------------------------------


class Processes:
    """This process's place among the ranks of an `accelerate launch` / `torchrun` job."""

    def __init__(self):
        self._dist = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # only multi-process runs pay for the imports
            import torch
            import torch.distributed as dist
            from accelerate import PartialState

            # the process group the stages' Accelerator will share (gloo when there is no GPU: accelerate
            # leaves CPU ranks unconnected unless asked)
            PartialState(cpu=not torch.cuda.is_available())
            self._dist = dist if dist.is_initialized() else None
        self.is_main = self._dist is None or self._dist.get_rank() == 0

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()


def run(
    recipe: Recipe, root: str | Path, options: Options | None = None, procs: "Processes | None" = None
) -> list[Outcome]:
    """Run what is missing or stale (and what `options` force); raise RunError / InputError on failure,
    RunStopped on SIGINT/SIGTERM. `procs`: the caller's view of the ranks, if it already made one.

    In an artifacts directory this process may not write, a run with nothing to do reports that and
    writes nothing (no lock: there is nothing to protect); one with work to do is bad input (exit 2)."""
    options = options or Options()
    store = Store(root, recipe.name)
    selected, forced = selection(recipe, options)
    if options.only:  # a missing input is bad input: refuse before the lock or run.log exist
        plan(recipe, store, options)
    procs = procs or Processes()
    with signals.owned():
        try:
            if not procs.is_main:
                return _run_stages(recipe, store, selected, forced, options, procs)
            try:
                with store.lock():
                    return _run_locked(recipe, store, selected, forced, options, procs)
            except NotWritable as e:
                return _run_stages(recipe, store, selected, forced, options, procs, read_only=str(e))
        except signals.Stopped as e:  # between stages: nothing was under way
            raise RunStopped(f"stopped by {signals.signal_name(e.signum)}", e.signum) from None


def _run_locked(recipe, store, selected, forced, options, procs) -> list[Outcome]:
    store.clean_trash()
    handler = logs.attach_run_log(store.run_log)
    try:
        log.info("%s: stages %s", recipe.source, ", ".join(selected))
        return _run_stages(recipe, store, selected, forced, options, procs)
    except (Exception, signals.Stopped):
        log.debug("run ended early", exc_info=True)
        raise
    finally:
        logs.detach(handler)


def _run_stages(recipe, store, selected, forced, options, procs, read_only: str | None = None) -> list[Outcome]:
    """`read_only`: why this process may not write the artifacts; then a stage that would write is bad input."""
    planner = Planner(recipe, store)
    outcomes = []
    for name in dag.topological_order(recipe):
        procs.barrier()  # every rank decides from the files the main rank finished writing
        decision = planner.decide(name, forced.get(name), options.force)
        if name not in selected:
            planner.record(decision)
            continue
        if options.only:
            _check_only_inputs(decision)
        stage_log = logging.getLogger(f"stages.{name}")
        if decision.warning:
            stage_log.warning(decision.warning)
        if decision.action == "skip":
            planner.record(decision)
            outcomes.append(Outcome(name, "up to date", None, headline(recipe, name, store.manifest(name))))
            continue
        existing = store.manifest(name) if decision.action == "gate" else None
        recorded_skip = (
            existing is not None
            and existing.get("status") == "skipped"
            and existing.get("fingerprint") == decision.fingerprint
        )
        if read_only and not recorded_skip:
            raise InputError("--artifacts", f"{read_only}, and stage '{name}' needs to run ({decision.reason})")
        if decision.action == "gate":
            stage_log.info("skipped: %s", decision.reason)
            if procs.is_main and not recorded_skip:
                store.prepare(name, decision.fingerprint, _attempt(recipe, decision))
                store.commit(
                    name, _manifest(recipe, decision, "skipped", now_iso(), now_iso(), 0.0, {}, reason=decision.reason)
                )
            planner.record(decision)
            outcomes.append(Outcome(name, "skipped", None, decision.reason))
            continue
        stage_log.info("running (%s)", decision.reason)
        manifest = _execute(recipe, store, decision, procs)
        planner.record(decision, manifest)
        outcomes.append(Outcome(name, "ran", manifest["wall_seconds"], headline(recipe, name, manifest)))
    if read_only:
        log.info("nothing to run; %s, so nothing was written", read_only)
    return outcomes


def _execute(recipe: Recipe, store: Store, decision: Decision, procs: Processes) -> dict:
    from pipeline.engine.checkpoint import Checkpointer, StageInterrupted  # torch: only when a stage runs

    name = decision.name
    config, module = recipe.stages[name], recipe.modules[name]
    if procs.is_main:
        store.mark_running(name)
        store.prepare(name, decision.fingerprint, _attempt(recipe, decision))
    procs.barrier()
    checkpointer = Checkpointer(store.checkpoints_dir(name), every=getattr(config, "checkpoint_every", 0))
    ctx = StageContext(
        name=name,
        config=config,
        recipe=recipe,
        out_dir=store.out_dir(name),
        inputs={
            f: path
            for f, e in decision.inputs.items()
            if f != "when" and (path := _input_dir(recipe, store, e)) is not None
        },
        input_manifests={f: e.manifest for f, e in decision.inputs.items() if f != "when"},
        checkpointer=checkpointer,
        log=logging.getLogger(f"stages.{name}"),
    )
    seed_everything(recipe.seed)
    _reset_peak_gpu()
    started, t0 = now_iso(), time.monotonic()
    with signals.stage():
        try:
            metrics = {**_metrics(module.run(ctx)), **_peak_gpu()}
        except (StageInterrupted, signals.Stopped) as e:
            signum = e.signum if isinstance(e, signals.Stopped) else signals.requested()
            step = store.resume_step(name, decision.fingerprint)
            ctx.log.debug("stopped after %.1fs", time.monotonic() - t0, exc_info=True)
            raise RunStopped(
                f"stages.{name}: stopped by {signals.signal_name(signum)}; re-run to "
                + (f"resume from step {step}" if step is not None else "start it again"),
                signum,
            ) from None
        except Exception as e:
            raise _failure(recipe, store, decision, procs, ctx, e, started, time.monotonic() - t0) from e
        wall = time.monotonic() - t0
        with signals.stop_at_safe_points():  # a signal now waits for the commit: the stage's work is done
            procs.barrier()
            manifest = _manifest(recipe, decision, "complete", started, now_iso(), wall, metrics)
            if procs.is_main:
                manifest = store.commit(name, manifest)
                store.mark_running(None)
            ctx.log.info("done in %.1fs %s", wall, _format_metrics(metrics))
        if signals.requested() is not None:
            raise RunStopped(
                f"stages.{name}: completed, then stopped by {signals.signal_name(signals.requested())} "
                "as asked; re-run to continue",
                signals.requested(),
            )
    return manifest


def _failure(recipe, store, decision, procs, ctx, error: Exception, started: str, wall: float) -> Exception:
    """Record a failed attempt (the main rank) and make the one-line error to raise."""
    ctx.log.debug("failed after %.1fs", wall, exc_info=True)
    message = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
    if procs.is_main:
        store.record_failure(
            decision.name, _manifest(recipe, decision, "failed", started, now_iso(), wall, {}, error=message)
        )
    if isinstance(error, InputError):
        return InputError(f"stages.{decision.name}", str(error))
    where = f" (traceback in {store.run_log})" if procs.is_main else ""
    return StageFailed(f"stages.{decision.name}: failed: {message}{where}")


def _input_dir(recipe: Recipe, store: Store, e: Effective) -> Path | None:
    if e.stage == BASE_MODEL_REF:
        # a model built from `arch` has no directory: the stage builds it from recipe.model.arch
        return Path(recipe.model.path) if recipe.model.path else None
    return store.stage_dir(e.stage)


def _attempt(recipe, decision: Decision) -> dict:
    """What a stage is run with: what its fingerprint hashes (the config in full), and where its inputs come from."""
    config = recipe.stages[decision.name]
    module = recipe.modules[decision.name]
    return {
        "name": decision.name,
        "type": config.type,
        "fingerprint": decision.fingerprint,
        "config": config.model_dump(mode="json"),
        "sections": {s: recipe.section(s) for s in module.USES},
        "inputs": {f: e.fingerprint for f, e in decision.inputs.items()},
        "input_stages": {f: e.stage for f, e in decision.inputs.items()},
        "input_runs": {f: e.run_id for f, e in decision.inputs.items()},
        "code_version": module.CODE_VERSION,
    }


def _manifest(recipe, decision: Decision, status_, started, ended, wall, metrics, **extra) -> dict:
    return {
        **_attempt(recipe, decision),
        "status": status_,
        "run_id": uuid.uuid4().hex,
        "started": started,
        "ended": ended,
        "wall_seconds": round(wall, 3),
        "metrics": metrics,
        **extra,
    }


def _metrics(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"run() returned {type(value).__name__}; it must return a dict of metrics")
    out = {}
    for key, metric in value.items():
        try:
            out[str(key)] = float(metric)
        except (TypeError, ValueError):
            raise TypeError(f"run() returned metric {key!r} = {metric!r}, which is not a number") from None
    return out


def _cuda():
    """torch.cuda once a stage has used the GPU in this process, else None; never imports torch itself (the engine
    loads no ML library)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_initialized() else None


def _reset_peak_gpu() -> None:
    # an earlier stage's peak would hide this one's; before any stage has used the GPU, the peak starts at 0 anyway
    if (cuda := _cuda()) is not None:
        cuda.reset_peak_memory_stats()


def _peak_gpu() -> dict[str, float]:
    """`peak_gpu_gib`: the most GPU memory this process's tensors held during the stage (torch's allocator), where
    the stage used a GPU."""
    cuda = _cuda()
    return {} if cuda is None else {"peak_gpu_gib": round(cuda.max_memory_allocated() / 2**30, 3)}


def headline(recipe: Recipe, name: str, manifest: dict | None) -> str:
    """The stage type's HEADLINE metric (a name, or names to try in order) for the run summary."""
    keys = getattr(recipe.modules[name], "HEADLINE", None) or ()
    metrics = (manifest or {}).get("metrics", {})
    key = next((k for k in ((keys,) if isinstance(keys, str) else keys) if k in metrics), None)
    return "" if key is None else f"{key} {logs.format_number(metrics[key])}"


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={logs.format_number(v)}" for k, v in metrics.items())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the engine
        pass
    else:
        np.random.seed(seed)
    import torch

    torch.manual_seed(seed)
