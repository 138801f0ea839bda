"""Where the embedded default model's files live: the one place that knows the asset paths."""
from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded"   # HF SiglipModel folder
EMBEDDED_CALIBRATION = EMBEDDED_DIR / "calibration.json"                        # `calibrate` run on its val split
EMBEDDED_RETRIEVAL_CALIBRATION = EMBEDDED_DIR / "calibration_retrieval.json"    # `calibrate --task retrieval`, val
EMBEDDED_RESULTS = EMBEDDED_DIR / "results_test.json"                           # `eval` on test, shipped calibration
