"""What every command's parser shares: argument types, the options several commands take, and
building a command's spec from its parsed arguments by field name (one place per option: a
spec field and the parser line whose ``dest`` names it)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, TypeVar

from ntf_ray.storage import DEFAULT_MAX_BYTES

Spec = TypeVar("Spec")


def spec_from_args(cls: type[Spec], args: argparse.Namespace, **given: Any) -> Spec:
    """A spec dataclass from parsed arguments: every field whose name the parser set (an
    argument's ``dest``) takes its value, the others keep the spec's default; ``given`` wins."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and f.name not in given and hasattr(args, f.name)}
    return cls(**values, **given)


def default_of(cls: type, name: str) -> Any:
    """A spec field's default, for the help text and default of the argument that sets it."""
    (spec_field,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return spec_field.default


def endpoint_parser() -> argparse.ArgumentParser:
    """The ``--s3-endpoint`` every command that touches storage takes (``parents=[...]``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph, moto); default: AWS_ENDPOINT_URL")
    return p


def add_provenance_arguments(s: argparse.ArgumentParser) -> None:
    """``--no-provenance`` and ``--c2pa-trust``: what each image says of its origin, beside its score."""
    s.add_argument("--no-provenance", dest="provenance", action="store_false",
                   help="do not read what each image says of its origin (C2PA credentials, XMP, PNG text chunks, "
                        "EXIF software); its columns stay null")
    s.add_argument("--c2pa-trust", dest="c2pa_trust", action="append", default=[], metavar="PEM_FILE",
                   help="certificates (PEM) that C2PA signers may chain to, read as a trust list (repeatable); "
                        "without one, every valid credential reads 'untrusted'. Never fetched.")


def add_max_bytes_argument(s: argparse.ArgumentParser, what: str) -> None:
    """``--max-bytes``, one cap for every command that reads images: the scan's default."""
    s.add_argument("--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help=f"{what}; e.g. 1048576, 128MiB or 1GB; default 128MiB")


def add_decoder_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--decoder", choices=("auto", "pil", "nvjpeg", "nvimgcodec"), default="auto",
                   help="pil: every image through the CPU decoder; nvjpeg: plain JPEGs decoded in batches on the "
                        "detector's GPU, everything else on the CPU (scores differ slightly from pil's); "
                        "nvimgcodec: the same on the GPU's hardware JPEG engines, with Pillow's pixels "
                        "(pip install 'ntf-ray[nvimgcodec]'); auto (default): nvimgcodec on GPUs when installed, else "
                        "nvjpeg; pil on CPUs. The table's decoder column says which ran")


def threshold(text: str) -> float:
    """``--threshold``: a score is P(fake), so a decision threshold is a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is a number in [0, 1] (scores are P(fake))")
    return value


def positive_count(text: str) -> int:
    """A count of objects: a whole number >= 1 (0 or -1 would not mean "none" or "all" to a list slice)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def whole_number(least: int, most: int | None = None, what: str = "a whole number"):
    """An argument type: a whole number in ``[least, most]``, else one line that says the range."""
    wanted = f"{what} of at least {least}" if most is None else f"{what} from {least} to {most}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}") from None
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        return value

    parse.__name__ = what
    return parse


def real_number(least: float, *, above: bool = False, most: float | None = None, below: bool = False,
                what: str = "a number"):
    """An argument type: a finite number from ``least`` (excluded with ``above``) to ``most``
    (excluded with ``below``), else one line that says the range."""
    low = f"above {least:g}" if above else f"at least {least:g}"
    high = "" if most is None else f" and {'below' if below else 'at most'} {most:g}"
    wanted = f"{what} {low}{high}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = (value > least if above else value >= least) and value != float("inf")
        if most is not None:
            ok = ok and (value < most if below else value <= most)
        if not ok:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        return value

    parse.__name__ = what
    return parse


#: The argument types of the CLI's numbers, one per kind of quantity.
pixels = whole_number(1, what="a pixel limit")
size = whole_number(8, what="a side in pixels")
count = whole_number(0, what="a count")
seed = whole_number(0, 2**32 - 1, what="a seed")
actors = whole_number(1, what="a number of actors")
workers = whole_number(1, what="a number of workers")
epochs = whole_number(1, what="a number of epochs")
failures = whole_number(-1, what="a number of failures (-1: no limit)")
gpus = real_number(0, what="a number of GPUs")
cpus = real_number(0, what="a number of CPUs")
cpus_reserved = real_number(0, above=True, what="a number of CPUs")
rate = real_number(0, above=True, most=1, below=True, what="a rate")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def seconds_or_never(text: str) -> float | None:
    """A time limit in seconds above 0, or ``never`` (``None``). 0 is refused: it reads as "at
    once" as easily as "never"."""
    if text.strip().lower() == "never":
        return None
    value = seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0, or 'never' (0 meant never "
                                         "before; write 'never')")
    return value


def glob_pattern(text: str) -> str:
    """``--glob``: a pattern that can match a name (an empty one matches nothing: a run that
    scans nothing and says it succeeded)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty pattern matches no name: leave --glob out to scan every object")
    return text


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (``ntf-ray scan: error: ...``), exit 2,
    not the usage of every option first."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def byte_size(text: str) -> int:
    """A byte count: ``4096``, ``128MiB``, ``1.5GB`` (case-insensitive; KiB = 1024, KB = 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and BYTE_UNITS.get(match.group(2).lower())
    if not unit:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes: give e.g. 1048576, 128MiB or 1GB")
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise argparse.ArgumentTypeError("a size must be at least 1 byte")
    return value


BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
