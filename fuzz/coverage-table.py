#!/usr/bin/env python3
"""Prints the line and region coverage of the files each fuzz target
exercises, from the summaries `make fuzz-coverage` exports.

Usage: coverage-table.py REPORT_DIR TARGET...
REPORT_DIR/<target>/summary.json is `llvm-cov export -summary-only` of that
target's instrumented binary over its corpus and regressions. A target's
row counts only the files it is there to exercise (FILES below), so a
figure is not diluted by code the target never calls (the key store, the
drivers) nor inflated by the check functions themselves; the per-file rows
under it say where the unreached lines are. An expected file missing from
a summary is an error: a renamed module must be renamed here too.
"""
import json, os, re, sys

# The files facing peer bytes that each target drives, relative to the
# repository root.
DECODER = [r"common/src/wire/(scan|codec)\.rs", r"common/src/wire/message/[a-z_]+\.rs"]
FILES = {
    "message_decode": DECODER,
    "frame_decoder": [r"common/src/wire/frame\.rs"] + DECODER,
    "tpm_parse": [r"common/src/tpm/(alg|attest|marshal|public|signature)\.rs"],
    "host_session": [r"common/src/session/(mod|host)\.rs", r"common/src/wire/error_code\.rs"],
    "guest_session": [r"common/src/session/(mod|guest)\.rs", r"common/src/retry\.rs"],
    "session_pair": [r"common/src/session/(mod|host|guest)\.rs", r"common/src/retry\.rs"],
}


def pct(covered, count):
    return f"{100.0 * covered / count:5.1f}%" if count else "    -"


def main():
    report_dir, targets = sys.argv[1], sys.argv[2:]
    root = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    print(f"{'target / file':<44} {'lines':>16} {'regions':>16}")
    failed = False
    for target in targets:
        with open(os.path.join(report_dir, target, "summary.json")) as f:
            files = json.load(f)["data"][0]["files"]
        patterns = [re.compile(p + "$") for p in FILES[target]]
        rows = []
        for entry in files:
            rel = os.path.relpath(os.path.realpath(entry["filename"]), root)
            if any(p.match(rel) for p in patterns):
                s = entry["summary"]
                rows.append((rel, s["lines"], s["regions"]))
        for p in patterns:
            if not any(p.match(rel) for rel, _, _ in rows):
                print(f"{target}: no file matches {p.pattern}: renamed?", file=sys.stderr)
                failed = True
        lc = sum(r[1]["covered"] for r in rows)
        ln = sum(r[1]["count"] for r in rows)
        rc = sum(r[2]["covered"] for r in rows)
        rn = sum(r[2]["count"] for r in rows)
        print(f"{target:<44} {lc:>5}/{ln:<5} {pct(lc, ln)} {rc:>5}/{rn:<5} {pct(rc, rn)}")
        for rel, lines, regions in sorted(rows):
            print(f"  {rel:<42} {lines['covered']:>5}/{lines['count']:<5} "
                  f"{pct(lines['covered'], lines['count'])} {regions['covered']:>5}/"
                  f"{regions['count']:<5} {pct(regions['covered'], regions['count'])}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
