"""The stage reference: generated from the schemas, complete, and the same as docs/stages.md."""

from __future__ import annotations

from pathlib import Path

import stages
from pipeline.engine import reference
from pipeline.engine.recipe import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def test_docs_stages_md_is_the_generated_reference():
    # out of date after a schema change: reasoning-qat stages --markdown > docs/stages.md
    assert (ROOT / "docs" / "stages.md").read_text() == reference.markdown()


def test_every_key_of_every_schema_is_documented():
    text = reference.markdown()
    assert reference.UNDOCUMENTED not in text
    for stage_type in stages.STAGE_TYPES:
        for name in stages.stage_module(stage_type).Config.model_fields:
            assert f"- `{name}` (" in reference.stage_section(stage_type)
    for key in SECTIONS:
        assert f"## {key}\n" in text


def test_stages_lists_each_type_on_one_line(run_cli):
    code, out, err = run_cli("stages")
    assert code == 0 and err == ""
    assert [line.split()[0] for line in out.splitlines()] == list(stages.STAGE_TYPES)


def test_stages_type_prints_its_keys_nested_ones_and_the_sections_it_reads(run_cli):
    code, out, _ = run_cli("stages", "eval")
    assert code == 0 and out.startswith("## eval\n")
    assert "- `model` (stage writing a full-precision model or a quantized model; required): " in out
    assert "- `generation.temperature` (float, >= 0; default `0.0`): 0 = greedy decoding" in out
    code, out, _ = run_cli("stages", "ptq")  # ptq reads `quant`: its keys follow, nested ones included
    assert code == 0 and "- `nsamples` (int, > 0; default `128`): Calibration sequences." in out
    assert "## quant\n" in out and "- `quant.weights.group_size` (int or null, > 0; default `128`)" in out
    assert "`w4a4kv4`" in out  # the presets come from PRESETS
    code, out, _ = run_cli("stages", "data")
    assert code == 0 and out.startswith("## data\n") and "- `data.testbed.max_steps` (" in out


def test_unknown_type_is_one_line_naming_the_known_ones(run_cli):
    code, out, err = run_cli("stages", "qat")
    assert code == 2 and out == ""
    assert err.strip() == (
        "TYPE: unknown stage type 'qat'; known: sft, traces, ptq, kd_qat, gate, rl, export, eval, model, quant, data"
    )


def test_markdown_flag_prints_the_file(run_cli):
    code, out, _ = run_cli("stages", "--markdown")
    assert code == 0 and out == (ROOT / "docs" / "stages.md").read_text()
