"""docs/results.md section 6 and the README's demo figures are the printout of the kept pipeline reports
(docs/runs/demo): no cell typed by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import results_table  # noqa: E402

KEPT = sorted((ROOT / "docs" / "runs" / "demo").glob("s*"))


def test_section_6_is_the_printout_of_the_kept_reports(capsys):
    results_table.main([str(d) for d in KEPT])
    printed = capsys.readouterr().out.splitlines()
    rows = [line for line in printed if line.startswith(("| repopt ", "| repvgg ", "| plain "))]
    doc = (ROOT / "docs" / "results.md").read_text()
    assert len(KEPT) == 6 and len(rows) == 3 and all(row in doc for row in rows)
    assert all(line in doc for line in printed if line.startswith("repopt - "))


def test_the_readme_quotes_seed_0_of_the_kept_reports():
    report = json.loads((KEPT[0] / "report.json").read_text())
    top1 = {r["method"]: r["top1"] for r in report["results"]}
    readme = (ROOT / "README.md").read_text()
    quoted = f"RepOpt {top1['repopt']:.2f} %, RepVGG {top1['repvgg']:.2f} %, plain {top1['plain']:.2f} %"
    assert report["seed"] == 0 and quoted in readme
