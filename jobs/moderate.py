"""Entry point for a scheduler: `ray job submit --working-dir . -- python jobs/moderate.py --input ... --model ... --output ...`.

The same arguments as `ntf-ray moderate` (a scan with --incremental): each run scores only
the objects that are new or changed since the completed runs under --output.
"""

import sys
from pathlib import Path

# The job's working directory is the project checkout; make the package importable from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntf_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["moderate", *sys.argv[1:]]))
