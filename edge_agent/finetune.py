"""One fine-tune: site data → K members in parallel (:mod:`edge_agent.members`) → fused ensemble → gate →
atomic activation.

The whole fine-tune runs in a process of its own (``edgeloop-agent finetune``), started and watched by the
daemon. It stops, terminating its workers, on SIGTERM or when its parent dies; nothing it leaves behind is
visible as a model until :mod:`edge_agent.activation` publishes it with one rename.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_agent.activation import (EXIT_FENCED, EXIT_HELD, STAGING_PREFIX, Fenced, activate, active_dir,
                                   active_graph_hold, active_version, fenced_versions, publish, staging_dir,
                                   sweep_staging)
from edge_agent.basemodels import pick_bases
from edge_agent.candidates import choose_precision, discard, gain_over_base, gate_score, score, stage_base_as_is
from edge_agent.config import AgentConfig
from edge_agent.errors import FinetuneError
from edge_agent.fileio import write_json_atomic
from edge_agent.gate import choose
from edge_agent.ids import new_id
from edge_agent.layout import AgentPaths
from edge_agent.members import (MemberJob, available_memory, make_jobs, member_sizes, members_at_once,
                                train_members)
from edge_agent.serving import ENSEMBLE_FILE, validate_ensemble
from edge_agent.shadow import ONE_SHOT_SHARE, clear_shadow, set_shadow
from edge_agent.sitedata import SPLITS, finetune_blocker, load_site_splits, split_counts

log = logging.getLogger(__name__)

LOCK_WAIT_S = 30.0
EXIT_ABANDONED = 3
EXIT_NO_INPUT = 4


class GraphHeld(FinetuneError):
    """The active ensemble breaks the graph contract (:func:`edge_agent.activation.active_graph_hold`): the
    fine-tune cannot gate against it, so it is held (exit :data:`EXIT_HELD`, still owed), not failed."""


# ---- the run ---------------------------------------------------------------------------------------

class Progress:
    """``runs/<id>/progress.json``: what the daemon's status shows while a fine-tune runs."""

    def __init__(self, run_dir: Path, run_id: str, reason: str, members: int):
        self.path = run_dir / "progress.json"
        self.data: dict[str, Any] = {"run_id": run_id, "reason": reason, "phase": "starting", "started": time.time(),
                                     "members": {str(k): {"epoch": 0} for k in range(members)}}
        self.write()

    def phase(self, name: str) -> None:
        self.data["phase"] = name
        self.write()

    def event(self, kind: str, index: int, payload: dict) -> None:
        member = self.data["members"][str(index)]
        if kind == "epoch":
            member.update(epoch=payload["epoch"], val_acc=payload["val_acc"], train_loss=payload["train_loss"])
            log.info("member %d epoch %d: train loss %.4f, val acc %.4f (%.1fs)", index, payload["epoch"],
                     payload["train_loss"], payload["val_acc"], payload["seconds"])
        else:
            member.update(done=True, best_val_acc=payload["best_val_acc"])
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.data)


def save_splits(run_dir: Path, splits: dict) -> None:
    for name in ("train", "val"):
        np.save(run_dir / f"{name}_images.npy", splits[name].images)
        np.save(run_dir / f"{name}_labels.npy", splits[name].labels)


def build_ensemble(config: AgentConfig, jobs: list[MemberJob], splits: dict, version: str, staged: Path,
                   class_names: list[str], extra_meta: dict[str, str]) -> dict[str, Any]:
    """Weights (fitted on val when val is large enough: ``finetune.min_val_for_weights``, else equal), the
    fused graph exported into ``staged`` at the site's size (members of other sizes resize inside it);
    returns the weights, how they were chosen and the val results."""
    from edge_agent.ensemble import equal_or_fitted, evaluate_graph, export_ensemble
    from edge_agent.export import resize_images
    from edge_agent.models import load_checkpoint
    from edge_agent.onnx_model import OnnxClassifier
    from edge_agent.train import predict_proba

    loaded = [load_checkpoint(job.checkpoint) for job in jobs]
    sizes = [meta.spec.image_size for _, meta in loaded]
    val = splits["val"]
    member_val = np.stack([predict_proba(m, resize_images(val.images, meta.spec.image_size), meta.normalization)
                           for m, meta in loaded], axis=1)
    fit, how = equal_or_fitted(member_val, val.labels, config.finetune.min_val_for_weights)
    log.info("ensemble weights %s: %s", [round(w, 3) for w in fit.weights], how)
    path = export_ensemble([m for m, _ in loaded], [meta.normalization for _, meta in loaded], fit.weights,
                           staged / "ensemble.onnx", image_size=config.image_size, class_names=class_names,
                           metadata={"version": version, "site": config.site, **extra_meta}, sizes=sizes)
    classifier = OnnxClassifier(path, threads=config.workers)
    return {"weights": fit.weights, "weights_fitted": len(val) >= config.finetune.min_val_for_weights,
            "weights_reason": how, "member_sizes": sizes, "val": evaluate_graph(classifier, val.images, val.labels)}


def run_finetune(config: AgentConfig, paths: AgentPaths, run_id: str, reason: str,
                 should_stop: Callable[[], bool], parallel: bool = True) -> dict[str, Any]:
    """One complete fine-tune: members → ensemble → gate → (publish + activate). Returns the report.

    A rollback of a base it builds on sets that base aside mid-run: whatever then fails (the base file is
    gone), or the activation itself, ends the run as :class:`Fenced`, not as a failed fine-tune.
    """
    bases = pick_bases(paths, [m.arch for m in config.members])
    try:
        return _run_finetune(config, paths, run_id, reason, should_stop, parallel, bases)
    except Exception as exc:
        fenced = fenced_versions(paths) & {b[0] for b in bases}
        if fenced and not isinstance(exc, Fenced):
            raise Fenced(f"base {', '.join(sorted(fenced))} was rolled back during the run ({exc})") from exc
        raise


def _run_finetune(config: AgentConfig, paths: AgentPaths, run_id: str, reason: str, should_stop: Callable[[], bool],
                  parallel: bool, bases: list[tuple[str, Path, str]]) -> dict[str, Any]:
    started = time.time()
    run_dir = paths.runs / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(run_dir, run_id, reason, len(config.members))
    if held := active_graph_hold(paths, config.image_size):  # before minutes of training, not after
        raise GraphHeld(held)
    import torch

    class_names = torch.load(bases[-1][1], map_location="cpu", weights_only=True)["meta"]["class_names"]
    counts = split_counts(paths)
    blocked = finetune_blocker(counts)
    if blocked:
        return serve_base_only(config, paths, run_dir, run_id, reason, blocked, bases, class_names, counts, started)
    progress.phase("loading data")
    splits = load_site_splits(paths, class_names, config.image_size)
    save_splits(run_dir, splits)
    available = available_memory()
    at_once = members_at_once(len(config.members), config.finetune.member_memory_mb << 20, available) \
        if parallel else 1
    member_sizes(config, bases)  # a member whose size cannot take its base's weights fails here, not in a worker
    jobs = make_jobs(config, bases, run_dir, at_once)
    log.info("fine-tune %s: %d members, %d at once (%s MiB available, %d MiB per member), %d threads each, "
             "train/val/gate/test %d/%d/%d/%d", run_id, len(jobs), at_once,
             "?" if available is None else available >> 20, config.finetune.member_memory_mb, jobs[0].threads,
             *(len(splits[s]) for s in SPLITS))
    progress.phase("training")
    train_start = time.time()
    members = train_members(jobs, at_once, should_stop, progress.event)
    train_seconds = time.time() - train_start
    progress.phase("ensembling")
    version = run_id  # the ensemble is named for the run that made it
    staged = staging_dir(paths, version)
    ensemble = build_ensemble(config, jobs, splits, version, staged, class_names,
                              {"run_id": run_id, "bases": json.dumps(sorted({b[0] for b in bases}))})
    if should_stop():
        shutil.rmtree(staged, ignore_errors=True)
        raise InterruptedError("fine-tune stopped")
    progress.phase("gating")
    base_version, base_path, _ = bases[-1]
    base_folder, base_is_new = stage_base_as_is(config, paths, base_version, base_path, class_names)
    fresh = {"new": staged, **({"base": base_folder} if base_is_new else {})}  # published ones were decided
    precisions = _precisions(config, splits, fresh) if config.finetune.int8 else {}
    serving = choose_serving(config, paths, splits, {"base": base_folder, "new": staged})
    for member, val_m, test_m in zip(members, ensemble["val"]["members"],
                                     serving["results"].get("new", {}).get("test", {}).get("members", [])):
        member.update(val_accuracy=val_m["accuracy"], test_accuracy=test_m["accuracy"])
    report = {"run_id": run_id, "reason": reason, "version": version, "site": config.site, "started": started,
              "bases": [b[0] for b in bases], "parallel": parallel, "members_at_once": at_once,
              "train_seconds": round(train_seconds, 3),
              "members": members, "ensemble": ensemble, "candidates": serving["results"],
              "serving": serving["chosen"], "serving_version": serving["version"],
              "gain_over_base": gain_over_base(serving["results"], serving["chosen"]),
              "decision": serving["decision"], "gate": serving["gate"], "activated": serving["chosen"] != "active",
              "precision": precisions.get(serving["chosen"]), "new_precision": precisions.get("new"),
              "counts": {s: len(splits[s]) for s in SPLITS}}
    write_json_atomic(staged / "report.json", report)
    waits = frozenset({"new"} if serving["chosen"] != "new" and "new" in serving["results"] else ())
    _publish_choice(paths, serving["chosen"], {"new": (staged, True), "base": (base_folder, base_is_new)},
                    judged=serving["judged"], bases=report["bases"], keep=waits)
    report["shadow"] = _keep_challenger(paths, serving, staged, version, report["bases"])
    report.update(finished=time.time(), seconds=round(time.time() - started, 3))
    progress.phase("done")
    write_json_atomic(run_dir / "report.json", report)
    for name in ("train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy"):
        (run_dir / name).unlink(missing_ok=True)
    return report


def _keep_challenger(paths: AgentPaths, serving: dict[str, Any], staged: Path, version: str,
                     bases: list[str]) -> str | None:
    """The new ensemble the gate did not accept waits in shadow (:mod:`edge_agent.shadow`); one that was
    accepted ends the wait of an older shadow. Returns the shadow's version, if any."""
    if serving["chosen"] == "new":
        clear_shadow(paths)
        return None
    if "new" not in serving["results"]:
        return None  # it could not serve at all: nothing to wait for
    publish(paths, staged, version)
    set_shadow(paths, version, sorted(set(bases)), serving["gate"])
    log.info("new ensemble %s waits in shadow: %s", version, serving["decision"])
    return version


def serve_base_only(config: AgentConfig, paths: AgentPaths, run_dir: Path, run_id: str, reason: str, blocked: str,
                    bases: list, class_names: list[str], counts: dict[str, int], started: float) -> dict[str, Any]:
    """Too few labelled images to fine-tune: no member is trained. If nothing serves yet, the base as-is goes
    into service (the simplest alternative needs no evidence to replace nothing); else what serves stays."""
    base_version, base_path, _ = bases[-1]
    current = active_version(paths)
    serving, version = "active", current
    if current is None:
        folder, is_new = stage_base_as_is(config, paths, base_version, base_path, class_names)
        try:  # one published earlier is checked again: only a graph that meets the contract activates
            validate_ensemble(folder / ENSEMBLE_FILE, config.image_size)
        except ValueError as exc:
            raise FinetuneError(f"the base {base_version} as-is cannot serve: {exc}") from None
        final = publish(paths, folder, folder.name.removeprefix(STAGING_PREFIX)) if is_new else folder
        activate(paths, final.name, expected=None, bases=[base_version])  # a fenced base never activates
        serving, version = "base", final.name
    decision = f"{blocked}; {'the base as-is serves' if current is None else 'what serves stays'}"
    log.info("fine-tune %s skipped: %s", run_id, decision)
    report = {"run_id": run_id, "reason": reason, "version": None, "site": config.site, "started": started,
              "bases": [b[0] for b in bases], "members": [], "candidates": {}, "serving": serving,
              "serving_version": version, "decision": decision, "gate": None, "activated": current is None,
              "skipped": blocked, "counts": counts, "finished": time.time(),
              "seconds": round(time.time() - started, 3)}
    write_json_atomic(run_dir / "report.json", report)
    return report


def choose_serving(config: AgentConfig, paths: AgentPaths, splits: dict, staged: dict[str, Path]) -> dict[str, Any]:
    """Score {base as-is, new ensemble, active ensemble} on the gate split and pick what serves.

    Each is scored as it would serve (INT8 where INT8 serves: precision is decided before this). The
    incumbent is the active ensemble, or the base as-is when nothing serves yet; a challenger replaces it
    only through the shared paired gate (``thresholds``: alpha, min_gain, min_gate_images). Candidates are
    scored on the test split too, for the report; the choice reads only the gate answers. ``judged`` is the
    active version the decision was made against (activation refuses if it changed meanwhile).
    """
    folders = dict(staged)
    current = active_dir(paths)
    if current is not None and (held := active_graph_hold(paths, config.image_size)):
        raise GraphHeld(held)  # it changed while the members trained
    if current is not None and current.resolve() != folders["base"].resolve():
        folders["active"] = current
    results = {name: r for name, folder in folders.items()
               if (r := score(folder, splits, config.image_size, config.workers)) is not None}
    if not results:
        raise FinetuneError("no candidate can serve: the base as-is and the new ensemble both failed their checks")
    incumbent = next(n for n in ("active", "base", "new") if n in results)
    order = [n for n in ("base", "active", "new") if n in results]  # ties go to the simpler, then the serving
    answers = {n: gate_score(results[n], splits["gate"].labels) for n in order}
    rule = config.thresholds.gate_rule()
    rule = rule.model_copy(update={"alpha": rule.alpha * ONE_SHOT_SHARE})  # the shadow's later looks: the rest
    chosen, decision = choose(answers, incumbent, rule)
    if current is not None and "active" not in folders and chosen == "base":
        chosen = "active"  # the active ensemble *is* the base as-is: nothing to switch
        results["active"] = results["base"]
    version = results[chosen]["version"] if chosen != "active" else current.name
    log.info("serving %s (%s): %s", chosen, version, decision.reason)
    return {"chosen": chosen, "version": version, "decision": decision.reason, "gate": decision.as_dict(),
            "results": results, "judged": current.name if current is not None else None}


def _precisions(config: AgentConfig, splits: dict, folders: dict[str, Path]) -> dict[str, dict]:
    """INT8 or FP32 for each freshly staged candidate (the 0.5-point rule on the val split, never the gate: a
    choice made on the gate would be a second try at it), decided before the gate so that every candidate meets
    the gate at the precision it would serve; every report shows what INT8 costs."""
    return {name: choose_precision(folder, splits["train"].images, splits["val"], config.thresholds.int8_tolerance,
                                   config.image_size, test=splits["test"])
            for name, folder in folders.items()}


def _publish_choice(paths: AgentPaths, chosen: str, staged: dict[str, tuple[Path, bool]],
                    judged: str | None, bases: list[str], keep: frozenset[str] = frozenset()) -> None:
    """Publish (one rename) and activate what was chosen, if the active ensemble is still the one it was
    judged against (:class:`ActivationConflict` otherwise) and no base it was built on was rolled back
    (:class:`Fenced`: then nothing it staged or published stays); drop the other staged folders but those in
    ``keep`` (a challenger that waits in shadow)."""
    for name, (folder, is_new) in staged.items():
        if name == chosen:
            final = publish(paths, folder, folder.name.removeprefix(STAGING_PREFIX)) if is_new else folder
            try:
                activate(paths, final.name, expected=judged, bases=bases)
            except Fenced:
                for other, other_is_new in staged.values():
                    if other_is_new:
                        discard(paths.ensembles / other.name.removeprefix(STAGING_PREFIX))
                        discard(other)
                raise
            log.info("%s %s activated", name, final.name)
        elif is_new and name not in keep:
            discard(folder)


# ---- the process -----------------------------------------------------------------------------------

class RunLock:
    """One fine-tune per agent root at a time (a restarted daemon may race a dying orphan)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def acquire(self, wait_s: float, should_stop: Callable[[], bool]) -> bool:
        self.handle = open(self.path, "a+")
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.time() > deadline or should_stop():
                    return False
                time.sleep(0.2)


def run_finetune_process(config: AgentConfig, paths: AgentPaths, run_id: str | None, reason: str,
                         parent_pid: int | None = None, parallel: bool = True) -> int:
    """Entry point of ``edgeloop-agent finetune``: 0 done (activated or not), 3 stopped, 4 cannot run,
    5 fenced (its base was rolled back while it ran)."""
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if parent_pid is not None:
        def watch_parent():
            while not stop.is_set():
                if os.getppid() != parent_pid:
                    log.warning("the agent that started this fine-tune is gone; stopping")
                    stop.set()
                time.sleep(0.5)
        threading.Thread(target=watch_parent, daemon=True).start()
    lock = RunLock(paths.runs / ".finetune.lock")
    if not lock.acquire(LOCK_WAIT_S, stop.is_set):
        log.error("another fine-tune holds %s", lock.path)
        return EXIT_ABANDONED
    run_id = run_id or new_id()
    sweep_staging(paths)  # under the lock: whatever is staged was left by a killed run
    try:
        report = run_finetune(config, paths, run_id, reason, stop.is_set, parallel)
    except InterruptedError:
        log.warning("fine-tune %s abandoned", run_id)
        return EXIT_ABANDONED
    except Fenced as exc:
        log.warning("fine-tune %s not activated: %s", run_id, exc)
        return EXIT_FENCED
    except GraphHeld as exc:
        log.error("fine-tune %s held: %s", run_id, exc)
        write_json_atomic(paths.runs / run_id / "report.json", {"run_id": run_id, "reason": reason,
                                                                 "held": str(exc), "finished": time.time()})
        return EXIT_HELD
    except FinetuneError as exc:
        log.error("fine-tune %s cannot run: %s", run_id, exc)
        return EXIT_NO_INPUT
    print(json.dumps({k: report[k] for k in ("run_id", "version", "activated", "decision")}))
    return 0
