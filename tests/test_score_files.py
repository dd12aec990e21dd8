"""Tests for ntf_ray.detector.score_files: one row per input, in order, read failures as rows."""

from __future__ import annotations

import pytest

from ntf_ray.detector.score_files import score_files
from ntf_ray.detector.scorer import ScoreResult
from ntf_ray.scan.table import PROVENANCE_COLUMNS


class RecordingScorer:
    """Scores an input by its length; records what it was given."""

    def __init__(self):
        self.seen: list[bytes] = []

    def score_bytes(self, items):
        self.seen += items
        return [ScoreResult(len(b) / 10, len(b) >= 5, 1, 1, "PNG", None, "pil") for b in items]


def test_rows_in_order_with_read_errors(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"abcdefg")
    scorer = RecordingScorer()
    rows = list(score_files(scorer, [tmp_path / "a", str(tmp_path / "gone"), tmp_path, f"file://{tmp_path}/b"]))
    assert [r["uri"] for r in rows] == [str(tmp_path / "a"), str(tmp_path / "gone"), str(tmp_path), str(tmp_path / "b")]
    unread = dict.fromkeys(PROVENANCE_COLUMNS)  # no trust list given: provenance not read
    assert rows[0] == {"uri": str(tmp_path / "a"), "score": 0.3, "is_fake": False, "error": None, "decoder": "pil",
                       **unread}
    assert rows[1] == {"uri": str(tmp_path / "gone"), "score": None, "is_fake": None,
                       "error": "read: not found (deleted after listing?)", "decoder": None, **unread}
    assert rows[2]["error"] == "read: a folder, not a file" and rows[2]["score"] is None
    assert rows[3]["score"] == 0.7 and rows[3]["is_fake"] is True
    assert scorer.seen == [b"abc", b"abcdefg"]  # unreadable inputs never reach the scorer


def test_rows_come_as_each_input_is_scored(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    scorer = RecordingScorer()
    rows = score_files(scorer, [tmp_path / "a", "gs://bucket/x"])
    assert next(rows)["score"] == 0.3 and scorer.seen == [b"abc"]
    with pytest.raises(ValueError, match="unsupported URI scheme"):  # a wrong argument, not a row
        next(rows)


def test_a_device_or_fifo_is_a_read_row_and_is_never_read(tmp_path, monkeypatch):
    import os

    from ntf_ray import storage

    def uncapped(uri, options=None):  # a guard: /dev/zero read whole fills memory until the process is killed
        raise AssertionError(f"{uri} read without a cap")

    monkeypatch.setattr(storage, "read_bytes", uncapped)
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open would block for ever
    scorer = RecordingScorer()
    rows = list(score_files(scorer, ["/dev/zero", tmp_path / "fifo"]))
    assert [r["error"] for r in rows] == ["read: not a regular file (a pipe, device or socket is never read)",
                                          "read: not a regular file (a pipe, device or socket is never read)"]
    assert scorer.seen == []


def test_an_input_over_max_bytes_is_too_large_as_in_a_scan(tmp_path):
    (tmp_path / "at").write_bytes(b"x" * 16)
    (tmp_path / "over").write_bytes(b"x" * 17)
    scorer = RecordingScorer()
    rows = list(score_files(scorer, [tmp_path / "at", tmp_path / "over"], max_bytes=16))
    assert rows[0]["error"] is None and rows[0]["score"] == 1.6
    assert rows[1] == {"uri": str(tmp_path / "over"), "score": None, "is_fake": None,
                       "error": "too_large: more than 16 bytes", "decoder": None, **dict.fromkeys(PROVENANCE_COLUMNS)}
    assert scorer.seen == [b"x" * 16]
