"""ntf-ray: find AI-generated images at scale with Natural Trace Forensics (NTF).

The core (decode, transforms, model, losses, engine, artifact, scoring, metrics) is pure
PyTorch and runs in one process; Ray appears only in ``ray_*.py``, ``cli.py`` and ``jobs/``.
"""

__version__ = "0.1.0"
