"""Write the table of docs/reliability.md from what the code prints, never by hand:

    python tests/reliability_table.py docs/reliability.md    # replaces the rows between the <!-- cases --> marks
    python tests/reliability_table.py                        # prints the table

Every case of reliability_cases*.py runs (with the same checks as the tests), then the scenarios that succeed on
purpose (AMP skipped steps, kill -9 and resume) and the library-only cases.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from reliability_kit import CASES, amp_skipped_steps, cases, kill_and_resume, run_case, workspace

THEMES = ("scales", "checkpoints", "data", "cli", "training")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def case_rows(tmp: Path) -> list[tuple[str, ...]]:
    for theme in THEMES:
        cases(theme)  # imports (registers) every case module
    rows = []
    for c in sorted(CASES, key=lambda c: THEMES.index(c.theme)):
        folder = tmp / c.id
        code, _, line = run_case(c, folder)
        assert all(e in line for e in c.expect), (c.id, line)
        line = line.replace(f"{folder}/", "").replace(str(folder), ".").replace(f"{workspace().root}/", "")
        note = " (after argparse's usage lines)" if c.usage else ""
        proof = c.tested_in or f"test_reliability_{c.theme}.py"
        rows.append((c.theme, c.name, str(code), f"`{_cell(line)}`{note}", proof))
    return rows


def library_rows() -> list[tuple[str, ...]]:
    import repopt
    from repopt.models import create

    scales = repopt.extract_scales(create("repopt_vgg_tiny", mode="hs"))
    scales["stage1.0.conv"]["identity"] = torch.ones(16)
    model = create("repopt_vgg_tiny", strides=(1, 2, 2, 2, 2))  # stage1.0.conv: 16 -> 16 channels, stride 2
    try:
        scales.bind(model)
        message = "(accepted!)"
    except repopt.ScalesError as e:
        message = f"ScalesError: {e}"
    return [("scales", "`Scales.bind`: identity branch on a stride-2 conv with equal channels (library)", "-",
             f"`{message}`", "test_reliability_scales.py")]


def scenario_rows(tmp: Path) -> list[tuple[str, ...]]:
    amp = amp_skipped_steps(workspace(), tmp / "amp")
    printed = [ln.replace(f"{tmp}/", "") for ln in amp["stdout"].splitlines() if "skipped" in ln]
    rows = [("training", "GradScaler on, inf gradients at 3 steps of epoch 2 (injected; CPU, see above)",
             str(amp["code"]), "<br>".join(f"`{_cell(ln)}`" for ln in printed)
             + f"<br>result.json skipped_steps = {amp['result'].get('skipped_steps')}",
             "test_reliability_training.py")]
    crash = kill_and_resume(tmp / "crash")
    k = crash["killed"]
    summary = (f"killed with checkpoint.pt at epoch {k['epoch']}, {len(k['metrics'])} metrics row(s), model written: "
               f"{k['model_written']}, temp files: {k['temp_files'] or 'none'}; the re-run kept that row and finished "
               f"{len(crash['metrics'])} epochs; final weights torch.equal to an uninterrupted run: {crash['equal']} "
               f"({crash['tensors']} tensors)")
    rows.append(("crash", "kill -9 in epoch 2 of `repopt train --method plain --epochs 3`, then the same command",
                 "-9, then 0", summary, "test_reliability_crash.py"))
    return rows


def main(path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = case_rows(Path(tmp)) + library_rows() + scenario_rows(Path(tmp) / "scenarios")
    lines = ["| # | theme | case | exit | what it printed | proved by |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | " + " | ".join(row[:3]) + f" | {row[3]} | {row[4]} |" for i, row in enumerate(rows, 1)]
    table = "\n".join(lines) + "\n"
    if path is None:
        print(table)
        return
    doc = Path(path).read_text()
    start, end = doc.index("<!-- cases -->\n") + len("<!-- cases -->\n"), doc.index("<!-- /cases -->")
    Path(path).write_text(doc[:start] + table + doc[end:])
    print(f"{path}: {len(rows)} cases")


if __name__ == "__main__":
    main(*sys.argv[1:])
