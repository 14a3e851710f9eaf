"""The base models the cloud deployed to this site: which are complete and intact, and which each member uses.

A deploy writes ``models/base/<version>/model.pt`` and, last, ``model.pt.sha256``; a base model counts
only when the two agree, so a cut upload or a damaged file is never fine-tuned from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge_agent.errors import FinetuneError
from edge_agent.fileio import HashCache
from edge_agent.layout import AgentPaths

log = logging.getLogger(__name__)
_hashes = HashCache()  # per process: the daemon asks every tick, the files rarely change


def verified_base_models(paths: AgentPaths, artifact: str = "model.pt") -> list[str]:
    """Base model versions whose ``artifact`` matches the ``<artifact>.sha256`` the cloud wrote beside it
    (``model.pt`` to fine-tune from; ``ensemble.onnx`` at an ``edge-serve`` site, to serve as it is)."""
    good = []
    for folder in sorted(p for p in paths.base_models.glob("*") if p.is_dir() and not p.name.startswith(".")):
        weights, digest = folder / artifact, folder / f"{artifact}.sha256"
        try:
            expected = digest.read_text().split()[0].strip()
        except (OSError, IndexError):
            continue  # deploy not finished: the checksum is written last
        if weights.is_file() and _hashes.sha256(weights) == expected:
            good.append(folder.name)
        else:
            log.warning("base model %s does not match its sha256; ignored", folder.name)
    return good


def base_models(paths: AgentPaths) -> list[tuple[str, Path]]:
    """Deployed base models, oldest first, whose sha256 checks out: (version, checkpoint path)."""
    return [(v, paths.base_models / v / "model.pt") for v in verified_base_models(paths)]


def pick_bases(paths: AgentPaths, archs: list[str]) -> list[tuple[str, Path, str]]:
    """For each member arch, the newest base of that arch, else the newest base of any arch.

    Returns (version, checkpoint, arch actually used) per member.
    """
    import torch

    bases = base_models(paths)
    if not bases:
        raise FinetuneError("no verified base model under models/base/")
    arch_of = {}
    for version, path in bases:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        arch_of[version] = payload["meta"]["spec"]["arch"]
    newest = bases[-1]
    chosen = []
    for arch in archs:
        match = [b for b in bases if arch_of[b[0]] == arch]
        version, path = match[-1] if match else newest
        if not match:
            log.warning("no base model of arch %s; member uses %s (%s)", arch, version, arch_of[version])
        chosen.append((version, path, arch_of[version]))
    return chosen
