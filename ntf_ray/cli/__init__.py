"""``ntf-ray`` command line: the parser of every command, and how a command runs (its output
folder checked first, its session's logs, its errors as one line). Every entry point is
``main(argv=None)``; each command lives in the module of its kind (``train``, ``scan``, ``review``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ntf_ray import __version__
from ntf_ray.cli import review, scan, train
from ntf_ray.cli.arguments import Parser, endpoint_parser
from ntf_ray.ray_edge import console

log = logging.getLogger("ntf_ray")
#: The commands that run on Ray, and the argument naming the folder their log file goes under
#: (``FOLDER/_logs``, see ``ntf_ray.ray_edge.console``).
LOG_FOLDER = {"train": "output", "evaluate": "output", "calibrate": "output", "scan": "output",
              "moderate": "output", "demo": "work"}
#: The folder each command writes into, checked before any work starts (``_check_output_folder``).
OUTPUT_FOLDER = {**LOG_FOLDER, "explain": "output", "report": "output", "synth": "out"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ntf-ray", description="Find AI-generated images at scale (Natural Trace Forensics on Ray).")
    p.add_argument("--version", action="version", version=f"ntf-ray {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="ntf-ray's debug lines, and Ray's own logs on the terminal too (they always go to "
                        "OUTPUT/_logs); -vv: the storage libraries' debug lines too (botocore, s3fs, urllib3). "
                        "Credentials are redacted everywhere")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    endpoint = [endpoint_parser()]

    for add in (train.add_index, train.add_synth, train.add_demo, train.add_train, scan.add_scan, scan.add_moderate,
                review.add_evaluate, review.add_calibrate, review.add_explain, review.add_report, scan.add_score):
        add(sub, endpoint)
    return p


def _check_output_folder(uri: str) -> None:
    """Refuse a local output folder that is, or lies below, something other than a folder: a
    write there fails with NotADirectoryError only after the work is done."""
    from ntf_ray import storage

    local = storage.local_path(uri)
    if local is None:  # an object store has no folders to be in the way
        return
    path = Path(local)
    for at in (path, *path.parents):
        if at.is_dir():
            return
        if at.exists() or at.is_symlink():  # a file, a device, a dangling link
            raise ValueError(f"output folder {uri}: {at} is not a folder")


def _check_device(name: str | None) -> None:
    """``--device cuda`` on a machine without one: refused before the model is read."""
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")


def _storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the S3 client failing as a whole (no connection to the endpoint, no
    credentials, a timeout), not one object's error."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no S3 client installed: nothing of it can have failed
        return False
    return isinstance(exc, BotoCoreError)


def _say(exc: BaseException, endpoint: str | None) -> str:
    """An error as one line: no secrets, and not the endpoint, which may name internal hosts."""
    from ntf_ray.storage import read_error, redact

    if _storage_failure(exc):
        return read_error(exc)  # "read: EndpointConnectionError: Could not connect to the endpoint URL: <endpoint>"
    text = " ".join(redact(str(exc)).split())
    return text.replace(endpoint, "<endpoint>") if endpoint else text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    with console.terminal(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ntf_ray.errors import DetectorFault, RunStalled
    from ntf_ray.storage import StorageOptions

    # Resolved once, here: an absent --s3-endpoint means AWS_ENDPOINT_URL for every command.
    args.storage_options = StorageOptions.resolve(getattr(args, "s3_endpoint", None))
    endpoint = args.storage_options.endpoint_url
    folder = LOG_FOLDER.get(args.command)
    session = None
    try:
        _check_device(getattr(args, "device", None))
        if args.command in OUTPUT_FOLDER:
            _check_output_folder(getattr(args, OUTPUT_FOLDER[args.command]))
        if folder is None:
            return args.func(args)
        with console.session(getattr(args, folder), args.command, verbose=args.verbose,
                             options=args.storage_options) as session:
            return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 2
    except (DetectorFault, RunStalled) as exc:  # a broken detector, a stuck run: one line, not a traceback
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _storage_failure(exc):
            raise
        print(f"ntf-ray {args.command}: error: {_say(exc, endpoint)}", file=sys.stderr)
        return 1
    finally:
        if session is not None and session.kept:
            print(f"Ray's logs of this run: {session.kept}{'' if args.verbose else ' (-v shows them here)'}",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
