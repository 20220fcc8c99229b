#!/usr/bin/env python3
"""Copy the benchmark results of a GPU session (tools/gpu_session.sh) into bench/results/ and say
what changed.

    python3 tools/unpack_gpu_results.py gpu_results.tar.gz [--logs DIR] [--dry-run]

Prints the session's summary table and the tests that failed, then one line per result file (new,
changed or unchanged against bench/results/) and, for a changed one, the rows whose ours_ms or
speedup moved, matched by case name. The whole session (logs/, junit/, env.txt) is extracted to
--logs (default: a new folder under /tmp) for reading; nothing but bench/results/*.json is written
into the repository, and with --dry-run not even that.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
MAX_ROWS = 12  # changed rows printed per file


def row_changes(old: dict, new: dict) -> list[str]:
    before = {r.get("case"): r for r in old.get("rows", [])}
    after = {r.get("case"): r for r in new.get("rows", [])}
    lines = []
    for case, row in after.items():
        prev = before.get(case)
        if prev is None:
            lines.append(f"    + {case}: ours_ms {row.get('ours_ms')}, speedup {row.get('speedup')}")
            continue
        moved = []
        for key in ("ours_ms", "speedup"):
            a, b = prev.get(key), row.get(key)
            if a != b:
                pct = f" ({100 * (b - a) / a:+.1f}%)" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
                moved.append(f"{key} {a} -> {b}{pct}")
        if moved:
            lines.append(f"    ~ {case}: {', '.join(moved)}")
    lines += [f"    - {case}" for case in before if case not in after]
    if len(lines) > MAX_ROWS:
        lines = lines[:MAX_ROWS] + [f"    ({len(lines) - MAX_ROWS} more rows changed)"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tarball", type=Path)
    ap.add_argument("--logs", type=Path, default=None, help="where to extract the session (default: a new /tmp folder)")
    ap.add_argument("--dry-run", action="store_true", help="compare only; copy nothing into bench/results/")
    args = ap.parse_args()
    dest = args.logs or Path(tempfile.mkdtemp(prefix="gpu_session-"))
    with tarfile.open(args.tarball) as tar:
        names = tar.getnames()
        if any(Path(n).is_absolute() or ".." in Path(n).parts for n in names):
            sys.exit(f"{args.tarball}: refusing a member path outside the archive root")
        tar.extractall(dest)
    root = dest / "gpu_session"
    if not root.is_dir():
        sys.exit(f"{args.tarball}: no gpu_session/ folder inside (made by tools/gpu_session.sh?)")

    summary = root / "summary.txt"
    if summary.exists():
        print(summary.read_text().rstrip())
    for failures in sorted((root / "notes").glob("*.failures")):
        lines = failures.read_text().splitlines()
        if lines:
            print(f"-- {failures.stem}: {len(lines)} failed: " + "; ".join(lines[:3]))
    print(f"session extracted to {root}")

    results = sorted((root / "results").glob("*.json"))
    if not results:
        print("no benchmark results in this session")
    for path in results:
        new = json.loads(path.read_text())
        target = RESULTS / path.name
        where = f"{new.get('device')}, commit {str(new.get('commit'))[:12]}, {new.get('date')}"
        if new.get("commit") in (None, "", "unknown"):
            where += " (WARNING: no commit recorded; pass --commit to gpu_session.sh)"
        if not target.exists():
            print(f"new        bench/results/{path.name}: {len(new.get('rows', []))} rows; {where}")
        elif target.read_bytes() == path.read_bytes():
            print(f"unchanged  bench/results/{path.name}")
            continue
        else:
            old = json.loads(target.read_text())
            print(f"changed    bench/results/{path.name}: {where} (was commit {str(old.get('commit'))[:12]}, "
                  f"{old.get('date')})")
            print("\n".join(row_changes(old, new)))
        if not args.dry_run:
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    if results and args.dry_run:
        print("--dry-run: nothing copied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
