"""Entry point for `ray job submit --working-dir . -- python jobs/evaluate.py --model ... --manifest ... --output ...`.

The same arguments as `ntf-ray evaluate`; inside a Ray job it joins the job's cluster.
"""

import sys
from pathlib import Path

# The job's working directory is the project checkout; make the package importable from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntf_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
