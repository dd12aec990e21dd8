import sys

from ntf_ray.cli import main

sys.exit(main())
