"""Two loop benchmark results side by side (bench/loop.py's JSON): per site, over rounds and seeds.

    .venv/bin/python bench/loop_compare.py bench/results/loop-issue16.json bench/results/loop.json

Prints a markdown table: base as-is, the best member picked on val (where the result has the members' val
figures: from issue 20 on) and the best on test (which flatters it), the ensemble (FP32), served, and the
differences, mean ± std over each site's fine-tunes (rounds where the gate kept the champion repeat the round
before and are left out; a site too small to fine-tune adds only its base and served figures).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(path: Path) -> dict[str, dict[str, list[float]]]:
    result = json.loads(path.read_text())
    out: dict[str, dict[str, list[float]]] = {}
    for seed in result["seeds"]:
        for row in seed["edge"]:
            if row.get("carried_over"):
                continue  # the gate kept the champion: the same figures as the round before, not a new draw
            if row.get("skipped"):  # too few gate images to fine-tune: the base as-is serves
                site = out.setdefault(f"{row['site']} ({row['role']})", {})
                for name, value in (("base as-is", row["base_as_is"]), ("served", row["served"]),
                                    ("served − base", row["served"] - row["base_as_is"])):
                    site.setdefault(name, []).append(100 * value)
                continue
            site = out.setdefault(f"{row['site']} ({row['role']})", {})
            on_test = row.get("best_member_on_test", row["best_member"])
            figures = {"base as-is": row["base_as_is"], "best member on test": on_test,
                       "ensemble": row["ensemble_fp32"], "ensemble − best on test": row["ensemble_fp32"] - on_test,
                       "served": row["served"], "served − base": row["served"] - row["base_as_is"]}
            if "members_val" in row:  # before issue 20 the loop kept only the best member on test
                figures |= {"best member (val)": row["best_member"],
                            "ensemble − best member (val)": row["ensemble_fp32"] - row["best_member"]}
            for name, value in figures.items():
                site.setdefault(name, []).append(100 * value)
    return out


def cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}"


def main(argv: list[str]) -> int:
    before, after = (rows(Path(p)) for p in argv[1:3])
    names = ["base as-is", "best member (val)", "best member on test", "ensemble", "ensemble − best member (val)",
             "ensemble − best on test", "served", "served − base"]
    print("| site | run | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for site in after:
        for label, table in (("before (issue 16)", before), ("now (issue 20)", after)):
            figures = table.get(site, {})
            print(f"| {site} | {label} | " + " | ".join(cell(figures.get(n)) for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
