"""Procedural real/fake image sets for the demo, the tests and the benchmarks.

This is *test data*, not a benchmark of real-world accuracy. "Real" images are rendered
directly at full resolution with natural-image statistics (a 1/f^alpha power spectrum with
correlated colour, soft-edged shapes, gratings, a lighting gradient and camera-like sensor
noise). "Fake" images render the same kind of scene at a lower resolution and upsample it
to full size with a randomised upsampling generator, which leaves the periodic, pixel-level
traces that NTF-style detectors learn:

* ``tconv``: stride-2 transposed convolutions (random 3x3 / 4x4 kernels per channel):
  checkerboard artefacts, peaks at the 2-periodic spectral positions.
* ``nnconv``: nearest-neighbour x2 then a random 3x3 convolution: 2x2 block structure,
  (almost) no energy on the Nyquist lines.
* ``bilinear_conv``: bilinear x2 then a random 3x3 convolution: a smooth, faintly
  2-periodic interpolation.

Each family upsamples by x2 or x4 (one or two stages, chosen per image), with a
StyleGAN-like noise injection, a bias and a mild nonlinearity after every stage. All of
them lack the full-resolution detail and sensor noise of the reals above the
low-resolution band, which is part of the trace. These three are ``GENERATORS``, the
default set.

That shared lack of high frequencies is a shortcut: a detector trained on two of them
finds the third by it. The ``FULL_RES_GENERATORS`` (selectable, not in the default set)
render the scene at full resolution like the reals, so the high-frequency content matches
the reals', and differ from them, and from each other, by one trace each:

* ``fingerprint``: the reals' camera noise plus a periodic residual (a random tile of
  period 4-16 px per axis, drawn per image, std 4-10 levels): GAN-like spectral peaks.
* ``noise_shape``: the camera noise replaced by decoder-like noise: spatially coloured
  (a random low-/high-pass or oriented 3-tap filter per axis), (almost) no correlation
  between channels and std 4-9 levels (the reals': white, correlated, 0.8-3).

The traces are larger than the reals' sensor noise because the scenes' own pixel-level
texture is about ten times that noise; they are still hidden in it (see the tests for
statistics that do and do not tell them apart). In a leave-one-generator-out run over
``ALL_GENERATORS`` a held-out full-resolution family is not found by the missing high
frequencies, only by departing from what the reals have in common. ``FAMILY_KIND`` maps
each family to ``"upsampling"`` or ``"full_res"``.

Fakes are re-toned to the same luminance mean and standard deviation as drawn for a real
image, so a detector has to key on local pixel structure rather than global statistics.

The output is a CNNDetection-style folder::

    OUT/<split>/<generator>/0_real/real_000000.png
    OUT/<split>/<generator>/1_fake/fake_000000.png

Everything is deterministic by ``seed``: each image has its own generator seeded from
``(seed, split, label, index)``, and PNG/JPEG files carry no metadata, so equal arguments
give byte-identical files.
"""

from __future__ import annotations

# "X as X": private names re-exported for the tests
from ntf_ray.synth.dataset import _image_rng as _image_rng
from ntf_ray.synth.dataset import make_synthetic
from ntf_ray.synth.families import (
    ALL_GENERATORS,
    FAMILY_KIND,
    FULL_RES_GENERATORS,
    GENERATORS,
    KNOWN_GENERATORS,
    render_fake,
    render_real,
)
from ntf_ray.synth.headroom import HEADROOM_GENERATORS
from ntf_ray.synth.upsampling import _poly_up2 as _poly_up2
from ntf_ray.synth.upsampling import _upsample as _upsample

__all__ = [
    "ALL_GENERATORS",
    "FAMILY_KIND",
    "FULL_RES_GENERATORS",
    "GENERATORS",
    "HEADROOM_GENERATORS",
    "KNOWN_GENERATORS",
    "make_synthetic",
    "render_fake",
    "render_real",
]
