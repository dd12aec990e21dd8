"""Evaluation: CLI item parsing, the metric tables against scikit-learn computed here
independently, error rows, perturbation levels, figures, and the report on disk and on S3."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix

from ntf_ray import storage
from ntf_ray.evaluate import (
    PERTURBATIONS,
    compute_metrics,
    format_summary,
    parse_families,
    parse_perturbations,
    robustness_curves,
    safe_name,
    to_json,
    tsne,
    write_report,
)
from ntf_ray.evaluate.metrics import format_table
from ntf_ray.storage import StorageOptions

SCHEMA = pa.schema([("uri", pa.string()), ("label", pa.int8()), ("generator", pa.string()), ("family", pa.string()),
                    ("perturbation", pa.string()), ("level", pa.float64()), ("score", pa.float32()),
                    ("error", pa.string())])
GENERATORS = {"progan": ("gan", 36), "stylegan 2/ffhq": ("gan", 20), "ldm": ("dm", 28)}
LEVELS = {"blur": [0.0, 1.0, 3.0], "jpeg": [100.0, 50.0]}
THRESHOLD = 0.5


def _table(seed: int = 0, error_rate: float = 0.06) -> pa.Table:
    """Every image clean and at every level; fakes score higher, more so for mild levels;
    a few rows failed (score null, error set) or scored NaN-free but flagged with an error."""
    rng = np.random.default_rng(seed)
    rows = []
    for gen, (family, n) in GENERATORS.items():
        for i in range(n):
            label = int(i % 3 != 0)
            for kind, levels in [("none", [None]), *LEVELS.items()]:
                for level in levels:
                    harm = 0.0 if level is None else (level / 10 if kind == "blur" else (100 - level) / 200)
                    score = float(np.clip(rng.normal(0.3 + (0.35 - harm) * label, 0.2), 0, 1))
                    error = None
                    if rng.random() < error_rate:
                        score, error = None, "decode: truncated file"
                    rows.append({"uri": f"s3://data/{gen}/{i}.png", "label": label, "generator": gen, "family": family,
                                 "perturbation": kind, "level": level, "score": score, "error": error})
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _sk_row(y: np.ndarray, s: np.ndarray, t: float) -> dict:
    """One generator's metrics, independently: scikit-learn's AP and confusion matrix."""
    pred = (s >= t).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"images": len(y), "n_real": int(tn + fp), "n_fake": int(tp + fn),
            "ap": float(average_precision_score(y, s)) if tp + fn else math.nan,
            "acc": (tn + tp) / len(y), "fpr": fp / (tn + fp) if tn + fp else math.nan,
            "fnr": fn / (tp + fn) if tp + fn else math.nan}


def _expected(table: pa.Table, kind: str, level: float | None, t: float = THRESHOLD) -> dict[str, dict]:
    """generator -> sklearn row over the scored rows of one (kind, level)."""
    d = table.to_pylist()
    pick = [r for r in d if r["perturbation"] == kind and r["level"] == level and r["error"] is None]
    out = {}
    for gen in sorted({r["generator"] for r in pick}):
        rr = [r for r in pick if r["generator"] == gen]
        out[gen] = _sk_row(np.array([r["label"] for r in rr]), np.array([r["score"] for r in rr], np.float64), t)
    return out


def _assert_table(rows: list[dict], want: dict[str, dict]) -> None:
    assert [r["generator"] for r in rows] == sorted(want) + ["average"]
    for row in rows[:-1]:
        w = want[row["generator"]]
        assert (row["images"], row["n_real"], row["n_fake"]) == (w["images"], w["n_real"], w["n_fake"])
        for key in ("ap", "acc", "fpr", "fnr"):
            assert row[key] == pytest.approx(w[key], abs=1e-12), (row["generator"], key)
    images = np.array([w["images"] for w in want.values()], float)
    for key in ("ap", "acc", "fpr", "fnr"):  # both classes everywhere: all defined
        values = np.array([w[key] for w in want.values()])
        assert rows[-1][key] == pytest.approx(float(values @ images / images.sum()), abs=1e-12), key
    assert rows[-1]["map"] == pytest.approx(np.mean([w["ap"] for w in want.values()]), abs=1e-12)


# ---------------------------------------------------------------------------------------
# parsing


def test_parse_perturbations_keeps_order_and_values():
    got = parse_perturbations(["blur=0,1,2,3", "jpeg=100,75,50,30", "noise=0,0.01,0.02", "scale=1,0.5,0.25"])
    assert got == {"blur": [0, 1, 2, 3], "jpeg": [100, 75, 50, 30], "noise": [0, 0.01, 0.02], "scale": [1, 0.5, 0.25]}
    assert list(got) == ["blur", "jpeg", "noise", "scale"]
    assert parse_perturbations(["scale= 0.25, 1", " jpeg=1"]) == {"scale": [0.25, 1.0], "jpeg": [1.0]}
    assert parse_perturbations([]) == {}


@pytest.mark.parametrize("items, match", [
    (["gamma=1,2"], "blur, jpeg, noise, scale"),
    (["downscale=0.5"], "unknown perturbation kind 'downscale'"),
    (["blur"], "KIND=LEVEL"),
    (["blur="], "no levels"),
    (["blur=1,,2"], "empty level"),
    (["blur=1,two"], "'two' is not a number"),
    (["blur=-1"], "out of range"),
    (["blur=inf"], "out of range"),
    (["blur=nan"], "out of range"),
    (["jpeg=0"], "1..100"),
    (["jpeg=101"], "1..100"),
    (["jpeg=75.5"], "integer"),
    (["noise=1.5"], r"\[0, 1\]"),
    (["noise=-0.01"], "out of range"),
    (["scale=0"], r"\(0, 1\]"),
    (["scale=1.5"], r"\(0, 1\]"),
    (["blur=1", "jpeg=90", "blur=2"], "'blur' given twice"),
    (["blur=1,2,1"], "repeats a level"),
])
def test_parse_perturbations_errors(items, match):
    with pytest.raises(ValueError, match=match):
        parse_perturbations(items)


def test_parse_families():
    got = parse_families(["gan=progan,stylegan", "dm=ddpm, ldm", "gan=biggan", "gan=progan"])
    assert got == {"progan": "gan", "stylegan": "gan", "ddpm": "dm", "ldm": "dm", "biggan": "gan"}
    for bad, match in [(["gan=progan", "dm=progan"], "'progan' is in two families, 'gan' and 'dm'"),
                       (["gan"], "FAMILY=GENERATOR"), (["=progan"], "FAMILY=GENERATOR"),
                       (["gan="], "FAMILY=GENERATOR"), (["gan=a,,b"], "FAMILY=GENERATOR")]:
        with pytest.raises(ValueError, match=match):
            parse_families(bad)


# ---------------------------------------------------------------------------------------
# compute_metrics


def test_clean_table_matches_sklearn_and_errors_are_excluded():
    table = _table()
    result = compute_metrics(table, threshold=THRESHOLD)
    _assert_table(result["clean"]["table"], _expected(table, "none", None))

    d = table.to_pylist()
    failed = [r for r in d if r["error"] is not None]
    assert result["rows"] == len(d) and result["errors"] == len(failed) > 0
    clean_failed = [r["generator"] for r in failed if r["perturbation"] == "none"]
    assert result["clean"]["errors"]["total"] == len(clean_failed) > 0
    assert result["clean"]["errors"]["by_generator"] == {g: clean_failed.count(g) for g in sorted(set(clean_failed))}
    # every generator's image count is its clean rows minus its failed ones
    for row in result["clean"]["table"][:-1]:
        n = sum(r["perturbation"] == "none" and r["generator"] == row["generator"] for r in d)
        assert row["images"] == n - clean_failed.count(row["generator"])


def test_error_column_alone_marks_a_row_failed_and_nan_scores_fail():
    rows = [("a", 0, "g", 0.1, None), ("b", 1, "g", 0.9, None), ("c", 1, "g", 0.2, "late"), ("d", 0, "h", math.nan, None)]
    table = pa.Table.from_pylist([{"uri": u, "label": y, "generator": g, "family": None, "perturbation": "none",
                                   "level": None, "score": s, "error": e} for u, y, g, s, e in rows], schema=SCHEMA)
    result = compute_metrics(table, threshold=0.5)
    g, average = result["clean"]["table"]
    assert (g["images"], g["ap"], g["acc"]) == (2, 1.0, 1.0)  # the flagged fake at 0.2 is not counted
    assert result["clean"]["errors"] == {"total": 2, "by_generator": {"g": 1, "h": 1}}
    assert result["errors"] == 2 and result["families"] == {} and result["clean"]["families"] == []


def test_perturbation_tables_per_level_and_robustness_summary():
    table = _table(seed=1)
    result = compute_metrics(table, threshold=0.4)
    assert list(result["perturbations"]) == ["blur", "jpeg"]
    # mild to strong: blur sigma rising, JPEG quality falling
    assert [s["level"] for s in result["perturbations"]["blur"]] == [0.0, 1.0, 3.0]
    assert [s["level"] for s in result["perturbations"]["jpeg"]] == [100.0, 50.0]
    d = table.to_pylist()
    for kind, sections in result["perturbations"].items():
        for section, summary in zip(sections, result["robustness"][kind], strict=True):
            _assert_table(section["table"], _expected(table, kind, section["level"], t=0.4))
            failed = [r for r in d if r["perturbation"] == kind and r["level"] == section["level"] and r["error"]]
            assert section["errors"]["total"] == len(failed)
            average = section["table"][-1]
            assert summary == {"level": section["level"], "images": average["images"], "ap": average["ap"],
                               "acc": average["acc"], "map": average["map"]}
    blur = result["robustness"]["blur"]
    assert blur[0]["ap"] > blur[-1]["ap"] + 0.05  # sigma 3 really hurts this synthetic detector


def test_family_averages_are_image_weighted():
    table = _table(seed=2)
    want = _expected(table, "none", None)
    from_column = {"progan": "gan", "stylegan 2/ffhq": "gan", "ldm": "dm"}
    # no argument: the table's family column; an argument wins, and "stylegan 2/ffhq" then has no family
    for families, mapping in [(None, from_column), ({"progan": "A", "ldm": "A"}, {"progan": "A", "ldm": "A"})]:
        result = compute_metrics(table, threshold=THRESHOLD, families=families)
        assert result["families"] == mapping
        rows = result["clean"]["families"]
        assert [r["family"] for r in rows] == sorted(set(mapping.values()))
        for row in rows:
            members = sorted(g for g, f in mapping.items() if f == row["family"])
            assert row["generators"] == members
            w = np.array([want[g]["images"] for g in members], float)
            assert row["images"] == int(w.sum())
            for key in ("ap", "acc", "fpr", "fnr"):
                v = np.array([want[g][key] for g in members])
                assert row[key] == pytest.approx(float(v @ w / w.sum()), abs=1e-12), (row["family"], key)
            assert row["map"] == pytest.approx(np.mean([want[g]["ap"] for g in members]), abs=1e-12)
        for sections in result["perturbations"].values():  # every level gets its family rows too
            assert all([r["family"] for r in s["families"]] == [r["family"] for r in rows] for s in sections)


def test_single_class_generator_leaks_no_warning():
    table = pa.Table.from_pylist([
        {"uri": str(i), "label": i % 2 if g == "mixed" else 0, "generator": g, "family": None, "perturbation": "none",
         "level": None, "score": i / 10, "error": None} for g in ("mixed", "reals") for i in range(10)], schema=SCHEMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(table, threshold=0.5)
    reals = result["clean"]["table"][1]
    assert reals["generator"] == "reals" and math.isnan(reals["ap"]) and reals["fpr"] == pytest.approx(0.5)
    assert json.loads(to_json(result))["clean"]["table"][1]["ap"] is None


@pytest.mark.parametrize("change, match", [
    (lambda t: t.drop_columns(["score"]), "lacks column"),
    (lambda t: t.set_column(4, "perturbation", pa.array(["gamma"] * t.num_rows)), "unknown perturbation"),
    (lambda t: t.set_column(5, "level", pa.nulls(t.num_rows, pa.float64())), "without a level"),
    (lambda t: t.set_column(1, "label", pa.array([2] * t.num_rows, pa.int8())), "0 \\(real\\) or 1"),
    (lambda t: t.set_column(3, "family", pa.array(["x", "y"] * (t.num_rows // 2), pa.string())), "two families"),
])
def test_compute_metrics_rejects_bad_tables(change, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(change(_table(error_rate=0)), threshold=0.5)


# ---------------------------------------------------------------------------------------
# figures and the report


def _png_stats(data: bytes) -> tuple[int, float]:
    img = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    return len(np.unique(img)), float(img.std())


def test_safe_name():
    assert safe_name("stylegan 2/ffhq") == "stylegan_2_ffhq"
    assert safe_name("sd-1.4_x") == "sd-1.4_x"
    assert safe_name("../ä") == "..__"
    assert safe_name("") == "_"


def test_tsne_small_sample_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 8))
    assert tsne(x, labels=[0, 1, 0, 1, 1], generators=list("aabbb"), output=str(tmp_path)) == ["tsne.png"]
    distinct, std = _png_stats((tmp_path / "tsne.png").read_bytes())
    assert distinct > 10 and std > 5
    with pytest.raises(ValueError, match="t-SNE"):
        tsne(x, labels=[0, 1], generators=list("aabbb"), output=str(tmp_path))
    with pytest.raises(ValueError, match="t-SNE"):
        tsne(x[:1], labels=[0], generators=["a"], output=str(tmp_path))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    table = _table(seed=4)
    rng = np.random.default_rng(5)
    rows = table.filter(pa.compute.equal(table.column("perturbation"), "none")).slice(0, 40)
    embeddings = rng.normal(size=(40, 16)) + 2.0 * rows.column("label").to_numpy()[:, None]
    out = tmp_path_factory.mktemp("report")
    result = write_report(table, output=str(out), threshold=THRESHOLD, model={"model_id": "tiny-0123", "backbone": "tiny"},
                          embeddings=embeddings, embedding_rows=rows.select(["uri", "label", "generator"]),
                          command="ntf-ray evaluate --perturb blur=0,1,3")
    return table, out, result


def test_write_report_files(report):
    table, out, result = report
    safe = [safe_name(g) for g in sorted(GENERATORS)]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"pr_{s}.png" for s in safe] + [f"hist_{s}.png" for s in safe]
                          + ["robustness_blur.png", "robustness_jpeg.png", "tsne.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted(pngs + ["metrics.json", "report.md", "scores.parquet"])
    for name in pngs:
        distinct, std = _png_stats((out / name).read_bytes())
        assert distinct > 10 and std > 5, name  # drawn, not blank
    assert pq.read_table(out / "scores.parquet").equals(table)
    assert sum(result["figures"].values(), []) == [n for k in ("pr", "histogram", "robustness", "tsne")
                                                   for n in result["figures"][k]]
    assert sorted(sum(result["figures"].values(), [])) == pngs


def test_metrics_json_is_strict_and_complete(report):
    table, out, result = report

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    data = json.loads((out / "metrics.json").read_text(), parse_constant=no_constants)
    assert data["model"] == {"model_id": "tiny-0123", "backbone": "tiny"} and data["threshold"] == THRESHOLD
    assert data["command"].startswith("ntf-ray evaluate")
    assert data["figures"] == result["figures"]
    assert data["families"] == {"progan": "gan", "stylegan 2/ffhq": "gan", "ldm": "dm"}
    want = _expected(table, "none", None)
    for row in data["clean"]["table"][:-1]:
        assert row["ap"] == pytest.approx(want[row["generator"]]["ap"], abs=1e-12)
    assert [s["level"] for s in data["perturbations"]["blur"]] == LEVELS["blur"]
    assert data["errors"] == result["errors"] > 0
    assert format_summary(data) == format_summary(result)


def test_report_md_tables_links_and_errors(report):
    table, out, result = report
    text = (out / "report.md").read_text()
    assert text.startswith("# ") and "tiny-0123" in text and "ntf-ray evaluate --perturb" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(p.name for p in out.glob("*.png"))  # every PNG linked, every link exists
    # the clean table: percent, one decimal, from sklearn
    want = _expected(table, "none", None)
    for gen, w in want.items():
        cells = next(ln for ln in text.splitlines() if ln.startswith(f"| {gen} |")).strip("|").split("|")
        assert [c.strip() for c in cells[1:]] == [str(w["images"])] + [f"{100 * w[k]:.1f}" for k in ("ap", "acc", "fpr", "fnr")]
    average = result["clean"]["table"][-1]
    assert f"| **average** | {average['images']} | {100 * average['ap']:.1f} |" in text
    assert f"mAP: **{100 * average['map']:.1f}**" in text
    gan = next(r for r in result["clean"]["families"] if r["family"] == "gan")
    assert f"| gan | progan, stylegan 2/ffhq | {gan['images']} | {100 * gan['ap']:.1f} |" in text
    for kind, levels in LEVELS.items():
        assert all(f"#### {kind} = {level:g}" in text for level in levels)
    assert f"{result['errors']} of {result['rows']} rows could not be scored" in text


def test_format_summary(report):
    _, _, result = report
    text = format_summary(result)
    clean = result["clean"]
    assert text.startswith(format_table(clean["table"], families=clean["families"]))
    lines = [ln for ln in text.splitlines() if ln.split()[:1] and ln.split()[0] in PERTURBATIONS]
    assert len(lines) == 5
    first = result["robustness"]["blur"][0]
    assert lines[0].split()[:6] == ["blur", "0", "AP", f"{100 * first['ap']:.1f}", "ACC", f"{100 * first['acc']:.1f}"]
    assert f"{result['errors']} of {result['rows']} rows not scored" in text


def test_robustness_curves_many_generators_and_nan(tmp_path):
    # 12 generators (no thin lines), one of them without fakes (NaN AP drawn as a gap)
    rows = [{"uri": f"{g}{i}", "label": 0 if g == 0 else i % 2, "generator": f"g{g}", "family": None,
             "perturbation": kind, "level": level, "score": (i * 7 % 10) / 10, "error": None}
            for g in range(12) for i in range(6) for kind, level in [("none", None), ("scale", 1.0), ("scale", 0.5)]]
    result = compute_metrics(pa.Table.from_pylist(rows, schema=SCHEMA), threshold=0.5)
    assert [s["level"] for s in result["perturbations"]["scale"]] == [1.0, 0.5]
    assert robustness_curves(result, output=str(tmp_path)) == ["robustness_scale.png"]
    assert _png_stats((tmp_path / "robustness_scale.png").read_bytes())[1] > 5


def test_write_report_to_s3(s3, bucket):
    options = StorageOptions(endpoint_url=s3.endpoint_url)
    table = _table(seed=6)
    output = f"{bucket}/eval/run-1"
    result = write_report(table, output=output, threshold=THRESHOLD, model={"model_id": "m"}, options=options)
    name = bucket[len("s3://"):]
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=name)["Contents"])
    figures = sum(result["figures"].values(), [])
    assert result["figures"]["tsne"] == [] and len(figures) == 2 * len(GENERATORS) + 2
    assert keys == sorted(f"eval/run-1/{n}" for n in [*figures, "metrics.json", "report.md", "scores.parquet"])
    data = json.loads(storage.read_bytes(f"{output}/metrics.json", options))
    assert data["model"] == {"model_id": "m"} and data["figures"] == result["figures"]
    assert _png_stats(storage.read_bytes(f"{output}/{figures[0]}", options))[1] > 5
    assert pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/scores.parquet", options))).equals(table)
    assert all(f"]({n})" in storage.read_bytes(f"{output}/report.md", options).decode() for n in figures)


def test_write_report_needs_rows_for_embeddings(tmp_path):
    with pytest.raises(ValueError, match="together"):
        write_report(_table(), output=str(tmp_path), threshold=0.5, model={}, embeddings=np.zeros((3, 2)))
    assert list(tmp_path.iterdir()) == []  # nothing written before the check


def test_evaluate_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\nimport ntf_ray.evaluate\n"
            "assert 'matplotlib' not in sys.modules  # imported only to draw\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_report_counts_clean_images_by_the_source_they_declare(tmp_path):
    table = _table(seed=6, error_rate=0.0)
    clean = np.asarray(table.column("perturbation").to_pylist()) == "none"
    labels, scores = table.column("label").to_numpy(), table.column("score").to_numpy(zero_copy_only=False)
    # every third fake declares a generator, every fifth real a capture (the same claim at every level)
    uris = table.column("uri").to_pylist()
    ranks = {u: k for k, u in enumerate(dict.fromkeys(uris))}
    declared = [("trainedAlgorithmicMedia" if labels[i] and ranks[u] % 3 == 0 else
                 "digitalCapture" if not labels[i] and ranks[u] % 5 == 0 else None) for i, u in enumerate(uris)]
    table = table.append_column("declared_source", pa.array(declared, pa.string()))
    result = write_report(table, output=str(tmp_path), threshold=THRESHOLD, model={"model_id": "m"})
    want = {}
    for source, label, score in zip(np.asarray(declared, object)[clean], labels[clean], scores[clean]):
        row = want.setdefault(source or "-", [0, 0, 0])
        row[int(bool(label))] += 1
        row[2] += int(score >= THRESHOLD)
    assert {r["declared_source"]: [r["reals"], r["fakes"], r["called_fake"]] for r in result["provenance"]} == want
    assert result["provenance"][-1]["declared_source"] == "-"  # those that declare nothing, last
    text = (tmp_path / "report.md").read_text()
    reals, fakes, called = want["digitalCapture"]
    assert "## What the images declare" in text and f"| digitalCapture | {reals} | {fakes} | {called} |" in text
    assert "What the images declare" not in (write_report(_table(seed=6), output=str(tmp_path / "none"),
                                                          threshold=THRESHOLD, model={}) and
                                             (tmp_path / "none" / "report.md").read_text())
