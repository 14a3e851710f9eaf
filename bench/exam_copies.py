"""Near-copies of exam images: how often the perceptual hash catches a copy, and how often it holds back a
distinct image (issue 24).

Each seed draws 400 of ELPV's 2,624 cells as one site's exam (published as :func:`edge_agent.perceptual.file_phashes`
does) and measures, with the cloud's own check (:class:`orchestrator.exams.ExamList`, within
``perceptual.MAX_DISTANCE`` bits):
- caught: copies of exam cells re-encoded as JPEG (q70, q90), resized (200 px, 128 px), centre-cropped (3 %,
  6 %), cropped off-centre (3 %), and JPEG + resize, each as a sample's PNG;
- false refusals: the other 2,224 cells (distinct cells; ELPV holds a few true duplicates, counted here too).

    .venv/bin/python bench/exam_copies.py            # 3 seeds, about a minute

Writes bench/results/exam_copies.json (with the machine).
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.perceptual import MAX_DISTANCE, as_bits, file_phashes, sample_bits  # noqa: E402
from orchestrator.exams import ExamList  # noqa: E402
from orchestrator.training import machine_info  # noqa: E402

EXAM_CELLS = 400
COPIES_PER_KIND = 200


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _jpeg(pixels: np.ndarray, quality: int, size: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if size:
        image = image.resize((size, size))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return _png(np.asarray(Image.open(io.BytesIO(out.getvalue())).convert("L")))  # what a site uploads: a PNG


def _crop(pixels: np.ndarray, share: float, centred: bool = True) -> bytes:
    h, w = pixels.shape
    d = int(round(h * share))
    return _png(pixels[d // 2:h - (d - d // 2), d // 2:w - (d - d // 2)] if centred else pixels[d:, d:])


COPIES = {
    "jpeg q70": lambda p: _jpeg(p, 70), "jpeg q90": lambda p: _jpeg(p, 90),
    "resized 200 px": lambda p: _png(np.asarray(Image.fromarray(p).resize((200, 200)))),
    "resized 128 px": lambda p: _png(np.asarray(Image.fromarray(p).resize((128, 128)))),
    "centre crop 3 %": lambda p: _crop(p, 0.03), "centre crop 6 %": lambda p: _crop(p, 0.06),
    "off-centre crop 3 %": lambda p: _crop(p, 0.03, centred=False),
    "jpeg q80 + resized 224 px": lambda p: _jpeg(p, 80, 224),
}


def run_seed(cells: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cells))
    exam, others = order[:EXAM_CELLS], order[EXAM_CELLS:]
    listed = ExamList("site", frozenset(), as_bits(sorted({h for i in exam for h in file_phashes(_png(cells[i]))})))
    caught = {}
    for kind, copy in COPIES.items():
        hits = [listed.near(sample_bits(copy(cells[i]))) is not None for i in exam[:COPIES_PER_KIND]]
        caught[kind] = sum(hits) / len(hits)
    held = [listed.near(sample_bits(_png(cells[i]))) is not None for i in others]
    return {"seed": seed, "caught": caught, "false_refusal": sum(held) / len(held), "distinct_cells": len(held)}


def main() -> int:
    from elpv_dataset.utils import load_dataset

    started = time.monotonic()
    cells = load_dataset()[0]
    seeds = [run_seed(cells, seed) for seed in range(3)]
    mean_std = lambda xs: {"mean": round(statistics.mean(xs), 4), "std": round(statistics.pstdev(xs), 4)}  # noqa: E731
    summary = {"caught": {k: mean_std([s["caught"][k] for s in seeds]) for k in COPIES},
               "false_refusal": mean_std([s["false_refusal"] for s in seeds])}
    result = {"benchmark": "exam_copies", "max_distance_bits": MAX_DISTANCE, "exam_cells": EXAM_CELLS,
              "seeds": seeds, "summary": summary, "seconds": round(time.monotonic() - started, 1),
              "machine": machine_info(), "command": "python bench/exam_copies.py"}
    out = REPO / "bench" / "results" / "exam_copies.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"near-copies of {EXAM_CELLS} exam cells caught (within {MAX_DISTANCE} bits), mean ± std over 3 seeds:")
    for kind, figure in summary["caught"].items():
        print(f"  {kind:28s} {100 * figure['mean']:5.1f} % ± {100 * figure['std']:.1f}")
    f = summary["false_refusal"]
    print(f"distinct cells held back (false refusals): {100 * f['mean']:.2f} % ± {100 * f['std']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
