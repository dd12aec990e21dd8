"""The core must import and run with Ray made unimportable."""

from __future__ import annotations

import subprocess
import sys

CORE = ["config", "storage", "formats", "decode", "transforms", "datasets", "model", "losses", "dist",
        "engine", "artifact", "scoring", "metrics", "synth", "recipe", "variants", "evaluate", "errors", "jpeg_screen",
        "jpeg_decode", "decode_limits", "decode_pixels",
        "evaluate.tables", "evaluate.figures", "evaluate.report", "score_files"]


def test_core_imports_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import importlib\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module('ntf_ray.' + name)\n"
        "assert sys.modules['ray'] is None\n"
        "from ntf_ray.model import Detector; from ntf_ray.scoring import Scorer\n"
        "import torch\n"
        "s = Scorer(Detector.build('tiny'), input_size=32, device='cpu')\n"
        "print('ok', s.score_tensors(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok (1,)"
