"""The process-level table of `make bench-peers`: Keylime's figures
(keylime_process.json, from keylime_process.py) beside vkx's, read from
the `storm` example's own output (its logs, one per repeat), median of the
repeats.

    python3 scripts/peers/summary.py PROCESS_JSON STORM_LOG...
"""

import json
import re
import sys


def med(v):
    s = sorted(v)
    return s[len(s) // 2]


def storm_figures(text):
    """Run (a) (1,024 soft vTPMs, all admitted) and the real-vTPM run."""
    a = text.split("  a) ", 1)[1].split("  b) ", 1)[0]
    real = text.split("guests with real vTPMs", 1)[1]

    def grab(block):
        wall = re.search(r"wall time to all keyed:\s+(?:median )?([\d.]+) s", block)
        lat = re.search(r"latency, first connect to key:\s+p50 ([\d.]+) ms, p99 ([\d.]+) ms", block)
        cpu = re.search(r"host CPU per attested key release:\s+(\d+) us", block)
        keyed = re.search(r"keyed:\s+(\d+) of (\d+) sessions", block)
        return {
            "wall_s": float(wall.group(1)),
            "p50_ms": float(lat.group(1)),
            "p99_ms": float(lat.group(2)),
            "cpu_us": float(cpu.group(1)),
            "keyed": int(keyed.group(1)),
            "of": int(keyed.group(2)),
        }

    return grab(a), grab(real)


def main():
    k = json.load(open(sys.argv[1]))
    storms = [storm_figures(open(p).read()) for p in sys.argv[2:]]
    soft = [s[0] for s in storms]
    real = [s[1] for s in storms]
    for runs in (soft, real):
        for r in runs:
            if r["keyed"] != r["of"]:
                print(f"storm: only {r['keyed']} of {r['of']} keyed", file=sys.stderr)
                sys.exit(1)
    n = len(storms)
    kr = k["runs"]
    print()
    print(f"Process level, this machine, median of {len(kr)} (Keylime) and {n} (vkx) repeats:")
    print()
    print("| system, run | verifier CPU per attestation | attestations/s | latency p50 / p99 |")
    print("|---|---|---|---|")
    print(
        f"| Keylime 7.14.3 verifier (+ registrar), {k['agents']} agents on swtpm, quote_interval 0, "
        f"{k['seconds']:.0f} s windows | {med([r['verifier_cpu_ms_per_attestation'] for r in kr]) * 1e3:.0f} µs "
        f"(verifier at {med([r['verifier_cpu_share'] for r in kr]) * 100:.0f} % of one core) "
        f"| {med([r['per_s'] for r in kr]):.1f} | {med([r['cycle_p50_ms'] for r in kr]):.0f} / "
        f"{med([r['cycle_p99_ms'] for r in kr]):.0f} ms (quote request to the next one) |"
    )
    print(
        f"| vkx-host, storm (a): 1,024 soft-vTPM guests at once, all admitted "
        f"| {med([r['cpu_us'] for r in soft]):.0f} µs "
        f"| {med([r['of'] / r['wall_s'] for r in soft]):.0f} "
        f"| {med([r['p50_ms'] for r in soft]):.0f} / {med([r['p99_ms'] for r in soft]):.0f} ms (first connect to key) |"
    )
    print(
        f"| vkx-host, storm real run: 8 guests on swtpm at once, 16 rounds "
        f"| {med([r['cpu_us'] for r in real]):.0f} µs (10 ms ticks over ~0.1 s: rough) "
        f"| (not saturated: 8 per round) "
        f"| {med([r['p50_ms'] for r in real]):.1f} / {med([r['p99_ms'] for r in real]):.1f} ms (first connect to key) |"
    )
    print()
    print("Runs: Keylime " + "; ".join(
        f"{r['verifier_cpu_ms_per_attestation'] * 1e3:.0f} µs, {r['per_s']:.1f}/s" for r in kr
    ))
    print("      vkx (a) " + "; ".join(f"{r['cpu_us']:.0f} µs, {r['of'] / r['wall_s']:.0f}/s" for r in soft))
    print("      vkx real " + "; ".join(f"{r['cpu_us']:.0f} µs" for r in real))


if __name__ == "__main__":
    main()
