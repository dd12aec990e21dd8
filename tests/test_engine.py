"""Training loops and checkpoints, on the tiny backbone and CPU."""

from __future__ import annotations

import json

import pytest
import torch

from ntf_ray.nn.model import Stage1Model, Stage2Model, build_encoder
from ntf_ray.training.engine import (
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    prepare_stage2,
    save_checkpoint,
    train_stage1_epoch,
    train_stage2_epoch,
)


def stage1_batches(n_batches=3, b=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"view1": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
         "view2": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)}
        for _ in range(n_batches)
    ]


def stage2_batches(n_batches=3, b=8, size=32, crop=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
         "crop": torch.randint(0, 256, (b, 3, crop, crop), dtype=torch.uint8, generator=g),
         "label": torch.tensor([i % 2 for i in range(b)])}
        for _ in range(n_batches)
    ]


def tiny_stage1(seed=0):
    torch.manual_seed(seed)
    return Stage1Model(build_encoder("tiny"), proj_dim=16)


def test_stage1_epoch_trains_and_reports():
    model = tiny_stage1()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model.parameters(), lr=0.05)
    reports = []
    m = train_stage1_epoch(model, stage1_batches(), opt, epoch=0, report=reports.append, log_every=0)
    assert reports == [m]
    assert m["stage"] == 1 and m["epoch"] == 0 and m["images"] == 18 and m["steps"] == 3
    for key in ("loss", "hom", "het", "orth", "lr", "images_per_s", "views_per_s"):
        assert key in m and m[key] == m[key]  # present and not NaN
    assert m["loss"] == pytest.approx(m["hom"] + m["het"] + 0.1 * m["orth"], rel=1e-5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("f_hom.") for k in changed) and any(k.startswith("f_het.") for k in changed)


def test_stage1_loss_decreases_on_a_fixed_batch():
    model = tiny_stage1()
    opt = make_optimizer(model.parameters(), lr=0.05, weight_decay=0.0)
    batch = stage1_batches(1)
    first = train_stage1_epoch(model, batch, opt, epoch=0, log_every=0)["loss"]
    for epoch in range(1, 15):
        last = train_stage1_epoch(model, batch, opt, epoch=epoch, log_every=0)["loss"]
    assert last < first


def test_stage2_epoch_keeps_encoder_and_f_hom_bit_identical():
    stage1 = tiny_stage1()
    # Give batch-norm running statistics non-default values, as after stage 1.
    train_stage1_epoch(stage1, stage1_batches(), make_optimizer(stage1.parameters(), lr=0.05), epoch=0, log_every=0)
    model = Stage2Model.from_stage1(stage1, proj_dim=16)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("encoder.", "f_hom."))}
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("transfer.", "project.", "classifier."))}
    params = prepare_stage2(model)
    opt = make_optimizer(params, lr=0.1)
    m = train_stage2_epoch(model, stage2_batches(), opt, epoch=0, log_every=0)
    state = model.state_dict()
    for k, v in frozen.items():  # weights and batch-norm buffers alike
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(state[k], v) for k, v in heads.items() if k.startswith("project."))
    assert any(not torch.equal(state[k], v) for k, v in heads.items() if k.startswith("transfer.fc"))
    assert any(not torch.equal(state[k], v) for k, v in heads.items() if k.startswith("classifier.fc"))
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(not p.requires_grad for p in model.f_hom.parameters())
    assert m["loss"] == pytest.approx(m["scl"] + 0.5 * m["ce"], rel=1e-5)


def test_stage2_without_scl_and_with_encoder_training():
    model = Stage2Model.from_stage1(tiny_stage1(), proj_dim=16)
    enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    params = prepare_stage2(model, train_encoder=True)
    m = train_stage2_epoch(model, stage2_batches(), make_optimizer(params, lr=0.1), epoch=0,
                           use_scl=False, train_encoder=True, log_every=0)
    assert m["scl"] == 0.0 and m["loss"] == pytest.approx(0.5 * m["ce"], rel=1e-5)
    assert any(not torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())


def test_empty_batches_are_skipped():
    model = tiny_stage1()
    batches = [{"dropped": 6}] + stage1_batches(1)
    m = train_stage1_epoch(model, batches, make_optimizer(model.parameters(), lr=0.01), epoch=0, log_every=0)
    assert m["steps"] == 1 and m["images"] == 6


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_schedules(schedule):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], lr=0.1)
    sched = make_scheduler(opt, epochs=10, schedule=schedule, step_size=3, step_gamma=0.5, warmup_epochs=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 3) and lrs[1] == pytest.approx(0.2 / 3)  # warm-up
    assert lrs[2] == pytest.approx(0.1)
    if schedule == "cosine":
        assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    elif schedule == "step":
        assert lrs[5] == pytest.approx(0.05) and lrs[8] == pytest.approx(0.025)
    else:
        assert lrs[2:] == [pytest.approx(0.1)] * 8


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    cfg = {"backbone": "tiny", "lr": 0.05}
    model = tiny_stage1(seed=1)
    opt = make_optimizer(model.parameters(), lr=0.05)
    sched = make_scheduler(opt, epochs=4)
    batches = stage1_batches(2)
    train_stage1_epoch(model, batches, opt, epoch=0, log_every=0)
    sched.step()
    save_checkpoint(tmp_path / "ckpt", models={"stage1": model}, optimizer=opt, scheduler=sched, epoch=1, config=cfg,
                    extra={"note": "after epoch 0"})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"models.safetensors", "optimizer.safetensors", "checkpoint.json"}

    # Continue the original for one more epoch ...
    torch.manual_seed(5)
    train_stage1_epoch(model, batches, opt, epoch=1, log_every=0)
    # ... and a fresh copy restored from the checkpoint: the same weights come out.
    model2 = tiny_stage1(seed=99)
    opt2 = make_optimizer(model2.parameters(), lr=0.05)
    sched2 = make_scheduler(opt2, epochs=4)
    meta = load_checkpoint(tmp_path / "ckpt", models={"stage1": model2}, optimizer=opt2, scheduler=sched2)
    assert meta["epoch"] == 1 and meta["config"] == cfg and meta["extra"] == {"note": "after epoch 0"}
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    torch.manual_seed(5)
    train_stage1_epoch(model2, batches, opt2, epoch=1, log_every=0)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_checkpoint_is_not_a_pickle_and_rejects_other_formats(tmp_path):
    model = tiny_stage1()
    save_checkpoint(tmp_path, models={"stage1": model}, epoch=3, config={})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 3
    assert (tmp_path / "models.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle
    meta = json.loads((tmp_path / "checkpoint.json").read_text())
    meta["format"] = 99
    (tmp_path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path, models={"stage1": model})
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", models={"stage1": model})


def test_stage2_skips_single_image_batches():
    model = Stage2Model.from_stage1(tiny_stage1(), proj_dim=16)
    params = prepare_stage2(model)
    one = stage2_batches(1, b=1)
    m = train_stage2_epoch(model, one + stage2_batches(1), make_optimizer(params, lr=0.1), epoch=0, log_every=0)
    assert m["steps"] == 1 and m["images"] == 8


# ---------------------------------------------------------------- variants


def _stage2_after(variant: str, *, eta: float = 0.5, seed: int = 0):
    """A trained stage 1, then one stage-2 epoch of ``variant``, all seeds equal."""
    from ntf_ray.training.config import load_config
    from ntf_ray.training.stages import STAGE1, STAGE2, build_stage1, build_stage2

    cfg = load_config(None, {"backbone": "tiny", "proj_dim": 16, "variant": variant, "eta": eta})
    torch.manual_seed(seed)
    stage1 = build_stage1(cfg) if variant != "bce" else None
    if stage1 is not None:
        STAGE1.epoch(stage1, stage1_batches(), make_optimizer(stage1.parameters(), lr=0.05), cfg, epoch=0,
                     log_every=0)
    torch.manual_seed(seed + 1)
    model = build_stage2(cfg, stage1)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    params = prepare_stage2(model, train_encoder=variant == "bce")
    torch.manual_seed(seed + 2)
    STAGE2.epoch(model, stage2_batches(), make_optimizer(params, lr=0.1), cfg, epoch=0, log_every=0)
    return model, encoder_before


def _scores(model) -> torch.Tensor:
    x = stage2_batches(1, b=8, seed=9)[0]["image"]
    with torch.no_grad():
        return torch.sigmoid(model.detector().eval()(x))


def test_scl_and_eta_change_the_detector():
    """SCL trains the layer the classifier reads: NTF, its BCE-only ablation and another eta differ."""
    ntf, _ = _stage2_after("ntf")
    no_scl, _ = _stage2_after("no-scl")
    other_eta, _ = _stage2_after("ntf", eta=5.0)
    again, _ = _stage2_after("ntf")
    for name in ("classifier.fc.weight", "transfer.fc.weight"):
        a, b, c, d = (m.state_dict()[name] for m in (ntf, no_scl, other_eta, again))
        assert torch.equal(a, d), name  # the comparison is deterministic
        assert not torch.allclose(a, b), name
        assert not torch.allclose(a, c), name
    s_ntf, s_no_scl, s_eta = _scores(ntf), _scores(no_scl), _scores(other_eta)
    assert (s_ntf - s_no_scl).abs().max() > 1e-4 and (s_ntf - s_eta).abs().max() > 1e-4


@pytest.mark.parametrize("variant", ["ntf", "no-orth", "no-het-orth", "no-scl", "linear-probe", "bce"])
def test_encoder_is_frozen_in_every_variant_but_bce(variant):
    model, before = _stage2_after(variant)
    after = model.encoder.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    if variant == "bce":
        assert changed, "the Wang2020 baseline trains its encoder end to end"
    else:
        assert changed == []
    assert (model.transfer is None) == (variant in ("linear-probe", "bce"))


def test_scl_crops_leave_the_transfer_layers_statistics_to_the_224_crops():
    """t's batch norm keeps running statistics of the classifier's crops only: SCL crops
    (another scale of features) normalise with their own batch but update nothing."""
    from ntf_ray.nn.model import TransferLayer

    model = Stage2Model.from_stage1(tiny_stage1(), proj_dim=16)
    model.train()
    e_full, e_small = torch.randn(8, model.encoder.dim), 5 + 3 * torch.randn(8, model.encoder.dim)
    assert isinstance(model.transfer, TransferLayer)
    model.logits(e_full)
    mean_after_full = model.transfer.norm.running_mean.clone()
    model.scl_projection(e_small)
    assert torch.equal(model.transfer.norm.running_mean, mean_after_full)
    assert model.transfer.norm.momentum == 0.1  # restored


def test_stage1_reports_the_spread_of_homogeneous_features(caplog):
    model = tiny_stage1()
    m = train_stage1_epoch(model, stage1_batches(), make_optimizer(model.parameters(), lr=0.01), epoch=0, log_every=0)
    assert 0.0 < m["hom_spread"] <= 2.0
    # A constant f_hom (what L_hom alone drives towards) has spread 0, and stage 1 says so.
    last = model.f_hom.net[2]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.fill_(1.0)
    with caplog.at_level("WARNING"):
        m = train_stage1_epoch(model, stage1_batches(), make_optimizer(model.parameters(), lr=0.0), epoch=1,
                               log_every=0)
    assert m["hom_spread"] < 1e-6
    assert "collapsed" in caplog.text


def test_a_non_finite_loss_stops_training_before_the_step_and_leaves_the_weights_as_they_were():
    from ntf_ray.training.engine import NonFiniteLoss

    model = tiny_stage1()
    opt = make_optimizer(model.parameters(), lr=0.05)
    train_stage1_epoch(model, stage1_batches(n_batches=1), opt, epoch=0, log_every=0)
    with torch.no_grad():  # a diverged f_hom: every projection, and so the loss, is NaN
        model.f_hom.net[0].weight.fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(NonFiniteLoss, match="stage 1 epoch 1 step 0: the loss is nan"):
        train_stage1_epoch(model, stage1_batches(n_batches=2), opt, epoch=1, log_every=0)
    after = dict(model.named_parameters())
    # no optimizer step was taken on the NaN loss (SGD with momentum would have moved every weight)
    assert all(torch.allclose(after[k].float(), v.float(), rtol=0, atol=0, equal_nan=True) for k, v in before.items())


def test_a_non_finite_stage2_loss_stops_training():
    from ntf_ray.training.engine import NonFiniteLoss

    model = Stage2Model.from_stage1(tiny_stage1(), proj_dim=16)
    params = prepare_stage2(model)
    with torch.no_grad():
        next(model.classifier.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLoss, match="stage 2 epoch 0 step 0"):
        train_stage2_epoch(model, stage2_batches(n_batches=1), make_optimizer(params, lr=0.01), epoch=0, log_every=0)
