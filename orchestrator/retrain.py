"""The cloud's learning steps: train (or fine-tune) a registered version, gate it, retrain on samples.

Plain functions; the flows string them together. The gate is the one in the shared core
(:mod:`edge_agent.gate`), so the cloud and the edge decide with the same paired test.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.datasets import DatasetVersion, open_dataset
from edge_agent.fileio import read_json, write_json_atomic
from edge_agent.gate import Decision, GateRule, Score, spent_alpha
from edge_agent.gate import gate as decide
from edge_agent.models import DEFAULT_ARCH, load_checkpoint
from edge_agent.ensemble import log_loss
from edge_agent.train import EpochMetrics, TrainConfig, predict_proba
from orchestrator.registry import ModelRegistry, ModelVersion
from orchestrator.samples import Collection, Labeller, OperatorLabels, build_retraining_set, first_label
from orchestrator.training import CHECKPOINT, METRICS, export_checkpoint, train_on_dataset


def train_version(registry: ModelRegistry, family: str, data: Path, arch: str, config: TrainConfig,
                  parent: ModelVersion | None = None, note: str = "",
                  on_epoch: Callable[[EpochMetrics], None] | None = None) -> ModelVersion:
    """Train (or fine-tune ``parent``) on a dataset version and register the result as a candidate."""
    with tempfile.TemporaryDirectory(prefix="edgeloop-train-") as tmp:
        init = registry.artifact(parent.version) if parent else None
        train_on_dataset(data, arch, tmp, config, init=init, on_epoch=on_epoch)
        return register_trained(registry, family, Path(tmp), parent=parent, note=note)


def register_trained(registry: ModelRegistry, family: str, folder: Path, parent: ModelVersion | None = None,
                     note: str = "", extra_hyperparameters: dict | None = None) -> ModelVersion:
    """Register what :func:`train_on_dataset` wrote in ``folder`` (and its ONNX export) as a candidate."""
    metrics = json.loads((folder / METRICS).read_text())
    onnx = export_checkpoint(folder / CHECKPOINT, folder / "model.onnx")
    return registry.register(
        family, folder / CHECKPOINT, arch=metrics["arch"], dataset_id=metrics["dataset_id"],
        hyperparameters={**metrics["config"], "image_size": metrics["image_size"], **(extra_hyperparameters or {})},
        parent=parent.version if parent else None,
        metrics={k: metrics[k] for k in ("val_acc", "test_acc", "seconds_per_epoch")},
        extra_artifacts={"onnx": onnx}, note=note)


@dataclass
class GateDecision:
    """The promotion decision (the paired gate on the gate split) and both models on the test split (reported
    only). ``n``, the discordant counts, ``p_value`` and ``alpha`` are the gate's evidence."""

    candidate: str
    champion: str | None
    candidate_gate_acc: float
    champion_gate_acc: float | None
    candidate_gate_loss: float
    champion_gate_loss: float | None
    candidate_test_acc: float
    champion_test_acc: float | None
    promoted: bool
    reason: str = ""
    n: int = 0
    candidate_only: int = 0
    champion_only: int = 0
    p_value: float | None = None
    alpha: float | None = None

    def as_dict(self) -> dict:
        """A plain copy for flow results and artifacts."""
        return self.__dict__.copy()


def contract_change(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion) -> str | None:
    """How the candidate would break the fleet's serving contract (what its members fine-tune from: the
    champion's architecture, input size and classes), or None when it keeps it."""
    new, old = registry.contract(candidate.version), registry.contract(champion.version)
    changed = [f"{key} {old[key]} -> {new[key]}" for key in ("arch", "image_size", "classes") if new[key] != old[key]]
    return ", ".join(changed) or None


def gate(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None, holdout: Path,
         rule: GateRule | None = None, allow_contract_change: bool = False, promote: bool = True,
         look: int | None = None) -> GateDecision:
    """Promote the candidate only if the shared paired gate says it beats the champion on the pool's gate split.

    The gate split is the half of the pool's val split that chose no epoch (:func:`edge_agent.datasets.role`),
    plus, in a retraining set, the share of labelled samples that joined it: every candidate meets every gate
    image an earlier one met, and more as labels arrive. ``look``: the how-manieth try at this champion (the
    nightly retrain), run at its spent share of alpha, so that however many nights a no-better candidate is
    tried, it is promoted with probability at most alpha in all. Both models are
    scored in FP32, the precision the fleet receives them at (each site then decides INT8 for itself). The test
    split is scored too, for the report only: it never decides. A candidate that changes the serving contract
    is refused unless ``allow_contract_change``. The promotion is a compare-and-swap against ``champion``: if
    another promoter replaced it meanwhile, :class:`~orchestrator.registry.ChampionChanged` is raised.
    """
    rule = rule or GateRule()
    if look is not None and champion is not None:  # one of many tries at this champion: its share of alpha
        rule = rule.model_copy(update={"alpha": spent_alpha(rule.alpha, look)})
    pool = open_dataset(holdout)
    cand = _scores(registry, candidate, pool)
    champ = _scores(registry, champion, pool) if champion else None
    broken = contract_change(registry, candidate, champion) if champion and not allow_contract_change else None
    decision = decide(cand["gate"], champ["gate"] if champ else None, rule)
    if look is not None and champion is not None:
        decision = Decision(**{**decision.as_dict(), "reason": f"try {look} at champion {champion.version} "
                               f"(alpha spent over tries: alpha/(k(k+1)) = {rule.alpha:.4g}): {decision.reason}"})
    if broken:
        decision = Decision(**{**decision.as_dict(), "accept": False,
                               "reason": f"changes the fleet's serving contract ({broken}); set "
                                         f"allow_contract_change to promote it (gate: {decision.reason})"})
    if decision.accept and promote:  # (promote=False: the caller promotes, e.g. as a step of its own)
        promote_candidate(registry, candidate, champion, allow_contract_change)
    return GateDecision(candidate.version, champion.version if champion else None,
                        cand["gate"].accuracy, champ["gate"].accuracy if champ else None,
                        cand["gate"].nll, champ["gate"].nll if champ else None,
                        cand["test"].accuracy, champ["test"].accuracy if champ else None,
                        decision.accept, decision.reason, decision.n, decision.challenger_only,
                        decision.incumbent_only, decision.p_value, decision.alpha)


def _scores(registry: ModelRegistry, version: ModelVersion, pool: DatasetVersion) -> dict[str, Score]:
    """A registered model's answers on the gate and test splits, at its own input size."""
    model, meta = load_checkpoint(registry.artifact(version.version))
    out = {}
    for name in ("gate", "test"):
        split = pool.load_split(name, meta.spec.image_size)
        probs = predict_proba(model, split.images, meta.normalization)
        out[name] = Score.of(probs, split.labels, log_loss(probs, split.labels))
    return out


def promote_candidate(registry: ModelRegistry, candidate: ModelVersion, champion: ModelVersion | None,
                      allow_contract_change: bool = False) -> None:
    """Make the candidate the champion, if the champion is still the one it was gated against and the fleet's
    serving contract holds (or its change is allowed): the one way a flow writes the champion pointer."""
    registry.promote(candidate.version, expected=champion.version if champion else None,
                     allow_contract_change=allow_contract_change)


RETRAIN_INPUTS = "retrain-inputs.json"  # beside the registry: what each family's last candidate learnt from


def labelled_inputs(collection: Collection, labeller: Labeller) -> str:
    """A fingerprint of the labelled samples a retrain would learn from (content hash and label of each)."""
    pairs = sorted(f"{s.sha256}:{label}" for s in collection.accepted if (label := labeller(s)) is not None)
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def nothing_new(registry: ModelRegistry, family: str, fingerprint: str) -> bool:
    """True when the family's last candidate learnt from exactly these labelled samples: a retrain now would
    only be another look at the same exam (it adds tries, never evidence)."""
    return (read_json(registry.root / RETRAIN_INPUTS, default={}) or {}).get(family) == fingerprint


def remember_inputs(registry: ModelRegistry, family: str, fingerprint: str) -> None:
    seen = read_json(registry.root / RETRAIN_INPUTS, default={}) or {}
    write_json_atomic(registry.root / RETRAIN_INPUTS, {**seen, family: fingerprint})


def retrain_from_samples(registry: ModelRegistry, family: str, base_data: Path, collection: Collection,
                         out: Path, config: TrainConfig, labellers: Sequence[Labeller] = (),
                         pseudo: Container[str] = (), site_exam: Callable | None = None,
                         on_epoch: Callable[[EpochMetrics], None] | None = None) -> tuple[ModelVersion, dict]:
    """Fine-tune the champion on the base data plus the checked samples that have a label.

    A sample's label comes from its site's operator first, then from ``labellers`` in order. A share of the
    labelled samples (by content hash) joins the retraining set's gate instead of its training split, so the
    cloud's exam grows with the fleet (:func:`orchestrator.samples.build_retraining_set`).
    """
    base = open_dataset(base_data)
    labeller = first_label(OperatorLabels(base.classes), *labellers)
    report, unlabelled = build_retraining_set(base, collection.accepted, labeller, out, pseudo=pseudo,
                                              **({"site_exam": site_exam} if site_exam else {}))
    champion = registry.champion(family)
    candidate = train_version(registry, family, out, champion.arch if champion else DEFAULT_ARCH, config,
                              parent=champion, note=f"retrained with {len(collection.accepted)} edge samples",
                              on_epoch=on_epoch)
    remember_inputs(registry, family, labelled_inputs(collection, labeller))
    counts = open_dataset(out)
    summary = {"dataset_id": report.dataset_id, "samples_accepted": len(collection.accepted),
               "samples_rejected": len(collection.rejected), "samples_held": len(collection.held),
               "samples_unlabelled": unlabelled, "train_images": report.counts["train"],
               "gate_images": len(counts.files("gate")), "by_site": collection.by_site()}
    (out / "retrain_summary.json").write_text(json.dumps(summary, indent=1))
    return candidate, summary


def looks_at(registry: ModelRegistry, champion: ModelVersion | None) -> int:
    """Which try at the champion this candidate is: the number of versions trained from it (this one included).
    Each try gets its own share of alpha (:func:`edge_agent.gate.spent_alpha`), so that over every night a
    no-better candidate is promoted with probability at most alpha in all."""
    if champion is None:
        return 1
    return max(1, sum(1 for v in registry.versions(champion.family) if v.parent == champion.version))
