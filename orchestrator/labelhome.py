"""Labels go home: every label given in the cloud returns to the site that sent the sample.

For each site with samples in the store, ``labels/<site>.json`` lists the labels of the samples that site sent
(by content hash): people's labels (the labelling page, Label Studio imports) under ``labels``, the pseudo-labels
of confident, unanimous models apart under ``pseudo``. Discards stay in the cloud. The file is rewritten only when
its content changes; the site's agent takes it from there (:mod:`edge_agent.homelabels`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.homelabels import LABELS_KEY, MAX_ENTRIES
from edge_agent.store import Store
from orchestrator.labelling import LabelQueue

PSEUDO = "pseudo"


@dataclass
class SentHome:
    """Per site: people's labels and pseudo-labels now in its file, and whether the file changed."""

    rows: list[dict] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return sum(r["written"] for r in self.rows)


def senders(store: Store) -> dict[str, set[str]]:
    """``{sha256: sites}`` of every sample in the store, from one listing (nothing is read)."""
    sent: dict[str, set[str]] = {}
    for path in store.list("samples/*/*.png"):
        sent.setdefault(Path(path).stem, set()).add(Path(path).parent.name)
    return sent


def labels_for_sites(queue: LabelQueue, sent: dict[str, set[str]]) -> dict[str, dict[str, list[dict]]]:
    """``{site: {"labels": [...], "pseudo": [...]}}``: each label given to a sample, under every site that sent it."""
    out: dict[str, dict[str, list[dict]]] = {site: {"labels": [], "pseudo": []}
                                             for sites in sent.values() for site in sites}
    given = [(sha, entry) for sha, entry in queue.labels().items() if isinstance(entry, dict)]
    for sha, entry in sorted(given, key=lambda item: (_number(item[1].get("time")), item[0])):  # oldest first
        if entry.get("label") not in queue.classes:
            continue  # discards stay in the cloud
        kind = "pseudo" if entry.get("by") == PSEUDO else "labels"
        item = {"sha256": sha, "label": entry["label"], "by": str(entry.get("by", ""))[:64],
                "time": _number(entry.get("time"))}
        for site in sent.get(sha, ()):
            out[site][kind].append(item)
    return out


def send_labels_home(store: Store, queue: LabelQueue) -> SentHome:
    """Write each site's ``labels/<site>.json`` (only where it changed)."""
    result = SentHome()
    for site, lists in sorted(labels_for_sites(queue, senders(store)).items()):
        lists = {key: items[-MAX_ENTRIES // 2:] for key, items in lists.items()}  # the newest, within the site's cap
        data = json.dumps({"site": site, **lists}, sort_keys=True).encode()
        written = store.put_verified(LABELS_KEY.format(site=site), data)
        result.rows.append({"site": site, "people's labels": len(lists["labels"]),
                            "pseudo-labels": len(lists["pseudo"]), "written": written})
    return result


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
