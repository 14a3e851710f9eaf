"""What a shadow challenger costs the edge per production image (issue 24).

Two ensembles of the demo's shape (three slim_resnet members at 128, 112 and 96 px, fused into one graph at
128 px; weights do not change the cost) serve one site: the agent classifies each inbox image with the serving
one, and with a challenger waiting in shadow also decodes the image again and runs the shadow's graph
(edge_agent.shadow.ShadowScorer), on one thread as the agent does. Real ELPV cells as PNG, 300 px.

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


def per_image_ms(step, raws: list[bytes]) -> dict:
    times = []
    for raw in raws:
        started = time.perf_counter()
        step(raw)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(float(np.percentile(times, 95)), 2)}


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
        alone = per_image_ms(serve, raws)
        set_shadow(paths, "challenger", [], {})
        shadow(raws[0], serve(raws[0]), 10_000_000)  # loads the shadow graph once
        both = per_image_ms(serve_and_shadow, raws)
        assert all(v is not None for v in verdicts), "the shadow scored every image"
    result = {"benchmark": "shadow_cost", "images": IMAGES, "members": [f"slim_resnet@{s}" for s in SIZES],
              "threads": 1, "serving_only": alone, "serving_and_shadow": both,
              "extra_ms_per_image": round(both["median_ms"] - alone["median_ms"], 2),
              "machine": machine_info(), "command": "python bench/shadow_cost.py"}
    out = REPO / "bench" / "results" / "shadow_cost.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"per image, 1 thread: serving only {alone['median_ms']} ms (p95 {alone['p95_ms']}); with a shadow "
          f"challenger {both['median_ms']} ms (p95 {both['p95_ms']}): +{result['extra_ms_per_image']} ms")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
