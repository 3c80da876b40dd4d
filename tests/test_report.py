"""The report's plots: which figures a set of stages gets."""

from pipeline.report import plot


def rows(*stages):
    return [{"stage": name, "type": kind, "state": "complete", "of": None, "metrics": {}} for name, kind in stages]


def test_rl_curves_get_their_own_figure_and_stay_out_of_the_loss_plot(tmp_path):
    rl = [
        {"step": s, "loss": -0.01 * s, "accuracy": 0.5 + 0.1 * s, "entropy": 0.3, "completion_length": 40}
        for s in range(1, 4)
    ]
    written = plot(tmp_path, rows(("rl", "rl"), ("rl_noaqn", "rl")), {"rl": rl, "rl_noaqn": rl}, None)
    assert written == ["rl.png"]  # GRPO's negative losses would break the log-scale loss plot
    assert (tmp_path / "rl.png").stat().st_size > 0

    kd = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)] + [{"step": 3, "loss": 0.3, "eval_accuracy": 0.9}]
    written = plot(tmp_path, rows(("kd_qat", "kd_qat"), ("rl", "rl")), {"kd_qat": kd, "rl": rl}, None)
    assert written == ["training.png", "eval_accuracy.png", "rl.png"]


def test_default_baseline_is_an_eval_of_the_base_model_that_measures_accuracy():
    from types import SimpleNamespace

    from pipeline.report import default_baseline

    def evals(**generate):
        return SimpleNamespace(
            stages={name: SimpleNamespace(type="eval", model="model", generate=g) for name, g in generate.items()}
        )

    assert default_baseline(evals(teacher_ppl=False, teacher_acc=True)) == "teacher_acc"
    assert default_baseline(evals(teacher_ppl=False)) is None  # perplexity only: no retention column, no error


def test_cross_entropy_and_kl_curves_get_separate_axes_and_rl_accuracy_is_named_rollout():
    from types import SimpleNamespace

    from pipeline.report import _column, _loss_kind, _training_figure

    sft = SimpleNamespace(type="kd_qat", objective="sft", loss="forward_kl")
    kd = SimpleNamespace(type="kd_qat", objective="kd", loss="reverse_kl")
    assert (_loss_kind(sft), _loss_kind(kd), _loss_kind(SimpleNamespace(type="eval"))) == (
        "cross-entropy",
        "reverse KL",
        None,
    )
    points = [{"step": s, "loss": 1.0 / s} for s in range(1, 4)]
    fig = _training_figure({"sft_qat": points, "kd": points}, {"sft_qat": "cross-entropy", "kd": "reverse KL"})
    assert [ax.get_ylabel() for ax in fig.axes] == ["cross-entropy", "reverse KL"]
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [["sft_qat"], ["kd"]]
    assert (_column("rl", "accuracy"), _column("eval", "accuracy")) == ("rollout_accuracy", "accuracy")


def test_report_part_way_names_the_baseline_that_has_not_run_and_refuses_one_without_accuracy(tmp_path, run_cli):
    """Before the teacher's eval has run, `report` shows what has (no retention, saying why, exit 0) and blames
    --baseline only when the user named it: one that has not run, or a perplexity-only eval, exit 2."""
    import json
    from pathlib import Path

    import yaml

    import tiny_lm
    from pipeline.models import save_model

    save_model(tiny_lm.model(), tiny_lm.tokenizer(), tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    ppl = {"type": "eval", "model": "model", "bench": "gsm8k", "limit": 2, "generate": False, "perplexity": True}
    teacher = {"type": "eval", "model": "model", "limit": 1, "generation": {"max_new_tokens": 2}}
    data = {"benchmarks_dir": str(Path(__file__).parent / "data")}
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "model": {"path": str(tmp_path / "model")},
                "data": data,
                "stages": {"teacher": teacher, "ppl": ppl},
            },
            sort_keys=False,
        )
    )
    art = tmp_path / "art"
    assert run_cli("run", recipe, "--artifacts", art, "--only", "ppl")[0] == 0

    code, stdout, stderr = run_cli("report", recipe, "--artifacts", art)
    assert code == 0 and "perplexity" in stdout
    assert stderr == "no retention: the baseline 'teacher' has not measured an accuracy yet (pending)\n"
    assert "No retention: the baseline 'teacher' has not measured" in (art / "r" / "report" / "report.md").read_text()
    rows = json.loads((art / "r" / "report" / "report.json").read_text())["stages"]
    assert [(r["stage"], r["state"]) for r in rows] == [("teacher", "pending"), ("ppl", "complete")]

    code, stdout, stderr = run_cli("report", recipe, "--artifacts", art, "--baseline", "teacher")
    assert (code, stdout, stderr) == (2, "", "--baseline: stage 'teacher' has not measured an accuracy yet (pending)\n")
    code, stdout, stderr = run_cli("report", recipe, "--artifacts", art, "--baseline", "ppl")
    assert (code, stdout) == (2, "")
    assert stderr == "--baseline: stage 'ppl' measures perplexity only (generate: false), no accuracy to compare with\n"
