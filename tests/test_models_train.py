"""Model factory, checkpoints and the shared training loop on real ELPV images."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.datasets import open_dataset
from edge_agent.models import ARCHITECTURES, CheckpointMeta, ModelSpec, build_model, load_checkpoint, save_checkpoint
from edge_agent.train import TrainConfig, evaluate, normalization_of, train_model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("size", [32, 96])
def test_every_architecture_takes_small_grayscale_inputs(arch, size):
    model = build_model(ModelSpec(arch=arch, num_classes=2, image_size=size)).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 2)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'vgg99'"):
        build_model(ModelSpec(arch="vgg99", num_classes=2))


def test_checkpoint_round_trip_loads_weights_only(tmp_path):
    spec = ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32)
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, CheckpointMeta(spec=spec, class_names=["a", "b"]))
    payload = torch.load(path, weights_only=True)  # the contract: no pickled code in a checkpoint
    assert payload["meta"]["spec"]["arch"] == "tiny_cnn"
    loaded, meta = load_checkpoint(path)
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta.class_names == ["a", "b"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable edgeloop checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def generic(elpv_small):
    dataset = open_dataset(elpv_small / "generic")
    return dataset.load_split("train"), dataset.load_split("val")


def _train(generic, **overrides):
    train, val = generic
    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "threads": 1, "policy": "strong", **overrides})
    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32), seed=config.seed)
    epochs = []
    result = train_model(model, train, val, config, normalization_of(train), on_epoch=epochs.append)
    return model, result, epochs


def test_training_is_deterministic_under_a_seed(generic):
    _, first, _ = _train(generic)
    _, second, _ = _train(generic)
    assert [m.train_loss for m in first.history] == [m.train_loss for m in second.history]
    _, other, _ = _train(generic, seed=7)
    assert [m.train_loss for m in other.history] != [m.train_loss for m in first.history]


def test_training_reports_each_epoch_and_keeps_the_best_weights(generic):
    model, result, epochs = _train(generic)
    assert [m.epoch for m in epochs] == [1, 2, 3]
    assert result.best_val_acc == max(m.val_acc for m in epochs)
    train, val = generic
    accuracy, _ = evaluate(model, val, normalization_of(train))
    assert accuracy == pytest.approx(result.best_val_acc)  # the model ends holding the best epoch


def test_keep_last_ends_on_the_last_epoch(generic):
    model, result, epochs = _train(generic, keep="last")
    train, val = generic
    assert result.best_epoch == 3 and result.best_val_acc == epochs[-1].val_acc
    assert evaluate(model, val, normalization_of(train))[0] == pytest.approx(epochs[-1].val_acc)


def test_bf16_autocast_trains_where_asked_and_auto_follows_the_cpu(generic):
    from edge_agent.train import bf16_native, uses_bf16

    _, result, _ = _train(generic, precision="bf16")
    assert all(np.isfinite(m.train_loss) for m in result.history)
    assert uses_bf16(TrainConfig(precision="auto")) == bf16_native()
    assert not uses_bf16(TrainConfig(precision="fp32"))


def test_ema_returns_the_averaged_weights_without_changing_the_trajectory(generic):
    raw_model, raw, _ = _train(generic, keep="last", policy="none")
    ema_model, ema, epochs = _train(generic, keep="last", policy="none", ema_decay=0.9)
    # the average follows training, it does not steer it: the same losses step for step
    assert [m.train_loss for m in ema.history] == pytest.approx([m.train_loss for m in raw.history])
    raw_weights, ema_weights = raw_model.state_dict(), ema_model.state_dict()
    assert any(not torch.equal(raw_weights[k], ema_weights[k]) for k in raw_weights if raw_weights[k].is_floating_point())
    train, val = generic
    # what was validated each epoch is what is returned: the averaged model
    assert evaluate(ema_model, val, normalization_of(train))[0] == pytest.approx(epochs[-1].val_acc)


def test_class_weighted_loss_weights_each_class_by_its_inverse_share(generic):
    from edge_agent.datasets import ArraySet
    from edge_agent.train import _class_weights

    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32))
    skewed = ArraySet(np.zeros((4, 32, 32), np.uint8), np.array([0, 0, 0, 1]))
    assert _class_weights(skewed, TrainConfig(class_balance="weighted"), model).tolist() == pytest.approx([2 / 3, 2])
    assert _class_weights(skewed, TrainConfig(), model) is None
    _, plain, _ = _train(generic, policy="none")
    _, weighted, _ = _train(generic, policy="none", class_balance="weighted")
    assert [m.train_loss for m in weighted.history] != [m.train_loss for m in plain.history]


def test_ensemble_weights_stay_uniform_unless_leaving_members_out_clearly_wins():
    from edge_agent.ensemble import fit_weights

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    right, wrong = np.eye(2)[labels] * 0.8 + 0.1, np.eye(2)[1 - labels] * 0.8 + 0.1
    near = right.copy()
    near[:1] = wrong[:1]  # a member one image worse than another: not a reason to drop it
    assert fit_weights(np.stack([right, near, right], axis=1), labels).weights == pytest.approx([1 / 3] * 3)
    # one member wrong everywhere drags the vote down by far more than two images: it is left out
    fit = fit_weights(np.stack([right, wrong, wrong], axis=1), labels)
    assert fit.weights == pytest.approx([1, 0, 0]) and fit.val_accuracy == 1.0


def test_time_budget_and_stop_callback_end_training_early(generic):
    train, val = generic
    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32))
    started = time.monotonic()
    result = train_model(model, train, val, TrainConfig(epochs=500, batch_size=8, threads=1, time_budget_s=1.0),
                         normalization_of(train))
    assert result.stopped_early and len(result.history) < 500
    assert time.monotonic() - started < 30
    calls = iter(range(1000))
    result = train_model(model, train, val, TrainConfig(epochs=50, batch_size=8, threads=1),
                         normalization_of(train), should_stop=lambda: next(calls) >= 3)
    assert result.stopped_early and len(result.history) == 1


def test_fine_tuning_learns_the_training_set(generic):
    """A sanity check that the loop optimises: more epochs fit the training data better."""
    train, val = generic
    model = build_model(ModelSpec(arch="tiny_cnn", num_classes=2, image_size=32))
    result = train_model(model, train, val, TrainConfig(epochs=12, batch_size=16, threads=1, policy="none", lr=5e-3),
                         normalization_of(train))
    assert result.history[-1].train_loss < result.history[0].train_loss
    majority = max(np.mean(train.labels), 1 - np.mean(train.labels))
    assert result.history[-1].train_acc > majority


@pytest.mark.parametrize("name", ["flips", "contrast", "geometric", "noise", "strong"])
def test_augmentation_policies_keep_shape_and_change_pixels(name, generic):
    from edge_agent.augment import build_policy

    images = generic[0].images[:8]
    policy = build_policy(name, seed=3)
    out = [policy(image) for image in images]
    assert all(o.shape == images[0].shape and o.dtype == np.uint8 for o in out)
    assert any(not np.array_equal(o, i) for o, i in zip(out, images))  # every policy does something


def test_unknown_policy_is_a_clear_error():
    from edge_agent.augment import build_policy

    with pytest.raises(ValueError, match="unknown augmentation policy 'sepia'"):
        build_policy("sepia")


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_a_run_of_a_few_steps_trains_with_every_schedule(generic, steps):
    """A tiny dataset or a first search rung can mean 4 steps in all: OneCycleLR once divided by zero there."""
    train, _ = generic
    batch = -(-len(train) // steps)
    for schedule in ("onecycle", "cosine", "constant"):
        _, result, epochs = _train(generic, epochs=1, batch_size=batch, schedule=schedule)
        assert len(epochs) == 1 and np.isfinite(epochs[0].train_loss)


def test_members_train_at_once_only_as_far_as_the_hosts_memory_holds_them():
    """K=3 members of 600 MiB: all three with 2 GiB available, two with 1.3 GiB, one (never none) with 100 MiB;
    the cores go to the members that train together, the time budget to the waves."""
    from edge_agent.config import AgentConfig, FinetuneConfig
    from edge_agent.members import available_memory, make_jobs, members_at_once

    member = 600 << 20
    assert members_at_once(3, member, 2 << 30) == 3
    assert members_at_once(3, member, 1300 << 20) == 2
    assert members_at_once(3, member, 100 << 20) == 1
    assert members_at_once(3, member, None) == 3
    assert (available_memory() or 0) > 0  # read from this host's /proc/meminfo
    config = AgentConfig(site="s", root="/tmp/x", store_url="file:///tmp/s",
                         finetune=FinetuneConfig(time_budget_s=90))
    bases = [("v1", Path("/tmp/m.pt"), "resnet18")] * 3
    two = make_jobs(config, bases, Path("/tmp/run"), at_once=2, cores=8)
    assert [j.threads for j in two] == [4, 4, 4] and two[0].train["time_budget_s"] == 45
    one = make_jobs(config, bases, Path("/tmp/run"), at_once=1, cores=8)
    assert one[0].threads == 8 and one[0].train["time_budget_s"] == 30
