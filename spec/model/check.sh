#!/usr/bin/env bash
# Model-checks spec/model/vkx.pml with SPIN, then checks that the model can
# fail: three mutants, each breaking one rule of the protocol, must each be
# caught. Prints the state counts; exits non-zero on any surprise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v spin >/dev/null || { echo "spin is not installed: run make test (it installs it)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

check() { # name model expect(pass|fail)
  local name=$1 model=$2 expect=$3 out
  mkdir -p "$name" && cp "$model" "$name/model.pml"
  ( cd "$name" && spin -a model.pml >/dev/null && gcc -O2 -w -o pan pan.c \
      && ./pan -a -m200000 > pan.out 2>&1 ) || true
  out="$name/pan.out"
  [ -f "$out" ] || { echo "$name: pan did not run" >&2; exit 1; }
  local states errors
  states=$(grep -oE '^ *[0-9]+ states, stored' "$out" | grep -oE '[0-9]+' | head -1 || true)
  errors=$(grep -oE 'errors: [0-9]+' "$out" | grep -oE '[0-9]+' | head -1 || true)
  if [ "$expect" = pass ]; then
    if [ "$errors" != 0 ] || grep -q 'Search not completed' "$out"; then
      echo "$name: FAILED (errors: ${errors:-?})" >&2; cat "$out" >&2; exit 1
    fi
    echo "model $name: errors: 0, $states states"
  else
    if [ "${errors:-0}" = 0 ]; then
      echo "mutant $name: NOT caught: the model would not notice this bug" >&2; exit 1
    fi
    echo "mutant $name: caught ($(grep -m1 -oE 'assertion violated.*|invalid end state' "$out" | head -c 80))"
  fi
}

m="$here/vkx.pml"
check vkx "$m" pass
# P2: the guest forgets to go dormant after a permanent error.
sed 's/:: m == ERR_P -> saw_permanent(); go_dormant(); goto closed/:: m == ERR_P -> saw_permanent(); goto closed/' "$m" > retry-loop.pml
check retry-loop "$work/retry-loop.pml" fail
# P4: the guest asks for keys whatever the kill switch says.
sed 's/^     :: feature_on ->$/     :: true ->/' "$m" > ignores-kill-switch.pml
check ignores-kill-switch "$work/ignores-kill-switch.pml" fail
# P1: the host answers errors with errors.
sed 's|     :: else -> skip            /\* P1: never answer an error or goodbye \*/|     :: else -> h2g!ERR_P,c|' "$m" > error-ping-pong.pml
check error-ping-pong "$work/error-ping-pong.pml" fail
for f in retry-loop ignores-kill-switch error-ping-pong; do
  cmp -s "$m" "$f.pml" && { echo "mutant $f: sed did not apply" >&2; exit 1; }
done
echo "model check: 1 model, 3 mutants caught"
