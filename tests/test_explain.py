"""Grad-CAM++ maps: on a detector trained here to find a pasted patch, the map's mass sits on the patch."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ntf_ray.cli import main
from ntf_ray.detector.artifact import save_artifact
from ntf_ray.detector.explain import cam_maps
from ntf_ray.nn.model import Detector

pytest.importorskip("pytorch_grad_cam")

SIZE, PATCH = 64, 16


def _real(g: torch.Generator, n: int) -> torch.Tensor:
    """Smooth 'photos': 8x8 noise upsampled, no fine detail anywhere."""
    low = torch.rand((n, 3, 8, 8), generator=g) * 255
    return F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False).round().to(torch.uint8)


def _paste(images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A 16 px patch of pixel noise (a generator's fine traces) pasted at a random place in each."""
    out, where = images.clone(), []
    for img in out:
        top, left = (int(v) for v in torch.randint(0, SIZE - PATCH + 1, (2,), generator=g))
        img[:, top : top + PATCH, left : left + PATCH] = torch.randint(0, 256, (3, PATCH, PATCH), generator=g,
                                                                        dtype=torch.uint8)
        where.append((top, left))
    return out, where


@pytest.fixture(scope="module")
def patch_detector(tmp_path_factory):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    det = Detector.build("tiny")
    opt = torch.optim.Adam(det.parameters(), lr=3e-3)
    det.train()
    for _ in range(50):
        real = _real(g, 16)
        fake, _ = _paste(_real(g, 16), g)
        x = torch.cat([real, fake]).float() / 255
        y = torch.cat([torch.zeros(16), torch.ones(16)])
        loss = F.binary_cross_entropy_with_logits(det(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    uri = str(tmp_path_factory.mktemp("explain") / "model")
    save_artifact(uri, det, input_size=SIZE)
    return det, uri


def test_the_map_puts_its_mass_on_the_pasted_patch(patch_detector):
    det, _ = patch_detector
    g = torch.Generator().manual_seed(7)
    fakes, where = _paste(_real(g, 24), g)
    scores, maps = cam_maps(det, fakes)
    real_scores, _ = cam_maps(det, _real(g, 24))
    assert scores.mean() > 0.9 and real_scores.mean() < 0.1  # the detector learnt the task
    share = PATCH * PATCH / SIZE ** 2  # 6.25% of the area
    on_patch = np.array([m[t : t + PATCH, l : l + PATCH].sum() / max(m.sum(), 1e-9) for m, (t, l) in zip(maps, where)])
    print(f"Grad-CAM++ mass on the patch: mean {on_patch.mean():.1%}, min {on_patch.min():.1%}; its area {share:.2%}")
    assert np.median(on_patch) > 3 * share and (on_patch > share).mean() >= 0.9


def test_explain_writes_an_overlay_per_image_with_its_score_and_reports_what_it_cannot_read(patch_detector, tmp_path,
                                                                                           capsys):
    _, uri = patch_detector
    g = torch.Generator().manual_seed(8)
    fake, _ = _paste(_real(g, 1), g)
    paths = []
    for name, img in (("fake.png", fake[0]), ("real.png", _real(g, 1)[0])):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    out = tmp_path / "maps"
    assert main(["explain", "--model", uri, *paths, str(tmp_path / "junk.png"), "--output", str(out),
                 "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] is None for r in rows] == [True, True, False] and rows[2]["error"].startswith("decode")
    for r in rows[:2]:
        png = Image.open(io.BytesIO(open(r["heatmap"], "rb").read()))
        assert png.size == (2 * SIZE, SIZE) and f"score{r['score']:.3f}" in r["heatmap"]
        assert f"{r['score']:.4f}" in png.text["Description"]
    assert rows[0]["score"] > 0.5 > rows[1]["score"]


def patch_model_for_report(tmp_path) -> str:
    """A tiny detector artifact for the report's heatmaps (untrained: the report test is about pictures)."""
    torch.manual_seed(0)
    uri = str(tmp_path / "model")
    save_artifact(uri, Detector.build("tiny").eval(), input_size=32)
    return uri


def test_overlays_of_inputs_of_one_name_and_equal_scores_never_overwrite_each_other(tmp_path, capsys):
    uri = patch_model_for_report(tmp_path)
    image = Image.fromarray(_real(torch.Generator().manual_seed(9), 1)[0].permute(1, 2, 0).numpy())
    inputs = []
    for rel in ("0002_x.png", "a/x.png", "b/x.png"):  # one picture: equal scores
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        image.save(tmp_path / rel)
        inputs.append(str(tmp_path / rel))
    out = tmp_path / "maps"
    assert main(["explain", "--model", uri, *inputs, "--output", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["uri"] for r in rows] == inputs and len({r["score"] for r in rows}) == 1
    names = [r["heatmap"].rsplit("/", 1)[-1] for r in rows]
    assert len(set(names)) == 3 and sorted(p.name for p in out.iterdir()) == sorted(names)
    assert names[0].startswith("0001_0002_x_") and names[1].startswith("0002_x_") and names[2].startswith("0003_x_")


def test_explain_caps_what_it_reads(tmp_path, capsys):
    uri = patch_model_for_report(tmp_path)
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(8 * 2**20)
    assert main(["explain", "--model", uri, str(big), "/dev/zero", "--output", str(tmp_path / "maps"),
                 "--device", "cpu", "--max-bytes", "4KiB"]) == 1  # nothing explained
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["error"] for r in rows] == ["too_large: more than 4096 bytes",
                                          "read: not a regular file (a pipe, device or socket is never read)"]
