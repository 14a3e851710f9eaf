"""Cloud promotions rest on the paired gate: a compare-and-swap against the champion that was gated against,
and the fleet's serving contract (architecture, input size, classes) kept unless the operator opts in."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.datasets import SourceImage, open_dataset, write_version
from edge_agent.gate import GateRule
from edge_agent.models import CheckpointMeta, ModelSpec, build_model, save_checkpoint
from orchestrator.registry import ChampionChanged, ModelRegistry
from orchestrator.retrain import gate

CLASSES = ["functional", "defective"]
LENIENT = GateRule(alpha=0.9, min_gate_images=1)  # the test is about what happens around the verdict


@pytest.fixture
def pool(tmp_path) -> tuple[Path, str, str]:
    """A pool of 80 noise images with a large val share (so a gate split of a few dozen), and the gate split's
    majority and minority class: a constant model of the majority beats one of the minority there."""
    rng = np.random.default_rng(0)
    items = [SourceImage(f"im{i:03d}", int(i % 3 == 0), rng.integers(0, 255, (32, 32), dtype=np.uint8), {})
             for i in range(80)]
    write_version(tmp_path / "pool", items, CLASSES, (0.2, 0.6, 0.2), 0, 32, "test", [])
    counts = np.bincount(open_dataset(tmp_path / "pool").load_split("gate").labels, minlength=2)
    assert counts[0] != counts[1], counts
    return tmp_path / "pool", CLASSES[int(counts.argmax())], CLASSES[int(counts.argmin())]


def constant(registry: ModelRegistry, tmp_path: Path, classes: list[str], label: str, size: int, seed: int) -> str:
    """Register a tiny_cnn that answers ``label`` for every image, at input ``size``."""
    spec = ModelSpec(arch="tiny_cnn", num_classes=len(classes), image_size=size)
    model = build_model(spec, seed=seed)
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([8.0 if c == label else -8.0 for c in classes]))
    path = save_checkpoint(tmp_path / f"{label}-{size}-{seed}.pt", model, CheckpointMeta(spec=spec, class_names=classes))
    return registry.register("f", path, arch="tiny_cnn", dataset_id=None, hyperparameters={"image_size": size},
                             metrics={}).version


@pytest.fixture
def cloud(tmp_path, pool):
    """(registry, pool, champion, make): the champion answers the gate split's minority class; ``make(size,
    seed)`` registers a challenger that answers its majority class."""
    data, majority, minority = pool
    registry = ModelRegistry(tmp_path / "registry")
    champion = registry.promote(constant(registry, tmp_path, CLASSES, minority, 32, 0))
    return registry, data, champion, lambda size, seed: registry.get(
        constant(registry, tmp_path, CLASSES, majority, size, seed))


def test_two_promoters_racing_exactly_one_wins(cloud):
    registry, data, champion, make = cloud
    racers = [make(32, seed) for seed in (1, 2)]
    barrier, outcomes = threading.Barrier(2), {}

    def promoter(candidate) -> None:
        barrier.wait()
        try:
            outcomes[candidate.version] = gate(registry, candidate, champion, data, LENIENT)
        except ChampionChanged as exc:
            outcomes[candidate.version] = exc

    threads = [threading.Thread(target=promoter, args=(c,)) for c in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [v for v, o in outcomes.items() if not isinstance(o, Exception)]
    losers = [o for o in outcomes.values() if isinstance(o, Exception)]
    assert len(winners) == 1 and len(losers) == 1 and outcomes[winners[0]].promoted
    assert registry.champion("f").version == winners[0]
    assert f"the champion changed since this candidate was gated (now {winners[0]}" in str(losers[0])
    with pytest.raises(ChampionChanged, match=winners[0]):  # a direct stale promotion too
        registry.promote(champion.version, expected=champion.version)
    assert registry.champion("f").version == winners[0]


def test_a_contract_changing_candidate_needs_the_opt_in(cloud):
    registry, data, champion, make = cloud
    smaller = make(16, 1)
    refused = gate(registry, smaller, champion, data, LENIENT)
    assert not refused.promoted and "serving contract (image_size 32 -> 16)" in refused.reason
    assert registry.champion("f").version == champion.version
    accepted = gate(registry, smaller, champion, data, LENIENT, allow_contract_change=True)
    assert accepted.promoted and registry.champion("f").version == smaller.version
    assert accepted.n == len(open_dataset(data).load_split("gate")) and f"n = {accepted.n}" in accepted.reason


def test_the_cloud_gate_refuses_below_min_gate_images(cloud):
    registry, data, champion, make = cloud
    better = make(32, 1)
    decision = gate(registry, better, champion, data, GateRule(alpha=0.9, min_gate_images=1000))
    assert not decision.promoted and "not enough evidence (n = " in decision.reason
    assert registry.champion("f").version == champion.version
