#!/usr/bin/env bash
# make profile: where the host's CPU goes in storm (a) of `make bench`.
#
# Builds the release storm, runs storm (a) and the floor only (`--only-a`)
# with `perf record --call-graph dwarf` attached to the host for the storm
# (`--perf`), then sorts the samples into the README's breakdown
# (scripts/profile-breakdown.py) scaled to the measured host CPU per
# attested key release. Needs perf (Debian linux-perf; installed if
# missing) and the right to profile another process (root, or
# kernel.perf_event_paranoid <= 1). Not part of `make test`.
#
#   scripts/profile-storm.sh [N]     (default 1024 guests)
# Output: target/profile/storm-a.perf.data (open it with `perf report -i`),
# and the storm's figures and the breakdown on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1024}"
target="${CARGO_TARGET_DIR:-target}"
out="$target/profile"
mkdir -p "$out"
if ! command -v perf >/dev/null || ! perf --version >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf
fi
cargo build --release --locked --quiet --workspace --bins
cargo build --release --locked --quiet -p vkx-e2e --features insecure-soft-tpm --example storm
data="$out/storm-a.perf.data"
rm -f "$data"
figures="$("$target/release/examples/storm" "$n" --perf "$data")"
echo "$figures"
us="$(sed -n 's/.*host CPU per attested key release: *\([0-9]*\) us.*/\1/p' <<<"$figures" | head -n1)"
echo
echo "host CPU of storm (a) by cause (perf: $data):"
perf script -i "$data" -F period,ip,sym,dso 2>/dev/null \
  | python3 scripts/profile-breakdown.py --us "$us" --top "${TOP:-25}"
