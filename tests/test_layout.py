"""The package's layout is its architecture (docs/architecture.md): every import points down
the layers, no two packages import each other, and everything outside the Ray edge and the
command line imports and runs with Ray made unimportable. The sets are derived from the
folders, so a module added anywhere is checked without editing this file.

``python tests/test_layout.py`` prints which package imports which."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ntf_ray"

#: Lowest first. A module may import from its own package and from any package of a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "untrusted_text"),  # names and text, no I/O
    ("storage",),  # local paths and object stores, credentials kept out of what is written
    ("images", "synth"),  # decoding, screens, image operations; procedural test data
    ("nn",),  # the network, its losses, variants, distributed helpers
    ("detector",),  # an artifact, scoring with it, calibration, explanations, its card
    ("evaluate",),  # the paper's metrics, tables, figures, report
    ("training",),  # config, per-epoch loops, manifests, one-process recipe, device batches
    ("scan",),  # the scan without Ray: spec, listing, reading, table, lock, moderator's page
    ("ray_edge",),  # Ray Train, Ray Data, local Ray, console
    ("cli",),  # parsers that call everything above
    ("__main__",),  # python -m ntf_ray
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
EDGE = ("ray_edge", "cli", "__main__")


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def package_of(dotted: str) -> str | None:
    """The top-level entry of ``ntf_ray`` a module belongs to (None for ``ntf_ray`` itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def imported(name: str, path: Path) -> set[str]:
    """The ``ntf_ray`` modules a module imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.update(f"{target}.{alias.name}" for alias in node.names)
            out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {t for t in out if t == "ntf_ray" or t.startswith("ntf_ray.")}


def package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the modules where it happens."""
    found = modules()
    edges = defaultdict(list)
    for name, path in found.items():
        source = package_of(name)
        for target in imported(name, path):
            if target not in found:  # a name imported from a module: the module is in the set too
                continue
            dest = package_of(target)
            if source and dest and dest != source:
                edges[(source, dest)].append(name)
    return dict(edges)


def test_every_entry_of_the_package_has_a_layer():
    entries = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())) and p.stem != "__init__"}
    assert entries - set(RANK) == set(), "add the new entry to LAYERS (and docs/architecture.md)"
    assert len(entries - {"__main__"}) <= 12, sorted(entries)


def test_imports_point_down_the_layers_and_no_packages_import_each_other():
    edges = package_imports()
    upward = {edge: where for edge, where in edges.items() if RANK[edge[1]] >= RANK[edge[0]]}
    assert upward == {}, f"imports upward or sideways: {upward}"
    cycles = [(a, b) for (a, b) in edges if (b, a) in edges]
    assert cycles == []


def test_the_layer_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: an images module importing the scan is reported."""
    fake = tmp_path / "ntf_ray"
    (fake / "images").mkdir(parents=True)
    (fake / "scan").mkdir()
    for folder in (fake, fake / "images", fake / "scan"):
        (folder / "__init__.py").write_text("")
    (fake / "scan" / "table.py").write_text("X = 1\n")
    (fake / "images" / "decode.py").write_text("def f():\n    from ntf_ray.scan.table import X\n    return X\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert package_imports() == {("images", "scan"): ["ntf_ray.images.decode"]}


def core_modules() -> list[str]:
    return [name for name in modules() if package_of(name) not in EDGE]


def test_the_core_imports_and_scores_without_ray():
    core = core_modules()
    assert "ntf_ray.scan.table" in core and "ntf_ray.images.batch_ops" in core  # derived, not listed by hand
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import importlib\n"
        f"for name in {core!r}:\n"
        "    importlib.import_module(name)\n"
        "assert sys.modules['ray'] is None\n"
        "from ntf_ray.nn.model import Detector; from ntf_ray.detector.scorer import Scorer\n"
        "import torch\n"
        "s = Scorer(Detector.build('tiny'), input_size=32, device='cpu')\n"
        "print('ok', s.score_tensors(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "ok (1,)"


if __name__ == "__main__":
    for (source, dest), where in sorted(package_imports().items(), key=lambda e: (RANK[e[0][0]], e[0])):
        print(f"{source:>14} -> {dest:<14} {len(where):3d} module(s), e.g. {where[0]}")


def test_score_and_report_run_with_ray_unimportable(tmp_path):
    """The two commands a reviewer runs on a laptop need no Ray: its import is made to fail."""
    import datetime as dt
    import json as json_module
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from ntf_ray.scan.table import FILE_SCHEMA
    from ntf_ray.storage.local import local_etag

    from .conftest import save_random_detector

    model = save_random_detector(str(tmp_path / "model"))
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    st = os.stat(image)
    run = tmp_path / "scores" / "dt=2026-12-05" / "run_id=r1"
    run.mkdir(parents=True)
    row = {"uri": str(image), "etag": local_etag(st), "size_bytes": st.st_size, "last_modified": None, "score": 0.9,
           "is_fake": True, "threshold": 0.5, "width": 32, "height": 32, "format": "PNG", "error": None,
           "model_id": "m", "scanned_at": dt.datetime.now(dt.timezone.utc), "decoder": "pil"}
    pq.write_table(pa.Table.from_pylist([row], schema=FILE_SCHEMA), run / "scores.parquet")
    (run / "_summary.json").write_text(json_module.dumps({"listed": 1}))
    (run / "_SUCCESS").write_text("")
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from ntf_ray.cli import main\n"
        f"assert main(['score', '--model', {model!r}, {str(image)!r}]) == 0\n"
        f"assert main(['report', '--scores', {str(tmp_path / 'scores')!r}, '--output', {str(tmp_path / 'page')!r},"
        f" '--model', {model!r}]) == 0\n"
        "assert sys.modules['ray'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"score"' in out.stdout and "report of run r1: 1 images" in out.stdout
    assert (tmp_path / "page" / "index.html").is_file()
