"""Networks: shapes, heads, weights loading, the Detector."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ntf_ray.nn.model import (
    BACKBONES,
    Classifier,
    Detector,
    ProjectionHead,
    Stage1Model,
    Stage2Model,
    build_encoder,
)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_shapes(backbone):
    torch.manual_seed(0)
    enc = build_encoder(backbone, "none")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    stage1 = Stage1Model(enc, proj_dim=128).eval()
    z_hom, z_het = stage1(x)
    assert z_hom.shape == z_het.shape == (2, 128)
    stage2 = Stage2Model.from_stage1(stage1).eval()
    assert stage2.encoder is enc and stage2.f_hom is stage1.f_hom
    assert stage2.scl_projection(enc(x)).shape == (2, 128)
    assert stage2.detector().embed(x).shape == (2, BACKBONES[backbone])
    assert stage2.detector()(x).shape == (2,)
    assert enc(x).shape == (2, BACKBONES[backbone])


def test_projection_head_is_two_layer_mlp():
    head = ProjectionHead(8, 4)
    layers = list(head.net)
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]
    assert layers[0].in_features == layers[0].out_features == 8 and layers[2].out_features == 4


def test_uint8_and_unit_float_inputs_agree():
    enc = build_encoder("tiny").eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(enc(x), enc(x.float() / 255.0))


def test_classifier_is_an_affine_map_in_eval_mode():
    torch.manual_seed(0)
    clf = Classifier(6)
    clf.train()
    clf(torch.randn(64, 6) * 3 + 1)  # running statistics move away from (0, 1)
    clf.eval()
    e = torch.randn(5, 6)
    norm = clf.norm
    w = clf.fc.weight / torch.sqrt(norm.running_var + norm.eps)
    b = clf.fc.bias - (w * norm.running_mean).sum()
    torch.testing.assert_close(clf(e), e @ w.T + b)


def test_weights_file_loads_and_mismatch_is_clear(tmp_path):
    src = build_encoder("tiny")
    torch.nn.init.constant_(src.trunk.stem[0][0].weight, 0.25)
    path = tmp_path / "trunk.safetensors"
    save_file({k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(path))
    loaded = build_encoder("tiny", str(path))
    assert torch.equal(loaded.trunk.stem[0][0].weight, src.trunk.stem[0][0].weight)
    pth = tmp_path / "trunk.pth"
    torch.save(src.trunk.state_dict(), pth)
    assert torch.equal(build_encoder("tiny", str(pth)).trunk.stem[0][0].weight, src.trunk.stem[0][0].weight)
    with pytest.raises(ValueError, match="does not fit backbone resnet18"):
        build_encoder("resnet18", str(path))
    with pytest.raises(FileNotFoundError):
        build_encoder("tiny", str(tmp_path / "missing.safetensors"))


def test_resnet_weights_file_with_fc_keys(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)  # a torchvision state dict, fc included
    enc = build_encoder("resnet18", str(path))
    assert torch.equal(enc.trunk.conv1.weight, net.conv1.weight)


def test_unknown_backbone_and_tiny_imagenet():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_encoder("vit")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_encoder("tiny", "imagenet")


def test_imagenet_without_network_is_a_clear_error(monkeypatch):
    import torchvision

    def offline(self, *a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pretrained=none"):
        build_encoder("resnet18", "imagenet")


def test_detector_build_matches_stage2_detector_keys():
    stage2 = Stage2Model.from_stage1(Stage1Model(build_encoder("tiny")))
    assert set(stage2.detector().state_dict()) == set(Detector.build("tiny").state_dict())
