"""What a shadow challenger costs the edge per production image (issue 24).

Two ensembles of the demo's shape (three slim_resnet members at 128, 112 and 96 px, fused into one graph at
128 px; weights do not change the cost) serve one site: the agent classifies each inbox image with the serving
one, and with a challenger waiting in shadow also decodes the image again and runs the shadow's graph
(edge_agent.shadow.ShadowScorer), on one thread as the agent does. Real ELPV cells as PNG, 300 px; the two
steps are timed image by image, interleaved, three passes.

    .venv/bin/python bench/shadow_cost.py        # about a minute

Writes bench/results/shadow_cost.json (with the machine).
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.activation import activate  # noqa: E402
from edge_agent.ensemble import export_ensemble  # noqa: E402
from edge_agent.imaging import decode_image  # noqa: E402
from edge_agent.layout import AgentPaths  # noqa: E402
from edge_agent.models import ModelSpec, Normalization, build_model  # noqa: E402
from edge_agent.serving import EnsembleHandle, classify  # noqa: E402
from edge_agent.shadow import ShadowScorer, set_shadow  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

SIZES = (128, 112, 96)
IMAGES = 200


def ensemble(paths: AgentPaths, version: str, seed: int) -> None:
    members = [build_model(ModelSpec(arch="slim_resnet", num_classes=2, image_size=size), seed=seed + i)
               for i, size in enumerate(SIZES)]
    (paths.ensembles / version).mkdir(parents=True)
    export_ensemble(members, [Normalization()] * len(SIZES), [1 / 3] * 3, paths.ensembles / version / "ensemble.onnx",
                    image_size=128, class_names=["functional", "defective"], metadata={"version": version},
                    sizes=list(SIZES))


def per_image_ms(steps: dict, raws: list[bytes], repeats: int = 3) -> dict[str, dict]:
    """Each step timed on every image, the steps interleaved image by image (so that load from elsewhere on the
    machine falls on all of them alike); median and p95 per step."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for raw in raws:
            for name, step in steps.items():
                started = time.perf_counter()
                step(raw)
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: {"median_ms": round(statistics.median(t), 2), "p95_ms": round(float(np.percentile(t, 95)), 2)}
            for name, t in times.items()}


def main() -> int:
    from elpv_dataset.utils import load_dataset

    cells = load_dataset()[0][:IMAGES]
    raws = []
    for pixels in cells:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        raws.append(out.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        paths = AgentPaths(Path(tmp) / "agent")
        paths.ensure()
        ensemble(paths, "serving", 0)
        ensemble(paths, "challenger", 10)
        activate(paths, "serving")
        serving = EnsembleHandle(paths.active_link, threads=1, image_size=128).get()
        shadow = ShadowScorer(paths)

        def serve(raw: bytes):
            return classify(serving, decode_image(raw, 128)[None])[0]

        verdicts = []

        def serve_and_shadow(raw: bytes):
            verdicts.append(shadow(raw, serve(raw), 10_000_000))

        for raw in raws[:10]:
            serve(raw)  # warm-up
        set_shadow(paths, "challenger", [], {})
        verdicts = [shadow(raw, serve(raw), 10_000_000) for raw in raws[:10]]  # loads the shadow graph once
        assert all(v is not None for v in verdicts), "the shadow scores every image"
        answered = {raw: serve(raw) for raw in raws}
        timed = per_image_ms({"serving": serve, "shadow": lambda raw: shadow(raw, answered[raw], 10_000_000)}, raws)
    alone, extra = timed["serving"], timed["shadow"]
    result = {"benchmark": "shadow_cost", "images": IMAGES, "members": [f"slim_resnet@{s}" for s in SIZES],
              "threads": 1, "serving": alone, "shadow_extra": extra,
              "extra_share": round(extra["median_ms"] / alone["median_ms"], 3),
              "machine": machine_info(), "command": "python bench/shadow_cost.py"}
    out = REPO / "bench" / "results" / "shadow_cost.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"per image, 1 thread: serving (decode + graph) {alone['median_ms']} ms (p95 {alone['p95_ms']}); the shadow "
          f"challenger adds {extra['median_ms']} ms (p95 {extra['p95_ms']}), {100 * result['extra_share']:.0f} % more")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
