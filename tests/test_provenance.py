"""What an image says about its origin (``images.provenance``): C2PA credentials signed here by
the library itself, PNG text chunks of the common front ends, XMP, EXIF, and hostile XMP; read
from metadata only, never from pixels, within the decode's limits and for the formats it opens."""

from __future__ import annotations

import io
import os
import socket
import struct
import sys
import threading
import tracemalloc

import pytest
from PIL import Image

from ntf_ray.images import provenance
from ntf_ray.images.decode import DEFAULT_MAX_PIXELS, decode
from ntf_ray.images.provenance import C2paTrust, read_provenance
from tests import bombs
from tests.provenance_images import (
    HOSTILE_XMP,
    IPTC,
    CredentialSigner,
    created,
    forged_claim,
    jpeg_bytes,
    make_provenance_images,
    pixels_decoded,
    png_bytes,
    with_declared_size,
    with_xmp_segment,
    xmp_packet,
)

AI_XMP = xmp_packet(IPTC + "trainedAlgorithmicMedia", tool="Example Generator")
AI_CLAIM = ("xmp", "trainedAlgorithmicMedia", "Example Generator")


@pytest.fixture(scope="module")
def signer() -> CredentialSigner:
    pytest.importorskip("c2pa", reason="the c2pa extra")
    return CredentialSigner()


@pytest.fixture(scope="module")
def images(signer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("provenance")
    return folder, make_provenance_images(folder, signer)


def test_each_kind_of_image_reads_as_what_it_declares(images):
    folder, expected = images
    for name, want in expected.items():
        got = read_provenance((folder / name).read_bytes())
        for field, value in want.items():
            assert getattr(got, field) == value, (name, field, got)
        assert got.problem is None, (name, got)


def test_a_signer_on_the_trust_list_reads_trusted_and_a_forgery_never_does(images, signer):
    folder, _ = images
    trust = C2paTrust(signer.root_pem)
    assert read_provenance((folder / "c2pa-ai.jpg").read_bytes(), trust).c2pa_state == "trusted"
    for forged in ("c2pa-tampered.jpg", "c2pa-transplanted.jpg"):
        assert read_provenance((folder / forged).read_bytes(), trust).c2pa_state == "mismatched"
    other = C2paTrust(CredentialSigner().root_pem)  # a list that holds some other root
    assert read_provenance((folder / "c2pa-ai.jpg").read_bytes(), other).c2pa_state == "untrusted"


def test_a_claim_changed_after_signing_reads_invalid_even_from_a_trusted_signer(signer):
    data = signer.sign(jpeg_bytes(20), "image/jpeg", "Forger Model", [created("digitalCapture")])
    forged = forged_claim(data, b"Forger Model", b"Trusted Cam!")  # the claim's text, not its signature
    got = read_provenance(forged, C2paTrust(signer.root_pem))
    assert (got.c2pa_state, got.declared_by) == ("invalid", "Trusted Cam! 1.0"), got


def test_png_text_chunks_name_their_front_end_and_the_software_chunk_wins():
    got = read_provenance(png_bytes(1, {"Software": "NovelAI", "parameters": "a cat\nSteps: 28"}))
    assert (got.provenance, got.declared_source, got.declared_by) == ("png-text", "generator-metadata", "NovelAI")
    only_software = read_provenance(png_bytes(1, {"Software": "GIMP 2.10"}))
    assert (only_software.provenance, only_software.declared_source, only_software.declared_by) == \
        ("png-text", None, "GIMP 2.10")
    empty = read_provenance(png_bytes(1, {"parameters": "   "}))  # an empty chunk claims nothing
    assert empty.provenance is None


def test_c2pa_comes_before_xmp_and_xmp_before_exif():
    both = read_provenance(jpeg_bytes(2, software="Camera FW 1", xmp=xmp_packet(IPTC + "digitalCapture")))
    assert (both.provenance, both.declared_source, both.declared_by) == ("xmp", "digitalCapture", "Camera FW 1")
    assert read_provenance(jpeg_bytes(2, xmp=xmp_packet("somethingNew"))).declared_source == "somethingNew"
    odd = read_provenance(jpeg_bytes(2, xmp=xmp_packet("http://example.com/not/iptc#x")))
    assert odd.declared_source == "other"


@pytest.mark.parametrize(("case", "reason"), [("billion-laughs", "xmp: DTDForbidden"),
                                             ("external-entity", "xmp: DTDForbidden"),
                                             ("external-dtd", "xmp: DTDForbidden"),
                                             ("oversized", "xmp: too large")])
def test_hostile_xmp_is_refused_not_expanded(case, reason):
    packet = HOSTILE_XMP[case]
    tracemalloc.start()
    try:
        got = read_provenance(png_bytes(3, xmp=packet))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in got.problem.split("; "), got
    assert (got.provenance, got.declared_source, got.declared_by) == (None, None, None)
    # nothing was expanded: a few copies of the packet at most (the laughs would be 3 GB)
    assert peak < 10 * len(packet) + (2 << 20), peak


def test_long_names_are_cut_and_bytes_that_are_no_image_cost_nothing_but_a_reason():
    long = read_provenance(jpeg_bytes(4, software="S" * 5000))
    assert len(long.declared_by) == provenance.MAX_TEXT and long.declared_by.endswith("\u2026")
    broken = read_provenance(b"\x89PNG\r\n\x1a\n not really")
    assert broken.problem.startswith("image: ") and broken.provenance is None


def test_trust_lists_come_from_files_that_hold_certificates(tmp_path, signer):
    good = tmp_path / "root.pem"
    good.write_text(signer.root_pem)
    assert C2paTrust.from_files([str(good)]).anchors.startswith("-----BEGIN CERTIFICATE-----")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate")
    broken = tmp_path / "broken.pem"  # the markers, and no certificate between them
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for bad in (notes, broken):
        with pytest.raises(ValueError, match="not PEM certificates"):
            C2paTrust.from_files([str(good), str(bad)])
    # read as every operator file is: a FIFO or a link to a device is refused, not read for ever
    os.mkfifo(tmp_path / "fifo.pem")
    (tmp_path / "zero.pem").symlink_to("/dev/zero")
    for odd in ("fifo.pem", "zero.pem"):
        with pytest.raises(ValueError, match="--c2pa-trust .* not a regular file"):
            C2paTrust.from_files([str(tmp_path / odd)])


def test_reading_a_credential_reaches_no_host_even_one_its_xmp_names(signer):
    """An image with no manifest of its own whose XMP points at a remote one: the library
    would fetch it (and OCSP for certificates); here it must not connect at all."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.2)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/manifest.c2pa"
        calls, stop = [], threading.Event()

        def accept():
            while not stop.is_set():
                try:
                    calls.append(listener.accept()[0].close())
                except OSError:
                    continue

        waiter = threading.Thread(target=accept, daemon=True)
        waiter.start()
        xmp = xmp_packet().replace(b'rdf:about=""', b'rdf:about="" xmlns:dcterms="http://purl.org/dc/terms/" '
                                                     b'dcterms:provenance="' + url.encode() + b'"')
        got = read_provenance(jpeg_bytes(30, xmp=xmp), C2paTrust(signer.root_pem))
        stop.set()
        waiter.join(5)
    assert calls == [], "the reader connected to a host"
    assert got.c2pa_state in (None, "unreadable"), got  # the remote manifest is not read: said so, or nothing


def test_a_broken_credential_does_not_hide_what_the_image_says_elsewhere(signer):
    ai = jpeg_bytes(31, xmp=xmp_packet(IPTC + "trainedAlgorithmicMedia", tool="Example Generator"))
    forged = forged_claim(signer.sign(ai, "image/jpeg", "Fake Camera", [created("digitalCapture")]),
                          b"Fake Camera", b"Real Camera")
    got = read_provenance(forged, C2paTrust(signer.root_pem))
    assert (got.c2pa_state, got.provenance, got.declared_source) == ("invalid", "xmp", "trainedAlgorithmicMedia"), got


def test_a_credential_that_keeps_the_library_reading_past_its_deadline_is_too_slow(images, monkeypatch):
    folder, _ = images
    monkeypatch.setattr(provenance, "C2PA_DEADLINE_S", -1.0)  # every read is past it
    got = read_provenance((folder / "c2pa-ai.jpg").read_bytes())
    assert (got.c2pa_state, got.problem) == ("unreadable", "c2pa: too slow"), got
    assert read_provenance(jpeg_bytes(33, software="Cam")).declared_by == "Cam"  # the rest is still read


def test_without_the_c2pa_library_the_rest_is_read_and_each_row_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # as if not installed: importing it raises ImportError
    got = read_provenance(jpeg_bytes(32, xmp=xmp_packet(IPTC + "digitalCapture")))
    assert (got.provenance, got.declared_source, got.c2pa_state) == ("xmp", "digitalCapture", None)
    assert got.problem == "c2pa: not installed"
    with pytest.raises(ValueError, match="needs the C2PA library"):
        C2paTrust.from_files(["root.pem"])


def _claims(got) -> tuple:
    return got.provenance, got.declared_source, got.declared_by


def _exif(software: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = software
    return exif.tobytes()[6:]  # the TIFF structure an eXIf chunk holds


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_bomb_has_no_claims_read_and_no_pixel_decoded():
    """120 Mpx in 117 KB, no eXIf before its image data: ``decode`` refuses it from its header,
    and so does the claims reader; Pillow's ``getexif()`` would have decoded it whole."""
    data = bombs.png_compressed(12000, 10000, mode="L",
                                before=(bombs.png_chunk(b"tEXt", b"parameters\x00a red fox, Steps: 20"),))
    assert decode(data).error.startswith("too_large: 12000x10000")
    tracemalloc.start()
    try:
        with pixels_decoded() as calls:
            got = read_provenance(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == [], calls
    assert (*_claims(got), got.c2pa_state, got.problem) == (None, None, None, None, "image: too large"), got
    assert peak < len(data), peak  # not even a copy of the file


def test_claims_after_a_large_pngs_pixels_are_read_without_decoding_them():
    """64 Mpx, within the limit: XMP and EXIF after the image data, where Pillow reads them
    only once it has decoded the image, are read by stepping over it."""
    data = bombs.png_compressed(8000, 8000, mode="L", after=(
        bombs.png_chunk(b"eXIf", _exif("Camera FW 9")),
        bombs.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + AI_XMP)))
    with pixels_decoded() as calls:
        got = read_provenance(data)
    assert calls == [], calls
    assert (_claims(got), got.problem) == (AI_CLAIM, None), got
    only_exif = bombs.png_compressed(8000, 8000, mode="L", after=(bombs.png_chunk(b"eXIf", _exif("Camera FW 9")),))
    with pixels_decoded() as calls:
        assert _claims(read_provenance(only_exif)) == ("exif", None, "Camera FW 9")
    assert calls == []


def _lossless_webp_declaring(width: int, height: int) -> bytes:
    """A lossless extended WebP with XMP whose canvas and frame header both declare ``width x height``."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(out, "WEBP", lossless=True, xmp=AI_XMP)
    data = bytearray(out.getvalue())
    assert data[12:16] == b"VP8X" and data[30:34] == b"VP8L"
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    (bits,) = struct.unpack_from("<I", data, 39)
    struct.pack_into("<I", data, 39, (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14))
    return bytes(data)


REFUSED = {  # name -> (bytes, the pixel limit): each one decode refuses from its header, each but the TIFF with claims
    "png bomb": lambda: (bombs.png_compressed(12000, 10000, mode="L", before=(
        bombs.png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + AI_XMP),)), DEFAULT_MAX_PIXELS),
    "png over a lower limit": lambda: (png_bytes(40, {"parameters": "a cat"}, xmp=AI_XMP), 64 * 48 - 1),
    "jpeg declaring 110 Mpx": lambda: (with_declared_size(jpeg_bytes(41, software="Cam", xmp=AI_XMP), 11000, 10000),
                                       DEFAULT_MAX_PIXELS),
    "jpeg of too many scans": lambda: (with_xmp_segment(bombs.progressive_many_scans(64, 600), AI_XMP),
                                       DEFAULT_MAX_PIXELS),
    "webp declaring 110 Mpx": lambda: (_lossless_webp_declaring(11000, 10000), DEFAULT_MAX_PIXELS),
    "tiff of a huge tile": lambda: (bombs.tiff_huge_tile(), DEFAULT_MAX_PIXELS),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # decode's, between 1x and 2x Pillow's
@pytest.mark.parametrize("name", list(REFUSED))
def test_an_image_decode_refuses_from_its_header_has_no_claims_read(name):
    data, limit = REFUSED[name]()
    assert decode(data, max_pixels=limit).error.startswith("too_large: "), name  # the same limits, the same verdict
    with pixels_decoded() as calls:  # without max_pixels the reader holds to decode's default
        got = read_provenance(data) if limit == DEFAULT_MAX_PIXELS else read_provenance(data, max_pixels=limit)
    assert calls == [], calls
    assert (*_claims(got), got.c2pa_state, got.problem) == (None, None, None, None, "image: too large"), got


def test_a_format_the_scan_does_not_open_has_no_claims_read():
    Image.init()
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow writes no AVIF")
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0131] = "Example Phone"
    Image.new("RGB", (32, 24), (200, 10, 10)).save(out, "AVIF", xmp=AI_XMP, exif=exif)
    data = out.getvalue()
    assert decode(data).error == "unsupported_format: AVIF"
    got = read_provenance(data)
    assert (*_claims(got), got.c2pa_state, got.problem) == (None, None, None, None, "image: unsupported format"), got


def test_each_format_the_scan_opens_keeps_its_claims():
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0131] = "WebP Cam"
    Image.new("RGB", (32, 24), (1, 2, 3)).save(out, "WEBP", xmp=AI_XMP, exif=exif)
    assert (_claims(read_provenance(out.getvalue())), read_provenance(out.getvalue()).problem) == (AI_CLAIM, None)
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (1, 2, 3)).save(out, "TIFF", tiffinfo={305: "Scanner 9"})
    assert _claims(read_provenance(out.getvalue())) == ("exif", None, "Scanner 9")
    assert _claims(read_provenance(jpeg_bytes(42, software="Cam 1", xmp=AI_XMP))) == AI_CLAIM


def test_a_png_cut_short_keeps_the_claims_read_before_the_cut_and_is_not_given_to_c2pa():
    data = png_bytes(43, {"parameters": "a cat"})
    got = read_provenance(data[:-30])  # into the image data: Pillow opens it, its decoder fails
    assert (_claims(got), got.c2pa_state, got.problem) == \
        (("png-text", "generator-metadata", "AUTOMATIC1111 web UI (or a fork)"), None, "image: truncated"), got


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_scan_writes_each_images_claims_beside_its_score_and_counts_them(local_ray, images, signer, tmp_path,
                                                                             capsys):
    import json

    import pyarrow.dataset as pads

    from ntf_ray.cli import main
    from ntf_ray.scan.table import PROVENANCE_COLUMNS
    from tests.conftest import save_random_detector

    folder, expected = images
    model = save_random_detector(str(tmp_path / "model"))
    trust = tmp_path / "trust.pem"
    trust.write_text(signer.root_pem)
    out = tmp_path / "scores"
    assert main(["scan", "--input", str(folder), "--model", model, "--output", str(out), "--run-id", "claims",
                 "--c2pa-trust", str(trust)]) == 0
    capsys.readouterr()
    rows = {r["uri"].rsplit("/", 1)[1]: r
            for r in pads.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()}
    assert set(rows) == set(expected)
    for name, want in expected.items():
        row = rows[name]
        assert row["error"] is None and 0.0 <= row["score"] <= 1.0, row  # every one scored, whatever it claims
        if want.get("c2pa_state") == "untrusted":  # its signer is on the trust list given
            want = {**want, "c2pa_state": "trusted"}
        for field, value in want.items():
            assert row[field] == value, (name, field, row)
        assert row["provenance_problem"] is None, row

    (summary_file,) = out.glob("dt=*/run_id=claims/_summary.json")
    summary = json.loads(summary_file.read_text())["provenance"]
    declared = [w["declared_source"] for w in expected.values() if w.get("declared_source")]
    assert summary["declared_sources"] == {s: declared.count(s) for s in set(declared)}
    assert summary["c2pa_states"] == {"trusted": 3, "mismatched": 2, "invalid": 1} and summary["c2pa"] == "read"

    # without provenance: the same scores, the columns null
    assert main(["scan", "--input", str(folder), "--model", model, "--output", str(tmp_path / "bare"),
                 "--run-id", "bare", "--no-provenance"]) == 0
    capsys.readouterr()
    bare = pads.dataset(str(tmp_path / "bare"), format="parquet", partitioning="hive").to_table()
    assert all(bare.column(c).null_count == bare.num_rows for c in PROVENANCE_COLUMNS)

    # `score` prints the same fields for one file
    assert main(["score", "--model", model, str(folder / "xmp-ai.jpg")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: line[k] for k in PROVENANCE_COLUMNS} == {k: rows["xmp-ai.jpg"][k] for k in PROVENANCE_COLUMNS}
