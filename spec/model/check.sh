#!/usr/bin/env bash
# Model-checks spec/model/vkx.pml with SPIN, then checks that the model can
# fail: ten mutants, each breaking one rule of the protocol (P1, P2, P4, the
# kill switch P6, the re-enable delay P7) or of rollout admission (P8), must
# each be caught, and by the property it breaks. Prints the state counts;
# exits non-zero on any surprise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
command -v spin >/dev/null || { echo "spin is not installed: run make test (it installs it)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

check() { # name model expect(pass|fail) [what a mutant must violate]
  local name=$1 model=$2 expect=$3 what=${4:-} out opt=-O2 seen
  # A mutant's search stops at its first error: compiling it fast pays.
  [ "$expect" = pass ] || opt=-O0
  mkdir -p "$name" && cp "$model" "$name/model.pml"
  ( cd "$name" && spin -a model.pml >/dev/null && gcc $opt -w -o pan pan.c \
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
    seen=$(grep -m1 -oE 'assertion violated.*|invalid end state' "$out" | head -c 80 || true)
    if [ -n "$what" ] && [[ "$seen" != *"$what"* ]]; then
      echo "mutant $name: caught, but not as $what: $seen" >&2; exit 1
    fi
    echo "mutant $name: caught ($seen)"
  fi
}

m="$here/vkx.pml"
check vkx "$m" pass
# P2: the guest forgets to go dormant after a permanent error.
sed 's/:: m == ERR_P -> saw_permanent(); go_dormant(); goto closed/:: m == ERR_P -> saw_permanent(); goto closed/' "$m" > retry-loop.pml
check retry-loop "$work/retry-loop.pml" fail 'tick>perm_tick'
# P4: the guest asks for keys whatever the kill switch says.
sed 's/^     :: feature_on ->$/     :: true ->/' "$m" > ignores-kill-switch.pml
check ignores-kill-switch "$work/ignores-kill-switch.pml" fail 'violated feature_on'
# P1: the host answers errors with errors.
sed 's|     :: else -> skip            /\* P1: never answer an error or goodbye \*/|     :: else -> h2g!ERR_P,c|' "$m" > error-ping-pong.pml
check error-ping-pong "$work/error-ping-pong.pml" fail 'invalid end state'
# P6: the guest keeps its map when a feature-update turns key-release off.
sed 's|:: m == FEATOFF -> feature_on = false; jitter = false   /\* kill \*/|:: m == FEATOFF -> jitter = false|' "$m" > ignores-featoff.pml
check ignores-featoff "$work/ignores-featoff.pml" fail '!(gh_off)'
# P6: a kill does not cancel the re-enable delay still running (§12.3).
sed 's|:: m == FEATOFF -> feature_on = false; jitter = false   /\* kill \*/|:: m == FEATOFF -> feature_on = false|' "$m" > kill-keeps-delay.pml
check kill-keeps-delay "$work/kill-keeps-delay.pml" fail '!(gh_off)'
# P7: the guest uses key-release as soon as an enabling update comes.
sed 's/^  :: !feature_on -> jitter = true$/  :: !feature_on -> feature_on = true/' "$m" > no-jitter.pml
check no-jitter "$work/no-jitter.pml" fail '!(gh_wait)'
# P7: the delay ends the wait even while a retry-after still runs.
sed 's/:: atomic { jitter && !held -> /:: atomic { jitter -> /' "$m" > delay-ignores-hold.pml
check delay-ignores-hold "$work/delay-ignores-hold.pml" fail '!(gh_held)'
# P8: the host admits a document without comparing revisions (replay).
sed 's/:: rev > accepted_rev && (sg/:: (sg/' "$m" > replay.pml
check replay "$work/replay.pml" fail 'accepted_rev>=old_rev'
# P8: the host admits a document at the accepted revision.
sed 's/:: rev > accepted_rev &&/:: rev >= accepted_rev \&\&/' "$m" > same-revision.pml
check same-revision "$work/same-revision.pml" fail 'accepted_rev>old_rev'
# P8: the host admits an unsigned document that widens.
sed 's/:: rev > accepted_rev && (sg || !on || doc_on) ->/:: rev > accepted_rev ->/' "$m" > unsigned-widening.pml
check unsigned-widening "$work/unsigned-widening.pml" fail 'was_on'
mutants="retry-loop ignores-kill-switch error-ping-pong ignores-featoff kill-keeps-delay
  no-jitter delay-ignores-hold replay same-revision unsigned-widening"
for f in $mutants; do
  cmp -s "$m" "$f.pml" && { echo "mutant $f: sed did not apply" >&2; exit 1; }
done
echo "model check: 1 model, $(echo $mutants | wc -w) mutants caught"
