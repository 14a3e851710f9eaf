"""The labelling queue: people say what the samples the sites sent up are, and retraining uses it.

Samples without an operator's label wait here, the most informative first (the agent's own score: how
unsure the served model was, how much its members disagreed). A label or a discard is saved at once, in
one atomic file under the registry home (``labels.json``, keyed by content hash), so the next retraining set
sees it (:class:`LabelQueue` is a :class:`~orchestrator.samples.Labeller`). Teams that label in Label Studio
export the queue as its JSON tasks and import the annotations back.
"""

from __future__ import annotations

import base64
import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edge_agent.fileio import read_json, write_json_atomic
from orchestrator.samples import Sample

LABELS_FILE = "labels.json"
DISCARDED = "__discarded__"  # what a discard is stored as: the sample is never used, nor asked about again


class LabelError(ValueError):
    """A label that cannot be taken (unknown class or sample, unreadable import file)."""


@dataclass(frozen=True)
class Pending:
    """One sample waiting for a person, with what the site's model said about it."""

    sample: Sample

    @property
    def sha256(self) -> str:
        return self.sample.sha256

    @property
    def prediction(self) -> str | None:
        probs = self.sample.sidecar.get("probabilities") or {}
        return max(probs, key=probs.get) if probs else None

    @property
    def score(self) -> float:
        s = self.sample.sidecar
        return max(s.get("uncertainty") or 0.0, s.get("disagreement") or 0.0)


class LabelQueue:
    """Labels for samples, by content hash, in ``<home>/labels.json``."""

    def __init__(self, home: str | Path, classes: list[str]):
        self.path = Path(home) / LABELS_FILE
        self.classes = list(classes)

    def labels(self) -> dict[str, dict[str, Any]]:
        return read_json(self.path, default={}) or {}

    def pending(self, samples: list[Sample]) -> list[Pending]:
        """Samples nobody has labelled (at the site or here) or discarded, most informative first."""
        done = self.labels()
        waiting = [Pending(s) for s in samples if s.sha256 not in done and not s.sidecar.get("operator_label")]
        return sorted(waiting, key=lambda p: (-p.score, p.sample.sidecar.get("time", 0), p.sha256))

    def set(self, sha256: str, label: str | None, *, by: str = "web", discard: bool = False) -> None:
        """Save one label (or a discard) atomically; the last word on a sample wins."""
        if not discard and label not in self.classes:
            raise LabelError(f"unknown class {label!r}; expected one of {self.classes}")
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise LabelError(f"not a sample id: {sha256!r}")
        with self._lock():
            labels = self.labels()
            labels[sha256] = {"label": DISCARDED if discard else label, "by": by, "time": time.time()}
            write_json_atomic(self.path, labels)

    def __call__(self, sample: Sample) -> int | None:
        """The class index a person gave this sample; None when unlabelled or discarded."""
        label = (self.labels().get(sample.sha256) or {}).get("label")
        return self.classes.index(label) if label in self.classes else None

    def discarded(self) -> set[str]:
        return {sha for sha, entry in self.labels().items() if entry.get("label") == DISCARDED}

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(".labels.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    # ---- Label Studio ---------------------------------------------------------------------------------
    def export_label_studio(self, samples: list[Sample], out: Path) -> int:
        """The pending samples as Label Studio tasks (images inline, the site's prediction pre-filled)."""
        tasks = []
        for item in self.pending(samples):
            image = "data:image/png;base64," + base64.b64encode(item.sample.image).decode()
            task: dict[str, Any] = {"data": {"image": image, "sha256": item.sha256, "site": item.sample.site,
                                             "reasons": ", ".join(item.sample.sidecar.get("reasons", []))}}
            if item.prediction:
                task["predictions"] = [{"model_version": item.sample.sidecar.get("model_version") or "",
                                        "result": [_choice(item.prediction)]}]
            tasks.append(task)
        write_json_atomic(Path(out), tasks)
        return len(tasks)

    def import_label_studio(self, path: Path) -> int:
        """Take the labels from a Label Studio JSON export (the last annotation with a choice wins).

        The whole file is checked before anything is written: one task that is not an object, a sample id
        that is not one, or a class this queue does not know refuses the file with one error naming every
        problem (the first few), and no label is saved.
        """
        try:
            tasks = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LabelError(f"{path}: not a Label Studio JSON export ({exc})") from None
        if not isinstance(tasks, list):
            raise LabelError(f"{path}: expected a list of tasks")
        labels, problems = {}, []
        for number, task in enumerate(tasks, 1):
            try:
                found = _task_label(task)
            except (TypeError, AttributeError, ValueError) as exc:
                problems.append(f"task {number}: {exc}")
                continue
            if found is None:
                continue
            sha, label = found
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                problems.append(f"task {number}: not a sample id: {sha[:80]!r}")
            elif label not in self.classes:
                problems.append(f"task {number}: unknown class {label!r}; expected one of {self.classes}")
            else:
                labels[sha] = label
        if problems:
            raise LabelError(f"{path}: nothing imported; {len(problems)} task(s) refused: " + "; ".join(problems[:5])
                             + ("; ..." if len(problems) > 5 else ""))
        with self._lock():
            saved = self.labels()
            now = time.time()
            saved.update({sha: {"label": label, "by": "label-studio", "time": now} for sha, label in labels.items()})
            write_json_atomic(self.path, saved)
        return len(labels)


def _task_label(task: Any) -> tuple[str, str] | None:
    """(sample id, chosen class) of one exported task; None when nobody chose a class; TypeError/ValueError
    when the task does not have Label Studio's shape."""
    if not isinstance(task, dict):
        raise TypeError(f"not an object (got {type(task).__name__})")
    data = task.get("data") or {}
    if not isinstance(data, dict) or not isinstance(data.get("sha256", ""), str):
        raise TypeError("data.sha256 is not a string")
    choices = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict):
            raise TypeError("an annotation is not an object")
        if annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            value = result.get("value") if isinstance(result, dict) else None
            picked = (value or {}).get("choices") or [] if isinstance(value, (dict, type(None))) else None
            if not isinstance(picked, list) or not all(isinstance(c, str) for c in picked):
                raise TypeError("a result's value.choices is not a list of class names")
            choices += picked
    sha = data.get("sha256")
    return (sha, choices[-1]) if sha and choices else None


def _choice(label: str) -> dict[str, Any]:
    return {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}


LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">{choices}</Choices>
</View>"""


def label_studio_config(classes: list[str]) -> str:
    """The labelling interface to paste into a Label Studio project for these tasks."""
    return LABEL_STUDIO_CONFIG.format(choices="".join(f'<Choice value="{c}"/>' for c in classes))
