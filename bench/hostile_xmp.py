"""Hostile XMP against ``images.provenance``: what each case reads as, its time and memory.

Each packet rides in a PNG's ``XML:com.adobe.xmp`` text chunk (where Pillow hands it over
whole, unlike a JPEG segment's 64 KiB). Printed per case: the packet's size, the problem the
image gets (its provenance fields stay null), the time ``read_provenance`` took (best of 5)
and the Python heap's peak while it ran (``tracemalloc``).

    python bench/hostile_xmp.py
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntf_ray.images.provenance import read_provenance  # noqa: E402
from tests.provenance_images import HOSTILE_XMP, IPTC, png_bytes, xmp_packet  # noqa: E402


def main() -> None:
    cases = {**HOSTILE_XMP, "benign (for scale)": xmp_packet(IPTC + "digitalCapture", tool="Example Camera")}
    print(f"{'case':<20}{'packet':>12}{'ms':>9}{'peak MiB':>10}  fields / problem")
    for name, packet in cases.items():
        image = png_bytes(1, xmp=packet)
        best = min(_timed(image) for _ in range(5))
        tracemalloc.start()
        got = read_provenance(image)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        fields = (got.provenance, got.declared_source, got.declared_by)
        print(f"{name:<20}{len(packet):>12,}{best * 1e3:>9.2f}{peak:>10.1f}  {fields} / {got.problem}")


def _timed(image: bytes) -> float:
    start = time.perf_counter()
    read_provenance(image)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
