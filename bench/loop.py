"""The whole loop, measured over rounds and seeds on the shifted fleet (issue 9), with labels going home (issue 24).

Each seed: the cloud pretrains on its generic pool (mostly poly cells); three sites differ from it (mono
cells only; poly cells through the site's own camera; both). Each round, every site fine-tunes on the
current cloud model with the real edge code (members in parallel → ensemble → gate → INT8 rule), serves,
classifies that round's share of its image stream, and uploads a budgeted choice of it; the cloud retrains
on its pool plus everything uploaded so far, gates on the pool's gate split, and the champion goes out for
the next round.

What decides and what judges are kept apart. A site has four labelled splits (train, val chooses epochs
and weights, gate decides what serves, test is only reported) and an unlabelled stream that is disjoint
from all of them; the cloud decides on its pool's gate split. Every figure below is a test-split figure.
No exam leaves a site (issue 16): a site uploads labelled images of its train and val roles only, and the
cloud refuses any sample whose hash is among the sites' gate and test images. Every decision is the paired
gate (edge_agent.gate); beside it, each row records what the rule before issue 16 would have chosen from
the same candidates.

Labels go home (issue 24): each round the selected arm's uploads are labelled in the cloud (the reference
labels stand in for people) and the labels return to each site through real store files (orchestrator.labelhome,
edge_agent.homelabels), with a role by content hash: the sites' train, val, gate and test splits grow. A site
fine-tunes again when 20 labels came home, or on a new champion; a challenger its gate could not accept waits in
shadow and is judged again with the sequential test. The cloud's gate grows too (a share of the labelled samples
joins the retraining set's gate) and each candidate is one try at the champion, at its spent share of alpha.

Beside the loop, on the same data and budget:
- random selection: a second cloud chain retrained on uniformly random uploads of the same bytes;
- fine-tune vs scratch: one model fine-tuned from the cloud base against one trained from scratch on a
  site's train split (round 1), test accuracy against training seconds.

    .venv/bin/python bench/loop.py                 # 3 seeds x 5 rounds (~80 min on 2 cores)
    .venv/bin/python bench/loop.py --quick         # 1 seed x 2 rounds, small epochs (a few minutes)

Writes bench/results/loop.json (every figure, the machine), loop.png (the learning curves) and loop.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.config import AgentConfig, FinetuneConfig, MemberConfig, ServeConfig  # noqa: E402
from bench.gate import old_rule  # noqa: E402
from edge_agent.datasets import (ELPV_CLASSES, ArraySet, SourceImage, elpv_images, open_dataset, role,  # noqa: E402
                                 write_version)
from edge_agent.sitedata import exam_hashes, split_counts  # noqa: E402
from edge_agent.imaging import encode_png  # noqa: E402
from edge_agent.layout import AgentPaths  # noqa: E402
from edge_agent.select import Selector  # noqa: E402
from orchestrator.demo import shifted_fleet  # noqa: E402
from orchestrator.registry import ModelRegistry  # noqa: E402
from orchestrator.samples import Collection, Sample  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"
FAMILY = "elpv-defects"
SITES = 3
STREAM_SHARE = 0.25            # of each site's images: the unlabelled stream (the rest is labelled)
# The labelled rest: train / val (halved into val and gate) / test; every site gets >= 50 gate images (the
# gate's min_gate_images) and its gate and test images never leave it (issue 16).
SITE_FRACTIONS = (0.38, 0.37, 0.25)
# members that differ in input size as well as augmentation (issue 20), each resized inside the fused graph
MEMBERS = ((128, "flips"), (112, "noise"), (96, "none"))


@dataclass
class Settings:
    seeds: int = 3
    rounds: int = 5
    arch: str = "slim_resnet"   # the recipe bench/elpv_recipe.py chose on val (issue 20; ResNet-18 at 64 px before)
    size: int = 128
    pretrain_epochs: int = 30
    retrain_epochs: int = 4
    finetune_epochs: int = 6
    scratch_epochs: int = 20
    upload_share: float = 0.04  # of the bytes a site saw that round
    min_new_labels: int = 20    # labels come home: a site fine-tunes again past this many (thresholds.min_new_labelled)
    scratch: bool = True        # the fine-tune-vs-scratch comparison of round 1 (issue 9)


@dataclass
class StreamImage:
    name: str
    png: bytes
    label: int
    pixels: np.ndarray
    source: str = "inbox"  # or "operator": a labelled image, its label known at the site

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()


@dataclass
class Site:
    name: str
    role: str
    config: AgentConfig
    data: Path
    test: ArraySet
    labelled: list[StreamImage]
    stream: list[StreamImage]
    chunks: list[list[StreamImage]] = field(default_factory=list)
    new_labels: int = 0  # labels that came home since the last fine-tune

    @property
    def paths(self) -> AgentPaths:
        return AgentPaths(self.config.root)


# ---- data ------------------------------------------------------------------------------------------

def _stream_image(item: SourceImage, source: str = "inbox") -> StreamImage:
    return StreamImage(item.name, encode_png(item.pixels), item.label, item.pixels, source)


def make_fleet(work: Path, seed: int, settings: Settings) -> tuple[Path, list[Site]]:
    """The generic pool and three sites, each site's images split into labelled splits and a stream."""
    images, skipped = elpv_images(settings.size, seed)
    parts = shifted_fleet(images, SITES, seed)
    generic = work / "generic"
    write_version(generic, parts[0], ELPV_CLASSES, (0.7, 0.15, 0.15), seed, settings.size, "elpv:shifted:generic",
                  skipped)
    sites = []
    for index, items in enumerate(parts[1:], start=1):
        name = f"site-{index}"
        order = np.random.default_rng(seed * 100 + index).permutation(len(items))
        cut = int(STREAM_SHARE * len(items))
        stream, held = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
        data = work / "sites" / name
        write_version(data, held, ELPV_CLASSES, SITE_FRACTIONS, seed + index, settings.size, f"elpv:shifted:{name}", [])
        dataset = open_dataset(data)
        # what the site may upload as labelled: its train and val roles (gate and test are its exam)
        labelled_names = {Path(r["file"]).stem for r in dataset.records if role(r["split"], r["sha256"]) in
                          ("train", "val")}
        labelled = [_stream_image(it, "operator") for it in held if it.name in labelled_names]
        root = work / "edge" / name
        AgentPaths(root).ensure()
        shutil.copytree(data, AgentPaths(root).labelled, dirs_exist_ok=True)
        config = AgentConfig(site=name, root=root, store_url=f"file://{work / 'store'}", image_size=settings.size,
                             members=[MemberConfig(arch=settings.arch, policy=policy, image_size=size)
                                      for size, policy in MEMBERS],
                             finetune=FinetuneConfig(epochs=settings.finetune_epochs, batch_size=32, lr=1e-3,
                                                     seed=seed),
                             serve=ServeConfig(port=0))
        site = Site(name, items[0].extra["site_role"], config, data, dataset.load_split("test"), labelled,
                    [_stream_image(it) for it in stream])
        site.chunks = [list(c) for c in np.array_split(np.array(site.stream, dtype=object), settings.rounds)]
        sites.append(site)
    return generic, sites


# ---- the edge --------------------------------------------------------------------------------------

def deploy(site: Site, registry: ModelRegistry, version: str, round_: int) -> None:
    """What the cloud's deploy leaves at a site: the checkpoint, then its sha256."""
    folder = site.paths.base_models / f"r{round_}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = registry.artifact(version)
    shutil.copyfile(checkpoint, folder / "model.pt")
    (folder / "model.pt.sha256").write_text(hashlib.sha256(checkpoint.read_bytes()).hexdigest())


def finetune(site: Site, round_: int) -> dict:
    from edge_agent.finetune import run_finetune

    report = run_finetune(site.config, site.paths, f"r{round_}", "bench", lambda: False, parallel=True)
    if report.get("skipped"):
        return skipped_row(site, round_, report)
    candidates = report["candidates"]
    precision = report.get("precision") or {}
    served = candidates[report["serving"]]["test"]["accuracy"]
    if precision.get("serving") == "int8":
        served = precision["test_int8"]
    return {"site": site.name, "role": site.role, "round": round_, "test_n": candidates["base"]["test"]["n"],
            "base_as_is": candidates["base"]["test"]["accuracy"],
            # the member a site would pick on its val split (issue 20), and the best one on test for reference
            "best_member": max(report["members"], key=lambda m: m["val_accuracy"])["test_accuracy"],
            "best_member_on_test": max(m["test_accuracy"] for m in report["members"]),
            "members": [m["test_accuracy"] for m in report["members"]],
            "members_val": [m["val_accuracy"] for m in report["members"]],
            "ensemble_fp32": _first((report.get("new_precision") or {}).get("test_fp32"),
                                    candidates["new"]["test"]["accuracy"]),
            "ensemble_int8": (report.get("new_precision") or {}).get("test_int8"),
            "served": served, "serving": report["serving"], "precision": precision.get("serving"),
            "changed": report["activated"], "decision": report["decision"], "gate_n": report["gate"]["n"],
            "p_value": report["gate"]["p_value"], **old_rule_pick(candidates),
            "gate": {name: c["gate"]["accuracy"] for name, c in candidates.items()},
            "finetune_seconds": report["seconds"], "train_seconds": report["train_seconds"]}


def skipped_row(site: Site, round_: int, report: dict) -> dict:
    """A site with too few labelled images to fine-tune (its gate split under ``min_gate_images``): no member is
    trained, the base as-is serves (or what served stays); the row has no member or ensemble figures."""
    from edge_agent.ensemble import evaluate_graph
    from edge_agent.models import load_checkpoint
    from edge_agent.serving import EnsembleHandle
    from edge_agent.train import predict_proba

    model, meta = load_checkpoint(max(site.paths.base_models.glob("*/model.pt"), key=lambda p: p.stat().st_mtime))
    base = float((predict_proba(model, site.test.images, meta.normalization).argmax(1) == site.test.labels).mean())
    graph = EnsembleHandle(site.paths.active_link, threads=2, image_size=site.config.image_size).get()
    served = evaluate_graph(graph, site.test.images, site.test.labels)["accuracy"]
    return {"site": site.name, "role": site.role, "round": round_, "test_n": len(site.test), "base_as_is": base,
            "best_member": None, "best_member_on_test": None, "members": [], "members_val": [],
            "ensemble_fp32": None, "ensemble_int8": None, "served": served, "serving": report["serving"],
            "precision": None, "changed": report["activated"], "decision": report["decision"], "gate_n": 0,
            "p_value": None, "old_rule_serving": report["serving"], "old_rule_served": served, "gate": {},
            "finetune_seconds": report["seconds"], "train_seconds": 0.0, "skipped": report["skipped"]}


def judged_again(site: Site, round_: int, last: dict) -> dict:
    """No fine-tune this round: what serves stays, unless the challenger waiting in shadow wins its next look
    (edge_agent.shadow.rejudge, the sequential test) on the gate split that grew with the labels home."""
    from edge_agent.ensemble import evaluate_graph
    from edge_agent.serving import EnsembleHandle
    from edge_agent.shadow import rejudge

    decision = rejudge(site.paths, site.config)
    row = {**last, "round": round_, "carried_over": True, "changed": bool(decision and decision["accept"])}
    if decision is not None:
        row["shadow_decision"] = decision["reason"]
    if row["changed"]:
        graph = EnsembleHandle(site.paths.active_link, threads=2, image_size=site.config.image_size).get()
        row["served"] = evaluate_graph(graph, site.test.images, site.test.labels)["accuracy"]
        row["serving"] = "shadow"
    return row


class LabelsHome:
    """The selected arm's uploads, through a real store: the agent's sent log, the cloud's labelling queue
    (the reference labels stand in for people), labels/<site>.json, and the site taking them home."""

    def __init__(self, work: Path):
        from edge_agent.store import Store
        from orchestrator.labelling import LabelQueue

        self.root = work / "store"
        self.store = Store(f"file://{self.root}")
        self.queue = LabelQueue(work / "label-queue", list(ELPV_CLASSES))

    def upload(self, site: Site, images: list[StreamImage]) -> None:
        from edge_agent.homelabels import SentLog

        folder = self.root / "samples" / site.name
        folder.mkdir(parents=True, exist_ok=True)
        for image in images:
            (folder / f"{image.sha256}.png").write_bytes(image.png)
            (folder / f"{image.sha256}.json").write_text(json.dumps({"site": site.name, "time": time.time(),
                                                                     "reasons": [image.source]}))
        SentLog(site.paths.root / "sent.log").add({image.sha256 for image in images})

    def send_and_take(self, site: Site, truth: dict[str, int]) -> int:
        """Label what the site sent (not its own operator-labelled images: those are labelled already), send the
        labels home, and let the site take them; returns how many came home."""
        from edge_agent.homelabels import SentLog, take_labels
        from orchestrator.labelhome import send_labels_home

        for path in (self.root / "samples" / site.name).glob("*.json"):
            if json.loads(path.read_text())["reasons"] == ["inbox"] and path.stem in truth:
                self.queue.set(path.stem, ELPV_CLASSES[truth[path.stem]], by="reference")
        send_labels_home(self.store, self.queue)
        report = take_labels(self.store, site.paths, site.name, list(ELPV_CLASSES), SentLog(site.paths.root / "sent.log"),
                             site.config.home_labels.shares, site.config.serve.max_image_bytes)
        assert not report.refused and report.error is None, (report.refused, report.error)
        return report.taken + report.relabelled


def _first(*values):
    return next((v for v in values if v is not None), None)


def old_rule_pick(candidates: dict) -> dict:
    """What the gate before issue 16 would have served from the same candidates, and its test accuracy."""
    order = [n for n in ("base", "active", "new") if n in candidates]
    incumbent = "active" if "active" in candidates else "base"
    score = {n: (candidates[n]["gate"]["accuracy"], candidates[n]["gate"]["nll"]) for n in order}
    challengers = [n for n in order if n != incumbent]
    best = max(challengers, key=lambda n: (score[n][0], -score[n][1], -challengers.index(n)))
    pick = best if old_rule(score[best], score[incumbent]) else incumbent
    return {"old_rule_serving": pick, "old_rule_served": candidates[pick]["test"]["accuracy"]}


def classify_images(site: Site, images: list[StreamImage]) -> list:
    from edge_agent.serving import EnsembleHandle, classify

    classifier = EnsembleHandle(site.paths.active_link, threads=2, image_size=site.config.image_size).get()
    return classify(classifier, np.stack([im.pixels for im in images]))


def select(site: Site, seen: list[StreamImage], budget: int, rng: random.Random) -> list[StreamImage]:
    """What the agent sends: informative images (uncertain, members disagree, or a labelled image the model
    got wrong; a small random share of ordinary ones), best score first, labelled ones within their share."""
    t, u = site.config.thresholds, site.config.upload
    selector = Selector(t.uncertainty, t.disagreement, u.random_share, rng)
    ranked = []
    for image, prediction in zip(seen, classify_images(site, seen)):
        label = ELPV_CLASSES[image.label] if image.source == "operator" else None
        judged = selector.judge(prediction.probs, prediction.member_probs, label,
                                mistaken=label is not None and prediction.label != label)
        if judged.chosen:
            ranked.append((judged.score, image))
    ranked.sort(key=lambda pair: -pair[0])
    caps = {"operator": u.labelled_share * budget, "inbox": budget}
    return _fill([image for _, image in ranked], budget, caps)


def select_random(seen: list[StreamImage], budget: int, rng: random.Random) -> list[StreamImage]:
    return _fill(rng.sample(seen, len(seen)), budget, {"operator": budget, "inbox": budget})


def _fill(ordered: list[StreamImage], budget: int, caps: dict[str, float]) -> list[StreamImage]:
    chosen, used, by_source = [], 0, {"operator": 0, "inbox": 0}
    for image in ordered:
        size = len(image.png)
        if used + size <= budget and by_source[image.source] + size <= caps[image.source]:
            chosen.append(image)
            used += size
            by_source[image.source] += size
    return chosen


# ---- the cloud -------------------------------------------------------------------------------------

class Cloud:
    """One chain of cloud models: a registry, its uploads so far, retrain + gate each round."""

    def __init__(self, name: str, home: Path, base: Path, arch: str):
        self.name, self.home = name, home
        self.registry = ModelRegistry(home / "registry")
        version = self.registry.register(FAMILY, base, arch=arch, dataset_id=None, hyperparameters={},
                                         metrics={}, note="pretrained on the generic pool (round 0)")
        self.registry.promote(version.version)
        self.samples: list[Sample] = []
        self.truth: dict[str, int] = {}
        self.exams: set[str] = set()  # the sites' published gate and test hashes
        self.refused = 0

    @property
    def champion(self) -> str:
        return self.registry.champion(FAMILY).version

    def upload(self, site: str, images: list[StreamImage]) -> None:
        for image in images:
            if image.sha256 in self.exams:  # as orchestrator.samples does: an exam image is never trained on
                self.refused += 1
                continue
            label = ELPV_CLASSES[image.label] if image.source == "operator" else None
            self.samples.append(Sample(image.sha256, site, image.png, {"reasons": [image.source],
                                                                      "operator_label": label}))
            self.truth[image.sha256] = image.label  # the labelling queue's answer (the demo's reference labels)

    def retrain(self, generic: Path, round_: int, settings: Settings, seed: int) -> dict:
        from edge_agent.train import TrainConfig
        from orchestrator.retrain import gate, looks_at, retrain_from_samples

        champion = self.registry.champion(FAMILY)
        config = TrainConfig(epochs=settings.retrain_epochs, batch_size=64, lr=1e-3, seed=seed + round_)
        usable = [s for s in self.samples if s.sha256 not in self.exams]  # labels home made some an exam
        out = self.home / f"retrain-r{round_}"
        candidate, summary = retrain_from_samples(
            self.registry, FAMILY, generic, Collection(accepted=usable), out, config,
            labellers=[lambda s: self.truth.get(s.sha256)])
        decision = gate(self.registry, candidate, champion, out, look=looks_at(self.registry, champion))
        old = old_rule((decision.candidate_gate_acc, decision.candidate_gate_loss),
                       (decision.champion_gate_acc, decision.champion_gate_loss))
        return {"candidate": candidate.version, "promoted": decision.promoted, "reason": decision.reason,
                "old_rule_promoted": old, "p_value": decision.p_value, "gate_n": decision.n,
                "samples": summary["samples_accepted"], "exam_refused": self.refused + len(self.samples) - len(usable),
                "labels": len(usable), "cloud_gate_n": decision.n}

    def accuracy(self, generic: Path, sites: list[Site]) -> dict[str, float]:
        from edge_agent.models import load_checkpoint
        from edge_agent.train import evaluate

        model, meta = load_checkpoint(self.registry.artifact(self.champion))
        scores = {"generic": evaluate(model, open_dataset(generic).load_split("test"), meta.normalization)[0]}
        scores.update({site.name: evaluate(model, site.test, meta.normalization)[0] for site in sites})
        scores["sites_mean"] = statistics.mean(scores[site.name] for site in sites)
        return scores


# ---- fine-tune vs scratch --------------------------------------------------------------------------

def scratch_vs_finetune(site: Site, base: Path, settings: Settings, seed: int) -> dict:
    """Test accuracy against training seconds for one model fine-tuned from the base and one from scratch."""
    from edge_agent.models import build_model, load_checkpoint
    from edge_agent.sitedata import load_site_splits
    from edge_agent.train import TrainConfig, evaluate, normalization_of, train_model

    model, meta = load_checkpoint(base)
    splits = load_site_splits(site.paths, meta.class_names, settings.size)

    def curve(net, normalization, config: TrainConfig) -> dict:
        points, elapsed = [], 0.0

        def on_epoch(m) -> None:
            nonlocal elapsed
            elapsed += m.seconds  # training and validation only: the test scoring below is not counted
            points.append((round(elapsed, 2), evaluate(net, splits["test"], normalization)[0]))

        train_model(net, splits["train"], splits["val"], config, normalization, on_epoch=on_epoch)
        return {"points": points, "final": evaluate(net, splits["test"], normalization)[0], "seconds": elapsed}

    # Both end on their last epoch, as the edge's members do (FinetuneConfig.keep).
    finetuned = curve(model, meta.normalization, TrainConfig(epochs=settings.finetune_epochs, batch_size=32,
                                                             lr=1e-3, weight_decay=1e-4, seed=seed, keep="last"))
    scratch = curve(build_model(meta.spec, seed), normalization_of(splits["train"]),
                    TrainConfig(epochs=settings.scratch_epochs, batch_size=32, lr=3e-3, seed=seed, keep="last"))
    reached = next((t for t, acc in finetuned["points"] if acc >= scratch["final"]), None)
    return {"site": site.name, "role": site.role, "finetune": finetuned, "scratch": scratch,
            "finetune_seconds_to_scratch_final": reached,
            "time_ratio": None if reached is None else round(reached / scratch["seconds"], 3)}


# ---- one seed --------------------------------------------------------------------------------------

def run_seed(seed: int, settings: Settings, work: Path, log) -> dict:
    from edge_agent.train import TrainConfig
    from orchestrator.training import train_on_dataset

    started = time.monotonic()
    generic, sites = make_fleet(work, seed, settings)
    pretrained = work / "pretrained"
    train_on_dataset(generic, settings.arch, pretrained, TrainConfig(epochs=settings.pretrain_epochs, batch_size=64,
                                                                  seed=seed))
    clouds = {arm: Cloud(arm, work / f"cloud-{arm}", pretrained / "model.pt", settings.arch) for arm in ("selected", "random")}
    for cloud in clouds.values():
        cloud.exams = {h for site in sites for h in exam_hashes(site.paths)}
    cloud_rows = [{"round": 0, "arm": arm, **cloud.accuracy(generic, sites)} for arm, cloud in clouds.items()]
    log(f"seed {seed}: round 0 cloud on sites {cloud_rows[0]['sites_mean']:.3f}, generic {cloud_rows[0]['generic']:.3f}")
    edge_rows, upload_rows, scratch_rows, home_rows, deployed = [], [], [], [], None
    labels_home = LabelsHome(work)
    rngs = {arm: random.Random(seed * 7 + i) for i, arm in enumerate(clouds)}
    for round_ in range(1, settings.rounds + 1):
        champion = clouds["selected"].champion
        for site in sites:
            if champion != deployed:
                deploy(site, clouds["selected"].registry, champion, round_)
                edge_rows.append(finetune(site, round_))
                row = edge_rows[-1]
                log(f"seed {seed} round {round_} {site.name} ({site.role}): base {row['base_as_is']:.3f} " + (
                    f"fine-tune skipped ({row['skipped']})" if row.get("skipped") else
                    f"best member {row['best_member']:.3f} ensemble {row['ensemble_fp32']:.3f}")
                    + f" served {row['served']:.3f} ({row['serving']})")
            elif site.new_labels >= settings.min_new_labels:  # labels came home: learn from them
                edge_rows.append(finetune(site, round_))
                log(f"seed {seed} round {round_} {site.name}: {site.new_labels} labels home, fine-tuned again: "
                    f"served {edge_rows[-1]['served']:.3f} ({edge_rows[-1]['serving']})")
            else:  # nothing new to fine-tune from: what serves stays, a waiting challenger is judged again
                edge_rows.append(judged_again(site, round_, next(r for r in reversed(edge_rows)
                                                                 if r["site"] == site.name)))
                if "shadow_decision" in edge_rows[-1]:
                    log(f"seed {seed} round {round_} {site.name}: shadow judged again: "
                        f"{edge_rows[-1]['shadow_decision']}")
            site.new_labels = 0 if edge_rows[-1].get("members") and not edge_rows[-1].get("carried_over") \
                else site.new_labels
            if round_ == 1 and settings.scratch:
                scratch_rows.append(scratch_vs_finetune(site, clouds["selected"].registry.artifact(champion),
                                                        settings, seed))
            seen = site.chunks[round_ - 1] + (site.labelled if round_ == 1 else [])
            seen_bytes = sum(len(im.png) for im in seen)
            budget = int(settings.upload_share * seen_bytes)
            picks = {"selected": select(site, seen, budget, rngs["selected"]),
                     "random": select_random(seen, budget, rngs["random"])}
            labels_home.upload(site, picks["selected"])
            for arm, chosen in picks.items():
                clouds[arm].upload(site.name, chosen)
                upload_rows.append({"round": round_, "site": site.name, "arm": arm, "seen": len(seen),
                                    "seen_bytes": seen_bytes, "uploaded": len(chosen),
                                    "uploaded_bytes": sum(len(im.png) for im in chosen),
                                    "labelled_uploaded": sum(im.source == "operator" for im in chosen)})
        deployed = champion
        for site in sites:  # the selected arm's uploads were labelled in the cloud: the labels go home
            site.new_labels += labels_home.send_and_take(site, clouds["selected"].truth)
            home_rows.append({"round": round_, "site": site.name, "labels_home": site.new_labels,
                              "splits": split_counts(site.paths)})
        for cloud in clouds.values():  # the exams grew with the labels that came home
            cloud.exams = {h for site in sites for h in exam_hashes(site.paths)}
        for arm, cloud in clouds.items():
            decision = cloud.retrain(generic, round_, settings, seed)
            cloud_rows.append({"round": round_, "arm": arm, **decision, **cloud.accuracy(generic, sites)})
            log(f"seed {seed} round {round_} cloud[{arm}]: {decision['samples']} samples, "
                f"{'promoted' if decision['promoted'] else 'kept the champion'}; "
                f"on sites {cloud_rows[-1]['sites_mean']:.3f}, generic {cloud_rows[-1]['generic']:.3f}")
    return {"seed": seed, "edge": edge_rows, "cloud": cloud_rows, "upload": upload_rows, "scratch": scratch_rows,
            "labels_home": home_rows,
            "sites": {s.name: {"role": s.role, "test_n": len(s.test), "labelled": len(s.labelled),
                               "stream": len(s.stream)} for s in sites},
            "seconds": round(time.monotonic() - started, 1)}


# ---- summary ---------------------------------------------------------------------------------------

def _ms(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.pstdev(values), 4), "n": len(values)}


def summarise(seeds: list[dict], rounds: int) -> dict:
    sites = sorted(seeds[0]["sites"])
    edge = {site: {str(r): {key: _ms([row[key] for s in seeds for row in s["edge"]
                                     if row["site"] == site and row["round"] == r])
                            for key in ("base_as_is", "best_member", "ensemble_fp32", "ensemble_int8", "served")}
                   for r in range(1, rounds + 1)} for site in sites}
    gains = {site: {str(r): _ms([row["served"] - row["base_as_is"] for s in seeds for row in s["edge"]
                                 if row["site"] == site and row["round"] == r]) for r in range(1, rounds + 1)}
             for site in sites}
    ensemble_vs_member = _ms([row["ensemble_fp32"] - row["best_member"] for s in seeds for row in s["edge"]
                              if not row.get("carried_over") and not row.get("skipped")])
    cloud = {arm: {str(r): {key: _ms([row[key] for s in seeds for row in s["cloud"]
                                      if row["arm"] == arm and row["round"] == r])
                            for key in ("generic", "sites_mean", *sites)}
                   for r in range(0, rounds + 1)} for arm in ("selected", "random")}
    uploads = {arm: {"uploaded_bytes": sum(u["uploaded_bytes"] for s in seeds for u in s["upload"] if u["arm"] == arm),
                     "seen_bytes": sum(u["seen_bytes"] for s in seeds for u in s["upload"] if u["arm"] == arm)}
               for arm in ("selected", "random")}
    for arm, totals in uploads.items():
        totals["share"] = round(totals["uploaded_bytes"] / max(totals["seen_bytes"], 1), 4)
        gain = cloud[arm][str(rounds)]["sites_mean"]["mean"] - cloud[arm]["0"]["sites_mean"]["mean"]
        totals["site_accuracy_gain_per_mb"] = round(gain / (totals["uploaded_bytes"] / len(seeds) / 1e6), 4)
    rows = lambda site, r: [row for s in seeds for row in s["edge"] if row["site"] == site and row["round"] == r]  # noqa: E731
    old_rule = {site: {str(r): {"served": _ms([row.get("old_rule_served") for row in rows(site, r)]),
                                "gain": _ms([row["old_rule_served"] - row["base_as_is"] for row in rows(site, r)
                                             if row.get("old_rule_served") is not None])}
                       for r in range(1, rounds + 1)} for site in sites}
    changed = {site: _ms([sum(bool(row.get("changed")) for row in s["edge"] if row["site"] == site) for s in seeds])
               for site in sites}
    promotions = {rule: sum(bool(row.get(key)) for s in seeds for row in s["cloud"] if row["round"] > 0)
                  for rule, key in (("new", "promoted"), ("old", "old_rule_promoted"))}
    promotions["decisions"] = sum(1 for s in seeds for row in s["cloud"] if row["round"] > 0)
    promotions["exam_refused"] = sum(row.get("exam_refused", 0) for s in seeds for row in s["cloud"])
    promotions["per_seed"] = [sum(bool(row.get("promoted")) for row in s["cloud"] if row["round"] > 0 and
                                  row["arm"] == "selected") for s in seeds]
    labels_needed = _ms([labels_to_reach(s["cloud"]) for s in seeds])
    home = {site: {str(r): _ms([row["labels_home"] for s in seeds for row in s.get("labels_home", [])
                                if row["site"] == site and row["round"] == r]) for r in range(1, rounds + 1)}
            for site in sites}
    ratios = _ms([row["time_ratio"] for s in seeds for row in s["scratch"]])
    reached = [row["time_ratio"] is not None for s in seeds for row in s["scratch"]]
    shifted = [site for site in sites if seeds[0]["sites"][site]["role"] != "mixed"]
    camera = [site for site in sites if seeds[0]["sites"][site]["role"] == "poly-camera"]
    targets = {
        "camera site served >= +35 points over the base as-is (every round)":
            all(gains[site][str(r)]["mean"] >= 0.35 for site in camera for r in range(1, rounds + 1)),
        "no site served worse than the base as-is on test beyond one standard deviation":
            all(g["mean"] >= -g["std"] for site in sites for g in gains[site].values()),
        "served beats base as-is by >= 10 points at every shifted site (round 1)":
            all(gains[site]["1"]["mean"] >= 0.10 for site in shifted),
        "served beats base as-is by >= 10 points at every shifted site (every round)":
            all(gains[site][str(r)]["mean"] >= 0.10 for site in shifted for r in range(1, rounds + 1)),
        "ensemble at least as good as its best member (mean over sites, rounds, seeds)":
            ensemble_vs_member["mean"] >= 0,
        "cloud accuracy on the sites' test splits rises from round 0 to the last round":
            cloud["selected"][str(rounds)]["sites_mean"]["mean"] > cloud["selected"]["0"]["sites_mean"]["mean"],
        "upload at most 5 % of the bytes the sites saw": uploads["selected"]["share"] <= 0.05,
        "the cloud promotes at least one candidate in every seed (selected uploads)":
            all(n >= 1 for n in promotions["per_seed"]),
        f"mono site served >= +10 points over the base as-is by round {rounds}":
            all(gains[site][str(rounds)]["mean"] >= 0.10 for site in sites if seeds[0]["sites"][site]["role"] == "mono"),
        "selected uploads reach random's final cloud accuracy with at most 0.5x its labels":
            labels_needed["mean"] is not None and labels_needed["mean"] <= 0.5,
    }
    if reached:  # measured only when the run compared fine-tune and scratch
        targets["fine-tune reaches scratch's final accuracy in at most a quarter of scratch's time"] = \
            all(reached) and ratios["mean"] is not None and ratios["mean"] <= 0.25
    return {"edge": edge, "gain_over_base": gains, "old_rule": old_rule, "rounds_changed": changed,
            "labels_home": home, "labels_needed_vs_random": labels_needed,
            "cloud_promotions": promotions, "ensemble_minus_best_member": ensemble_vs_member,
            "cloud": cloud, "uploads": uploads, "finetune_vs_scratch_time_ratio": ratios,
            "finetune_reached_scratch": f"{sum(reached)}/{len(reached)}", "targets": targets}


def labels_to_reach(cloud_rows: list[dict]) -> float | None:
    """Labels the selected arm spent until its cloud model first matched the random arm's final accuracy on the
    sites' test splits, as a share of the labels the random arm spent in all (None: never matched)."""
    by_arm = {arm: sorted((r for r in cloud_rows if r["arm"] == arm and r["round"] > 0), key=lambda r: r["round"])
              for arm in ("selected", "random")}
    if not by_arm["random"]:
        return None
    target, spent = by_arm["random"][-1]["sites_mean"], by_arm["random"][-1].get("labels") or 0
    start = next(r["sites_mean"] for r in cloud_rows if r["arm"] == "random" and r["round"] == 0)
    if target <= start:
        return None  # random's uploads bought nothing: there is no accuracy to reach
    for row in by_arm["selected"]:
        if row["sites_mean"] >= target and spent:
            return round((row.get("labels") or 0) / spent, 4)
    return None


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, rounds = result["summary"], result["settings"]["rounds"]
    sites = sorted(summary["edge"])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for site, colour in zip(sites, ("C0", "C1", "C2")):
        role = result["seeds"][0]["sites"][site]["role"]
        xs = list(range(1, rounds + 1))
        for key, style in (("served", "-o"), ("base_as_is", ":x")):
            m = [summary["edge"][site][str(r)][key]["mean"] for r in xs]
            e = [summary["edge"][site][str(r)][key]["std"] for r in xs]
            ax.errorbar(xs, m, yerr=e, fmt=style, color=colour, capsize=3,
                        label=f"{site} ({role}) {'served' if key == 'served' else 'base as-is'}")
    ax.set(title="Edge: served model vs the base as-is (site test)", xlabel="round", ylabel="accuracy",
           xticks=list(range(1, rounds + 1)))
    ax.legend(fontsize=7)
    ax = axes[1]
    xs = list(range(0, rounds + 1))
    for arm, style in (("selected", "-o"), ("random", "--s")):
        for key, colour in (("sites_mean", "C3"), ("generic", "C7")):
            m = [summary["cloud"][arm][str(r)][key]["mean"] for r in xs]
            e = [summary["cloud"][arm][str(r)][key]["std"] for r in xs]
            ax.errorbar(xs, m, yerr=e, fmt=style, color=colour, capsize=3,
                        label=f"{arm} uploads: {'sites test (mean)' if key == 'sites_mean' else 'generic test'}")
    ax.set(title="Cloud model by round", xlabel="round", ylabel="accuracy", xticks=xs)
    ax.legend(fontsize=7)
    ax = axes[2]
    for row, colour in zip(result["seeds"][0]["scratch"], ("C0", "C1", "C2")):
        for kind, style in (("finetune", "-o"), ("scratch", ":.")):
            t, a = zip(*row[kind]["points"])
            ax.plot(t, a, style, color=colour, label=f"{row['site']} {kind}")
    ax.set(title="Fine-tune vs scratch, round 1, seed 0 (site test)", xlabel="training seconds", ylabel="accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def markdown(result: dict) -> str:
    s, rounds = result["summary"], result["settings"]["rounds"]
    pct = lambda x: "–" if x is None or x["mean"] is None else f"{100 * x['mean']:.1f} ± {100 * x['std']:.1f}"  # noqa: E731
    lines = ["| site (role) | round | base as-is | best member (picked on val) | ensemble FP32 | ensemble INT8 | served | served − base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for site, by_round in s["edge"].items():
        role = result["seeds"][0]["sites"][site]["role"]
        for r in range(1, rounds + 1):
            e = by_round[str(r)]
            lines.append(f"| {site} ({role}) | {r} | {pct(e['base_as_is'])} | {pct(e['best_member'])} | "
                         f"{pct(e['ensemble_fp32'])} | {pct(e['ensemble_int8'])} | {pct(e['served'])} | "
                         f"{pct(s['gain_over_base'][site][str(r)])} |")
    lines += ["", "Same candidates, the rule before issue 16 (accuracy, then log-loss; no test): what it would have "
              "served, on test.", "", "| site (role) | round | new rule: served − base | old rule: served − base |"
              " rounds the new rule changed what serves (of " + str(rounds) + ") |", "|---|---:|---:|---:|---:|"]
    for site in s["edge"]:
        role = result["seeds"][0]["sites"][site]["role"]
        for r in range(1, rounds + 1):
            lines.append(f"| {site} ({role}) | {r} | {pct(s['gain_over_base'][site][str(r)])} | "
                         f"{pct(s['old_rule'][site][str(r)]['gain'])} | "
                         f"{s['rounds_changed'][site]['mean']:.2f} ± {s['rounds_changed'][site]['std']:.2f} |")
    p = s["cloud_promotions"]
    lines += ["", f"Cloud gate, {p['decisions']} decisions (both chains, all seeds and rounds): the new rule promoted "
              f"{p['new']}, the old rule would have promoted {p['old']}; exam images refused by the cloud: "
              f"{p['exam_refused']}. Promotions of the selected chain per seed: {p.get('per_seed')}.",
              "", "Labels that came home per site and round (mean ± std over seeds):", "",
              "| site | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " |",
              "|---|" + "---:|" * rounds]
    for site, by_round in s.get("labels_home", {}).items():
        lines.append(f"| {site} | " + " | ".join(
            "–" if by_round[str(r)]["mean"] is None else f"{by_round[str(r)]['mean']:.0f} ± {by_round[str(r)]['std']:.0f}"
            for r in range(1, rounds + 1)) + " |")
    need = s.get("labels_needed_vs_random") or {}
    lines += ["", "Labels the selected chain spent to reach the random chain's final accuracy on the sites' test "
              "splits, as a share of the random chain's labels: " +
              ("not measured (random's chain never improved, or selected never reached it)" if need.get("mean") is None else f"{need['mean']:.2f} ± {need['std']:.2f} "
                                                               f"({need['n']} of {len(result['seeds'])} seeds reached it)")]
    lines += ["", "| cloud chain | round | generic test | sites' test (mean) | " +
              " | ".join(sorted(s["edge"])) + " |", "|---|---:|---:|---:|" + "---:|" * len(s["edge"])]
    for arm, by_round in s["cloud"].items():
        for r in range(0, rounds + 1):
            c = by_round[str(r)]
            lines.append(f"| {arm} | {r} | {pct(c['generic'])} | {pct(c['sites_mean'])} | " +
                         " | ".join(pct(c[site]) for site in sorted(s["edge"])) + " |")
    lines += ["", "| uploads | bytes uploaded | bytes seen | share | sites' accuracy gain per uploaded MB |",
              "|---|---:|---:|---:|---:|"]
    for arm, u in s["uploads"].items():
        lines.append(f"| {arm} | {u['uploaded_bytes']:,} | {u['seen_bytes']:,} | {100 * u['share']:.2f} % | "
                     f"{u['site_accuracy_gain_per_mb']:+.3f} |")
    lines += ["", f"Fine-tune vs scratch: the fine-tune reached scratch's final test accuracy in "
              f"{s['finetune_reached_scratch']} site-seeds; time to reach it / scratch's training time = "
              f"{pct(s['finetune_vs_scratch_time_ratio'])} %.", "", "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in s["targets"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=Settings.seeds)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, few epochs: checks the pipeline")
    parser.add_argument("--no-scratch", action="store_true", help="leave out round 1's fine-tune-vs-scratch runs")
    parser.add_argument("--only-seed", type=int, help="run this one seed (to spread seeds over processes; "
                        "bench/loop.py --merge joins their results)")
    parser.add_argument("--merge", nargs="+", type=Path, help="join the seeds of these result files (same settings)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds a cut-short run of the same settings saved, and run only the rest")
    args = parser.parse_args()
    settings = Settings(seeds=args.seeds, rounds=args.rounds, scratch=not args.no_scratch)
    if args.quick:
        settings = Settings(seeds=1, rounds=2, pretrain_epochs=2, retrain_epochs=1, finetune_epochs=1,
                            scratch_epochs=2)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "loop-quick" if args.quick else "loop"
    if args.merge:
        return merge(args.merge, args.out / stem)
    seeds = _saved_seeds(args.out / f"{stem}.json", settings) if args.resume else []
    todo = [args.only_seed] if args.only_seed is not None else range(len(seeds), settings.seeds)
    if args.only_seed is not None:
        stem = f"{stem}-seed{args.only_seed}"
    for seed in todo:
        with tempfile.TemporaryDirectory(prefix=f"bench-loop-{seed}-") as tmp:
            seeds.append(run_seed(seed, settings, Path(tmp), lambda line: print(line, flush=True)))
        # written after every seed: a run cut short still leaves the seeds it finished (marked partial)
        result = {"benchmark": "loop", "settings": settings.__dict__, "seeds": seeds,
                  "partial": len(seeds) < settings.seeds, "summary": summarise(seeds, settings.rounds),
                  "seconds": round(time.monotonic() - started, 1), "machine": machine_info(),
                  "command": "python bench/loop.py " + " ".join(sys.argv[1:])}
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out / f"{stem}.png")
        (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out / stem}.json, .png, .md in {result['seconds'] / 60:.1f} min")
    return 0


def merge(paths: list[Path], out: Path) -> int:
    """One result from the seeds of several runs of the same settings (each seed once)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if any(r["settings"] != runs[0]["settings"] for r in runs):
        raise SystemExit("the runs differ in their settings: not merged")
    seeds = sorted({s["seed"]: s for r in runs for s in r["seeds"]}.values(), key=lambda s: s["seed"])
    settings = runs[0]["settings"]
    result = {**runs[0], "seeds": seeds, "partial": len(seeds) < settings["seeds"],
              "summary": summarise(seeds, settings["rounds"]), "seconds": max(r["seconds"] for r in runs),
              "command": " + ".join(r["command"] for r in runs) + f" (merged: python bench/loop.py --merge "
                                                                  f"{' '.join(map(str, paths))})"}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _saved_seeds(path: Path, settings: Settings) -> list[dict]:
    """The seeds an earlier run of the same settings finished (none if its settings differ)."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings.__dict__:
        print(f"{path}: other settings, starting over", flush=True)
        return []
    print(f"{path}: resuming after seeds {[s['seed'] for s in saved['seeds']]}", flush=True)
    return saved["seeds"]


if __name__ == "__main__":
    sys.exit(main())
