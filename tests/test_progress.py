"""pipeline.engine.progress: a piped run prints progress lines (step/total, loss, tokens/s, ETA) at the interval the
environment sets, one at the end, none on other ranks; counts print as integers."""

import logging
import re


from pipeline.engine.logs import format_number
from pipeline.engine.progress import duration, progress

SFT = {"type": "sft", "steps": 3, "batch_size": 4, "warmup_steps": 1}
DATA = {"testbed": {"train_size": 24, "test_size": 4}}


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.engine.progress"]


def test_lines_at_every_advance_with_eta_and_a_closing_line(monkeypatch, caplog):
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO, logger="pipeline.engine.progress"), progress("x", total=4, done=1) as bar:
        for _ in range(3):
            bar.advance(1, tokens=100, loss="0.5000")
    lines = _lines(caplog)
    assert len(lines) == 3 and lines[0].startswith("x: step 2/4, loss 0.5000, ") and "tokens/s" in lines[0]
    assert "ETA" in lines[0] and lines[-1].startswith("x: step 4/4, ") and "ETA" not in lines[-1]


def test_the_interval_holds_lines_back_but_not_the_last(monkeypatch, caplog):
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "3600")
    with (
        caplog.at_level(logging.INFO, logger="pipeline.engine.progress"),
        progress("x", total=50, unit="layers") as bar,
    ):
        for _ in range(50):
            bar.advance(1)
    assert _lines(caplog) == [_lines(caplog)[0]] and _lines(caplog)[0].startswith("x: layers 50/50, ")


def test_other_ranks_print_nothing(monkeypatch, caplog):
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "0")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="pipeline.engine.progress"), progress("x", total=2) as bar:
        bar.advance(2)
    assert _lines(caplog) == [] and bar.done == 2


def test_a_nested_bar_prints_no_closing_line(monkeypatch, caplog):
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "3600")
    with caplog.at_level(logging.INFO, logger="pipeline.engine.progress"), progress("train", total=1) as outer:
        with progress("generate", total=5, unit="sequences") as inner:
            inner.advance(5)
        outer.advance(1)
    assert [line.split(",")[0] for line in _lines(caplog)] == ["train: step 1/1"]


def test_durations_and_numbers():
    assert [duration(s) for s in (4.2, 65, 3725)] == ["4s", "1m05s", "1h02m05s"]
    assert [format_number(v) for v in (20000.0, 435329.0, 12345.6, 6.0781, 3e-4)] == [
        "20,000",
        "435,329",
        "12,346",
        "6.078",
        "0.0003",
    ]
    assert format_number(float("nan")) == "nan"


def test_a_piped_training_run_prints_step_loss_and_eta(write_recipe, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("REASONING_QAT_PROGRESS_EVERY", "0")
    recipe = write_recipe({"teacher": SFT}, data=DATA)
    code, out, err = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert code == 0, err
    steps = re.findall(
        r"^progress: teacher: sft: step (\d)/3, loss \d+\.\d{4}, [\d,]+ tokens/s, \d+s elapsed(.*)$", err, re.MULTILINE
    )
    assert [s for s, _ in steps] == ["1", "2", "3"] and steps[0][1].startswith(", ETA ") and steps[-1][1] == ""
    assert re.search(r"teacher: done in .* examples=24 .*parameters=[\d,]+\b", err) and "e+0" not in err + out


def test_tensorboard_tracker_holds_the_loss_of_every_step(write_recipe, tmp_path, run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe({"teacher": {**SFT, "report_to": ["tensorboard"]}}, data=DATA)
    code, _, err = run_cli("run", recipe, "--artifacts", tmp_path / "art")
    assert code == 0, err
    runs = list((tmp_path / "art" / "t" / "teacher" / "tensorboard").glob("*/events.out.tfevents.*"))
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3] and "lr" in events.Tags()["scalars"]
    # an operational key: turning it off leaves the stage up to date
    code, out, _ = run_cli(
        "status", write_recipe({"teacher": SFT}, data=DATA), "--artifacts", tmp_path / "art", "--json"
    )
    assert '"state": "complete"' in out


def test_a_tracker_not_installed_is_one_line_at_validation(write_recipe, run_cli, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, _, err = run_cli("validate", write_recipe({"teacher": {**SFT, "report_to": ["wandb"]}}, data=DATA))
    assert code == 2 and err.strip() == (
        "stages.teacher.report_to: wandb is not installed (pip install wandb, or 'reasoning-qat[trackers]')"
    )
