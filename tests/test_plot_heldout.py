"""scripts/plot_heldout.py reads the held-out lines kd_qat logs (as a GPU run printed them), whatever
else the log holds."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = """stages.kd_qat_rtn: running (never run)
Loading weights: 100%|##########| 47/47 [00:00<00:00, 3136.95it/s]
stages.kd_qat_rtn: kd_qat_rtn: step 100: held-out accuracy 53.5%
stages.kd_qat_rtn: kd_qat_rtn: step 200: held-out accuracy 63.0%
stages.kd_qat_rtn: done in 81.2s final_loss=0.0003244 steps=300
"""


def test_curves_come_from_the_held_out_lines(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_heldout", ROOT / "scripts" / "plot_heldout.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "a.log").write_text(LOG)
    (tmp_path / "b.log").write_text("stages.kd_qat: kd_qat: step 300: held-out accuracy 81.5%\n")
    curves = script.read_curves([tmp_path / "a.log", tmp_path / "b.log"])
    assert curves == {"kd_qat_rtn": [(100, 0.535), (200, 0.63)], "kd_qat": [(300, 0.815)]}
