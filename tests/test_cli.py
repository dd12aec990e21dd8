"""Tests for ntf_ray.cli, through ``main([...])``: parsing, one endpoint for every command, ``score``.

The commands' work is replaced by recorders where it would start Ray: the CLI's part is to
parse and hand over, and that is what these check. The commands themselves have their
tests beside their modules (test_ray_scan, test_ray_train, test_ray_evaluate, test_scoring).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ntf_ray import cli
from ntf_ray.cli import main
from ntf_ray.scan.reading import DEFAULT_MAX_BYTES
from ntf_ray.scan.spec import ScanResult
from ntf_ray.scan.table import PROVENANCE_COLUMNS

ENV_ENDPOINT = "http://minio.internal:9000"
FLAG_ENDPOINT = "http://ceph.internal:7480"
ENDPOINT_COMMANDS = ("index", "train", "scan", "moderate", "evaluate", "calibrate", "explain", "report", "score")


@pytest.fixture
def env_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ENV_ENDPOINT)


def _subparsers() -> dict:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["index"],
    ["index", "root"],  # --out
    ["synth"],
    ["train", "--output", "o"],  # --manifest
    ["train", "--manifest", "m"],  # --output
    ["scan", "--model", "m", "--output", "o"],  # --input or --manifest
    ["scan", "--input", "i", "--output", "o"],  # --model
    ["scan", "--input", "i", "--model", "m"],  # --output
    ["moderate", "--model", "m", "--output", "o"],
    ["evaluate", "--model", "m", "--manifest", "x"],  # --output
    ["evaluate", "--manifest", "x", "--output", "o"],  # --model
    ["calibrate", "--model", "m", "--manifest", "x", "--output", "o"],  # --target-fpr
    ["score", "file.png"],  # --model
    [],  # no command
], ids=lambda argv: " ".join(argv) or "none")
def test_missing_required_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_score_without_inputs_says_what_it_needs(capsys):
    assert main(["score", "--model", "m"]) == 2
    assert "nothing to score" in capsys.readouterr().err


def test_score_card_prints_the_model_card_with_its_limits(tmp_path, capsys):
    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector

    data = {"images": 120, "counts": {"train/real": 60, "train/fake": 60}, "generators": ["nnconv", "tconv"]}
    save_artifact(str(tmp_path / "m"), Detector.build("tiny"), input_size=32,
                  training={"config": {"variant": "ntf"}, "data": data, "workers": 2})
    written = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert main(["score", "--model", str(tmp_path / "m"), "--card"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == written.strip()
    for part in ("## Intended use", "| variant | ntf |", "| generators | nnconv, tconv |", "Not calibrated.",
                 "Trained on synthetic data only", "is not calibrated", "No evaluation stored"):
        assert part in printed, part


@pytest.mark.parametrize("command", ["scan", "moderate"])
def test_input_and_manifest_exclude_each_other(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--input", "s3://b/p", "--manifest", "m.parquet", "--model", "m", "--output", "o"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--manifest: not allowed with argument --input" in err


@pytest.mark.parametrize("command", ["scan", "moderate"])
def test_scan_needs_input_or_manifest(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--model", "m", "--output", "o"])
    assert info.value.code == 2
    assert "one of the arguments --input --manifest --inventory is required" in capsys.readouterr().err


def test_every_storage_command_takes_the_one_s3_endpoint_flag():
    subparsers = _subparsers()
    helps = set()
    for name, parser in subparsers.items():
        flags = {a.dest: a for a in parser._actions}
        assert ("s3_endpoint" in flags) == (name in ENDPOINT_COMMANDS), name
        if name in ENDPOINT_COMMANDS:
            helps.add(flags["s3_endpoint"].help)
    assert helps == {"S3 endpoint URL (MinIO, Ceph, moto); default: AWS_ENDPOINT_URL"}


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("128MiB", 128 * 2**20), ("1gb", 10**9),
                                             ("1.5 KiB", 1536), ("2GiB", 2 * 2**30)])
def test_max_bytes_sizes(text, value):
    args = cli.build_parser().parse_args(["scan", "--input", "i", "--model", "m", "--output", "o",
                                          "--max-bytes", text])
    assert args.max_bytes == value


def test_max_bytes_default_is_the_scans():

    args = cli.build_parser().parse_args(["moderate", "--input", "i", "--model", "m", "--output", "o"])
    assert args.max_bytes == DEFAULT_MAX_BYTES == 128 * 2**20


@pytest.mark.parametrize("text", ["0", "-1", "12 parsecs", "MiB", ""])
def test_max_bytes_rejects_what_is_not_a_size(text, capsys):
    with pytest.raises(SystemExit) as info:
        main(["moderate", "--input", "i", "--model", "m", "--output", "o", "--max-bytes", text])
    assert info.value.code == 2
    assert "--max-bytes" in capsys.readouterr().err


# --- one endpoint, resolved once ---------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    """Replace what would start Ray by recorders; returns what each was given."""
    from ntf_ray.ray_edge import evaluate as ray_evaluate
    from ntf_ray.ray_edge import runtime
    from ntf_ray.ray_edge import scan as ray_scan
    from ntf_ray.ray_edge import train as ray_train

    calls: dict = {}

    def train(stage, cfg, spec):
        calls["train"] = (stage, cfg, spec)
        return {"stage1": {"loss": 0.5, "epochs": 1}}

    def scan(spec):
        calls["scan"] = spec
        return ScanResult(run_id="r1", run_dir="o/r1", summary={"rows": 0})

    def evaluate(spec, *, command=None):
        calls["evaluate"] = (spec, command)
        return {}

    monkeypatch.setattr(runtime, "init_local_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_train, "train", train)
    monkeypatch.setattr(ray_scan, "scan", scan)
    monkeypatch.setattr(cli.scan, "format_summary", lambda summary: f"summary {summary}")
    monkeypatch.setattr(ray_evaluate, "evaluate", evaluate)
    monkeypatch.setattr(ray_evaluate, "format_summary", lambda metrics: "metrics")
    return calls


@pytest.mark.parametrize(("flag", "want"), [([], ENV_ENDPOINT), (["--s3-endpoint", FLAG_ENDPOINT], FLAG_ENDPOINT)])
def test_train_gets_the_resolved_endpoint(env_endpoint, recorded, flag, want, tmp_path, capsys):
    assert main(["train", "--manifest", "s3://b/m.parquet", "--output", str(tmp_path), "--stage", "1",
                 "--epochs-stage1", "3", "--set", "lr=0.05", "--run-name", "r", *flag]) == 0
    stage, cfg, spec = recorded["train"]
    assert spec.endpoint == want
    assert (stage, cfg.epochs_stage1, cfg.lr, spec.run_name, spec.manifest) == ("1", 3, 0.05, "r", "s3://b/m.parquet")
    assert "stage1: loss=0.5, epochs=1" in capsys.readouterr().out
    assert spec.augment == "auto"


def test_train_passes_where_to_augment(env_endpoint, recorded, tmp_path):
    assert main(["train", "--manifest", "m.parquet", "--output", str(tmp_path), "--gpus", "--augment-on", "tasks"]) == 0
    assert recorded["train"][2].augment == "tasks" and recorded["train"][2].use_gpu


@pytest.mark.parametrize("command", ["scan", "moderate"])
@pytest.mark.parametrize(("flag", "want"), [([], ENV_ENDPOINT), (["--s3-endpoint", FLAG_ENDPOINT], FLAG_ENDPOINT)])
def test_scan_gets_the_resolved_endpoint(env_endpoint, recorded, command, flag, want, capsys):
    assert main([command, "--manifest", "m.parquet", "--model", "s3://b/det", "--output", "s3://b/t",
                 "--glob", "*.jpg", "--max-bytes", "1MiB", *flag]) == 0
    spec = recorded["scan"]
    assert spec.endpoint == want
    assert (spec.input, spec.manifest, spec.pattern, spec.incremental, spec.max_bytes) == (
        None, "m.parquet", "*.jpg", command == "moderate", 2**20)
    assert capsys.readouterr().out.strip() == "summary {'rows': 0}"


def test_evaluate_gets_the_resolved_endpoint_and_records_no_endpoint(env_endpoint, recorded, capsys):
    assert main(["evaluate", "--model", "m", "--manifest", "x", "--output", "o", "--s3-endpoint", FLAG_ENDPOINT]) == 0
    spec, command = recorded["evaluate"]
    assert spec.endpoint == FLAG_ENDPOINT
    assert command == "ntf-ray evaluate --model m --manifest x --output o"


def test_no_endpoint_anywhere_is_none(monkeypatch, recorded):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert main(["scan", "--input", "i", "--model", "m", "--output", "o"]) == 0
    assert recorded["scan"].endpoint is None


def test_demo_delegates(monkeypatch):
    from ntf_ray.ray_edge import demo as ray_demo

    seen = {}
    monkeypatch.setattr(ray_demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert main(["demo", "--work", "w", "--n", "4", "--seed", "3", "--set", "lr=0.1"]) == 0
    assert seen == {"work": "w", "n": 4, "seed": 3, "overrides": ["lr=0.1"]}


# --- score -------------------------------------------------------------------------------


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_score_two_images_and_a_missing_file(tmp_path, capsys):
    import torch

    from ntf_ray.detector.artifact import save_artifact
    from ntf_ray.nn.model import Detector

    torch.manual_seed(0)
    model = str(tmp_path / "detector")
    save_artifact(model, Detector.build("tiny"), input_size=32, threshold=0.5)
    files = []
    for i in range(2):
        (tmp_path / f"img{i}.png").write_bytes(_png(i))
        files.append(str(tmp_path / f"img{i}.png"))
    missing = str(tmp_path / "gone.png")
    assert main(["score", "--model", model, "--device", "cpu", "--decoder", "pil", *files, missing]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["uri"] for r in rows] == [*files, missing]
    for r in rows[:2]:
        assert r["error"] is None and 0 <= r["score"] <= 1 and r["is_fake"] == (r["score"] >= 0.5)
        assert r["decoder"] == "pil"
    assert rows[2] == {"uri": missing, "score": None, "is_fake": None,
                       "error": "read: not found (deleted after listing?)", "decoder": None,
                       **dict.fromkeys(PROVENANCE_COLUMNS)}  # null: an input that was not read says nothing
    assert rows[0]["provenance_problem"] is None  # a plain PNG: read, and it claims nothing


def test_score_a_folder_gets_the_formatted_read_error(tmp_path, capsys, monkeypatch):
    from ntf_ray.detector import scorer as scoring

    monkeypatch.setattr(scoring.Scorer, "from_artifact", classmethod(lambda cls, *a, **k: None))
    assert main(["score", "--model", "m", str(tmp_path)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["error"] == "read: a folder, not a file"  # named as such, not "Is a directory: 3"


def test_score_a_bad_scheme_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from ntf_ray.detector import scorer as scoring

    monkeypatch.setattr(scoring.Scorer, "from_artifact", classmethod(lambda cls, *a, **k: None))
    assert main(["score", "--model", "m", "gs://bucket/x.png"]) == 2
    assert "ntf-ray score: error: unsupported URI scheme" in capsys.readouterr().err


def test_the_model_card_shows_the_stored_evaluation_and_calibration():
    from ntf_ray.detector.model_card import render
    from ntf_ray.evaluate.metrics import per_generator_table

    table = per_generator_table([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.4], ["gan", "gan", "dm", "dm"])
    card = render({"model_id": "abc", "threshold": 0.7, "metrics": {"split": "test", "table": table},
                   "calibration": {"target_fpr": 0.01, "fpr": 0.0075, "fpr_upper95": 0.0185, "reals": 400,
                                   "split": "val"},
                   "training": {"data": {"images": 10, "generators": ["progan"]}}})
    assert "| dm | 2 | 1.000 | 0.500 | 0.000 | 1.000 |" in card and "| average | 4 |" in card
    assert "| target FPR | 0.01 |" in card and "| real images | 400 |" in card
    assert "not calibrated" not in card and "synthetic" not in card and "No evaluation" not in card


@pytest.mark.parametrize("command", ["scan", "moderate", "score", "evaluate"])
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-1", "50", "1.5", "half"])
def test_a_threshold_must_be_a_number_in_0_1(command, text, capsys):
    argv = {"scan": ["scan", "--input", "i", "--model", "m", "--output", "o"],
            "moderate": ["moderate", "--input", "i", "--model", "m", "--output", "o"],
            "score": ["score", "--model", "m", "x.png"],
            "evaluate": ["evaluate", "--model", "m", "--manifest", "x", "--output", "o"]}[command]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--threshold", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--threshold" in err and "a threshold is a number in [0, 1]" in err


# --- wrong arguments and unreachable storage: one line, before any work ---------------------


@pytest.mark.parametrize("command", ["scan", "moderate"])
@pytest.mark.parametrize("text", ["0", "-1", "-5", "two", "1.5"])
def test_a_limit_is_a_whole_number_of_at_least_1(command, text, recorded, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--input", "i", "--model", "m", "--output", "o", "--limit", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "at least 1" in err
    assert "scan" not in recorded


def test_a_limit_of_1_scans_one(recorded):
    assert main(["scan", "--input", "i", "--model", "m", "--output", "o", "--limit", "1"]) == 0
    assert recorded["scan"].limit == 1


OUTPUT_COMMANDS = {
    "train": ["train", "--manifest", "m.parquet", "--output"],
    "scan": ["scan", "--input", "i", "--model", "m", "--output"],
    "moderate": ["moderate", "--input", "i", "--model", "m", "--output"],
    "evaluate": ["evaluate", "--model", "m", "--manifest", "x", "--output"],
    "calibrate": ["calibrate", "--model", "m", "--manifest", "x", "--target-fpr", "0.01", "--output"],
    "explain": ["explain", "--model", "m", "x.png", "--output"],
    "report": ["report", "--scores", "s", "--output"],
    "demo": ["demo", "--work"],
    "synth": ["synth"],
}


def test_every_command_with_an_output_folder_checks_it():
    """OUTPUT_COMMANDS names every command that writes into a folder."""
    folders = {name for name, parser in _subparsers().items()
               if {"output", "work"} & {a.dest for a in parser._actions} or name == "synth"}
    assert folders == set(OUTPUT_COMMANDS) == set(cli.OUTPUT_FOLDER)


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
@pytest.mark.parametrize("below", ["", "out", "out/deeper"])
def test_an_output_folder_at_or_under_a_file_is_refused_before_any_work(command, below, recorded, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    output = str(tmp_path / "file" / below) if below else str(tmp_path / "file")
    assert main([*OUTPUT_COMMANDS[command], output]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ntf-ray {command}: error: output folder {output}: {tmp_path / 'file'} "
                                "is not a folder"]
    assert recorded == {}  # nothing started


def test_an_output_folder_to_be_made_or_on_s3_is_fine(recorded, tmp_path):
    assert main(["scan", "--input", "i", "--model", "m", "--output", str(tmp_path / "new" / "table")]) == 0
    assert main(["scan", "--input", "i", "--model", "m", "--output", "s3://b/t"]) == 0


@pytest.mark.parametrize("argv", [["score", "--model", "m", "x.png"], ["score", "--model", "m", "--card"],
                                  ["explain", "--model", "m", "x.png", "--output", "maps"]])
def test_device_cuda_without_one_is_one_line_before_the_model_is_read(argv, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ntf-ray {argv[0]}: error: --device cuda: no CUDA device is available here; "
                                "use --device cpu (or auto)"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # botocore retries the connection for a few seconds
def test_score_with_an_unreachable_endpoint_is_one_line_without_it(tmp_path, monkeypatch, capsys):
    from tests.conftest import save_random_detector

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTTESTTESTTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-1234")
    model = save_random_detector(str(tmp_path / "m"))
    port = _closed_port()
    endpoint = f"http://127.0.0.1:{port}"
    assert main(["score", "--model", model, "--device", "cpu", "--s3-endpoint", endpoint, "s3://bucket/x.png"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line == ('ntf-ray score: error: read: EndpointConnectionError: Could not connect to the endpoint URL: '
                    '"<endpoint>"')
    for secret in (str(port), "127.0.0.1", "AKIATESTTESTTESTTEST", "not-a-real-secret-1234"):
        assert secret not in captured.err


def test_score_refuses_a_device_and_caps_what_it_reads(tmp_path, capsys, monkeypatch):
    from ntf_ray import storage
    from ntf_ray.detector import scorer as scoring

    monkeypatch.setattr(scoring.Scorer, "from_artifact", classmethod(lambda cls, *a, **k: None))

    def uncapped(uri, options=None):  # /dev/zero read whole fills memory until the kernel kills the process
        raise AssertionError(f"{uri} read without a cap")

    monkeypatch.setattr(storage, "read_bytes", uncapped)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB that take no disk
    assert main(["score", "--model", "m", "--max-bytes", "1KiB", "/dev/zero", str(big)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] for r in rows] == ["read: not a regular file (a pipe, device or socket is never read)",
                                          "too_large: more than 1024 bytes"]


def test_score_and_explain_cap_at_the_scans_max_bytes_by_default():
    from ntf_ray.storage import DEFAULT_MAX_BYTES

    parser = cli.build_parser()
    assert parser.parse_args(["score", "--model", "m", "x"]).max_bytes == DEFAULT_MAX_BYTES
    assert parser.parse_args(["explain", "--model", "m", "x", "--output", "o"]).max_bytes == DEFAULT_MAX_BYTES
    explain = ["explain", "--model", "m", "x", "--output", "o", "--max-bytes", "2MiB"]
    assert parser.parse_args(explain).max_bytes == 2**21


# --- one place per option ------------------------------------------------------------------


def _scan_parser_and_args(argv: list[str]):
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return parser, sub.choices[argv[0]]


def test_every_scan_option_sets_the_spec_field_its_dest_names():
    """Each scan flag lands in the ScanSpec field its dest names (cmd_scan copies nothing by
    hand), and every field but the endpoint (resolved once for every command) has its flag."""
    import dataclasses

    from ntf_ray.cli.scan import scan_spec
    from ntf_ray.scan.spec import ScanSpec
    from ntf_ray.storage import StorageOptions

    argv = ["scan", "--input", "i", "--model", "m", "--output", "o", "--run-id", "r", "--incremental",
            "--glob", "*.png", "--threshold", "0.3", "--batch-size", "8", "--min-actors", "1", "--max-actors", "3",
            "--gpus-per-actor", "0.5", "--decoder", "pil", "--limit", "5", "--max-bytes", "1MiB", "--max-pixels",
            "1000", "--read-block-rows", "7", "--read-block-bytes", "2MiB", "--read-ahead", "3MiB",
            "--stall-timeout", "never", "--streams", "4", "--cpus-per-actor", "0.5", "--list-concurrency", "6",
            "--inventory-max-bytes", "5MiB", "--inventory-max-rows", "9", "--allow-unchecked-inventory"]
    parser, scan = _scan_parser_and_args(argv)
    args = parser.parse_args(argv)
    args.storage_options = StorageOptions(endpoint_url="http://e")
    spec = scan_spec(args)
    assert dataclasses.asdict(spec) == {
        "model": "m", "output": "o", "input": "i", "manifest": None, "inventory": None, "run_id": "r", "incremental": True,
        "inventory_max_bytes": 5 * 2**20, "inventory_max_rows": 9, "allow_unchecked_inventory": True,
        "threshold": 0.3, "pattern": "*.png", "list_concurrency": 6, "limit": 5, "batch_size": 8, "min_actors": 1, "max_actors": 3,
        "gpus_per_actor": 0.5, "cpus_per_actor": 0.5, "decoder": "pil", "read_block_rows": 7,
        "read_block_bytes": 2 * 2**20, "streams": 4, "read_ahead_bytes": 3 * 2**20, "max_bytes": 2**20,
        "max_pixels": 1000, "stall_s": None, "provenance": True, "c2pa_trust": [], "endpoint": "http://e"}
    dests = {a.dest for a in scan._actions}
    assert {f.name for f in dataclasses.fields(ScanSpec)} - dests == {"endpoint"}


def test_scan_defaults_are_the_specs():
    import dataclasses

    from ntf_ray.cli.scan import scan_spec
    from ntf_ray.scan.spec import ScanSpec
    from ntf_ray.storage import StorageOptions

    argv = ["moderate", "--input", "i", "--model", "m", "--output", "o"]
    parser, _ = _scan_parser_and_args(argv)
    args = parser.parse_args(argv)
    args.storage_options = StorageOptions(endpoint_url=None)
    assert scan_spec(args) == dataclasses.replace(ScanSpec(model="m", output="o", input="i"), incremental=True)


def test_a_new_scan_option_is_one_field_and_one_parser_line():
    """What adding an option takes: a field on the spec and a parser line; the spec is built,
    and its public record (the run's summary) written, with nothing else edited."""
    import dataclasses

    from ntf_ray.cli.arguments import spec_from_args
    from ntf_ray.scan.spec import ScanSpec

    @dataclasses.dataclass
    class Wider(ScanSpec):
        new_knob: int = 3  # the field

    argv = ["scan", "--input", "i", "--model", "m", "--output", "o"]
    parser, scan = _scan_parser_and_args(argv)
    scan.add_argument("--new-knob", type=int, default=3)  # the parser line
    spec = spec_from_args(Wider, parser.parse_args([*argv, "--new-knob", "9"]), endpoint=None)
    assert spec.new_knob == 9 and spec.public()["new_knob"] == 9
    assert spec_from_args(Wider, parser.parse_args(argv), endpoint=None).new_knob == 3


@pytest.mark.parametrize("extra, says", [
    (["--max-actors", "0"], "--max-actors: '0': give a number of actors of at least 1"),
    (["--min-actors", "0"], "--min-actors: '0': give a number of actors of at least 1"),
    (["--min-actors", "5", "--max-actors", "2"], "--min-actors 5 is more than --max-actors 2"),
    (["--stall-timeout", "0"], "--stall-timeout: '0': give a number of seconds above 0, or 'never'"),
    (["--stall-timeout", "-3"], "--stall-timeout: '-3'"),
    (["--glob", ""], "--glob: an empty pattern matches no name"),
    (["--batch-size", "0"], "--batch-size: '0'"),
    (["--read-block-rows", "-1"], "--read-block-rows: '-1'"),
    (["--streams", "0"], "--streams: '0'"),
    (["--gpus-per-actor", "-0.5"], "--gpus-per-actor: '-0.5'"),
    (["--cpus-per-actor", "inf"], "--cpus-per-actor: 'inf'"),
    (["--threshold", "nan"], "--threshold: 'nan'"),
])
def test_every_numeric_scan_option_is_range_checked_in_one_line(tmp_path, capsys, extra, says):
    try:
        code = main(["scan", "--input", str(tmp_path), "--model", str(tmp_path / "m"), "--output",
                     str(tmp_path / "o"), *extra])
    except SystemExit as stop:  # argparse's refusal
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert len(err.strip().splitlines()) == 1, err  # one line, not the usage of forty options first
    assert not (tmp_path / "o").exists()  # refused before anything ran


@pytest.mark.parametrize("argv, says", [
    (["calibrate", "--model", "m", "--manifest", "x", "--output", "o", "--target-fpr", "1"], "--target-fpr: '1'"),
    (["calibrate", "--model", "m", "--manifest", "x", "--output", "o", "--target-fpr", "0"], "--target-fpr: '0'"),
    (["evaluate", "--model", "m", "--manifest", "x", "--output", "o", "--max-actors", "0"], "--max-actors: '0'"),
    (["evaluate", "--model", "m", "--manifest", "x", "--output", "o", "--embeddings", "-1"], "--embeddings: '-1'"),
    (["train", "--manifest", "x", "--output", "o", "--num-workers", "0"], "--num-workers: '0'"),
    (["train", "--manifest", "x", "--output", "o", "--cpus-per-worker", "0"], "--cpus-per-worker: '0'"),
    (["train", "--manifest", "x", "--output", "o", "--epochs-stage1", "0"], "--epochs-stage1: '0'"),
    (["train", "--manifest", "x", "--output", "o", "--max-failures", "-2"], "--max-failures: '-2'"),
    (["synth", "o", "--n-real", "-1"], "--n-real: '-1'"),
    (["synth", "o", "--seed", "-1"], "--seed: '-1'"),
    (["demo", "--n", "0"], "--n: '0'"),
    (["report", "--model", "m", "--scores", "s", "--output", "o", "--top", "0"], "--top: '0'"),
])
def test_every_numeric_option_of_the_other_commands_is_range_checked(capsys, argv, says):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_score_and_explain_name_a_folder_as_such(tmp_path, capsys):
    from tests.conftest import save_random_detector

    model = save_random_detector(str(tmp_path / "model"))
    (tmp_path / "folder").mkdir()
    assert main(["score", "--model", model, str(tmp_path / "folder")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["error"] == "read: a folder, not a file"
    main(["explain", "--model", model, str(tmp_path / "folder"), "--output", str(tmp_path / "maps")])
    assert "read: a folder, not a file" in capsys.readouterr().out
