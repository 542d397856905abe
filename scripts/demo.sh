#!/usr/bin/env bash
# make demo: what vkx does today, end to end on this machine, with real
# components: swtpm as the VM's vTPM, the host provisioning it, the guest
# quoting its boot state, the host verifying the quote against its registry
# and a policy. Stops everything it started. Fails loudly on any error.
#
# The network part (vsock/TLS sessions, key release) arrives with the
# agents; the last step shows the strict decoder refusing hostile input.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=./target/debug/vkx-host
GUEST=./target/debug/vkx-guest
work="$(mktemp -d /tmp/vkx-demo.XXXXXX)"
swtpm_pid=""
cleanup() {
  if [ -n "$swtpm_pid" ]; then kill "$swtpm_pid" 2>/dev/null || true; wait "$swtpm_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

ms() { date +%s%3N; }
step() { printf '\n== %s\n' "$*"; }
t_all=$(ms)

# A free TCP port pair on loopback for swtpm (server, control).
port=$(python3 -c 'import socket
for p in range(23000, 24000, 2):
    try:
        a=socket.socket(); a.bind(("127.0.0.1",p)); b=socket.socket(); b.bind(("127.0.0.1",p+1)); a.close(); b.close(); print(p); break
    except OSError: pass')
[ -n "$port" ] || { echo "no free port pair for swtpm" >&2; exit 1; }

step "1. The VM's vTPM: swtpm on 127.0.0.1:$port (state in $work/tpm)"
mkdir -p "$work/tpm"
swtpm socket --tpm2 --server type=tcp,port="$port",bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
  --tpmstate dir="$work/tpm" --flags not-need-init,startup-clear &
swtpm_pid=$!
tcti="swtpm:host=127.0.0.1,port=$port"
for _ in $(seq 50); do
  tpm2_getrandom -T "$tcti" 8 >/dev/null 2>&1 && break
  sleep 0.1
done
tpm2_getrandom -T "$tcti" 8 >/dev/null || { echo "swtpm did not come up" >&2; exit 1; }
echo "swtpm pid $swtpm_pid, TCTI $tcti"

step "2. Host: node vTPM CA, then provision the VM's vTPM before its first boot"
t=$(ms)
$HOST vtpm ca-init --dir "$work/ca"
$HOST vtpm provision --tcti "$tcti" --vm-id demo-vm --registry "$work/registry" --ca-dir "$work/ca"
t_prov=$(( $(ms) - t ))
echo "registry entry:"; python3 -m json.tool "$work/registry/demo-vm.json" | sed 's/^/  /'

step "3. The VM boots: firmware and OS measure themselves into PCRs"
tpm2_pcrextend -T "$tcti" "7:sha256=$(printf 'secure boot: on' | sha256sum | cut -d' ' -f1)"
tpm2_pcrextend -T "$tcti" "9:sha256=$(printf 'kernel 6.1 + initrd' | sha256sum | cut -d' ' -f1)"
echo "extended PCR 7 (secure boot state) and PCR 9 (kernel)"

step "4. Guest: quote PCRs 0,7,9 over the host's challenge (a random 32-byte value stands in for the transcript hash)"
nonce=$(python3 -c 'import os; print(os.urandom(32).hex())')
t=$(ms)
$GUEST evidence --tcti "$tcti" --nonce "$nonce" --pcrs sha256:0,7,9 --out-dir "$work/ev"
t_quote=$(( $(ms) - t ))
python3 - "$work/ev/pcrs.json" "$work/ev/pcrs.bin" "$work/policy.toml" <<'PY'
import json, sys
pcrs = json.load(open(sys.argv[1]))["sha256"]
open(sys.argv[2], "wb").write(b"".join(bytes.fromhex(pcrs[i]) for i in ["0", "7", "9"]))
rules = "".join(f'\n[[vm.pcr]]\nbank = "sha256"\nindex = {i}\nallowed = ["{pcrs[i]}"]\n' for i in ["0", "7", "9"])
open(sys.argv[3], "w").write('[[image]]\nname = "demo-image"\nkeys = ["disk"]\n\n[[vm]]\nid = "demo-vm"\nimage = "demo-image"\n' + rules)
PY
echo "policy (the operator's reference values for this boot state):"; sed 's/^/  /' "$work/policy.toml"

step "5. Host: verify the quote with the registry's AK and the policy"
verify() {
  $HOST evidence verify --attest "$work/ev/attest.bin" --signature "$work/ev/signature.bin" \
    --registry "$work/registry" --vm-id demo-vm --pcrs "$work/ev/pcrs.bin" \
    --pcr-list sha256:0,7,9 --nonce "$1" --policy "$work/policy.toml"
}
t=$(ms)
verify "$nonce"
t_verify=$(( $(ms) - t ))

step "6. The same quote replayed for another handshake is refused"
if verify "$(python3 -c 'import os; print(os.urandom(32).hex())')" | tail -1; then
  echo "a replayed quote was accepted" >&2; exit 1
fi

step "7. A tampered boot (PCR 9 changed) is refused by policy"
tpm2_pcrextend -T "$tcti" "9:sha256=$(printf 'rootkit' | sha256sum | cut -d' ' -f1)"
$GUEST evidence --tcti "$tcti" --nonce "$nonce" --pcrs sha256:0,7,9 --out-dir "$work/ev" >/dev/null
python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["sha256"]; open(sys.argv[2],"wb").write(b"".join(bytes.fromhex(p[i]) for i in ["0","7","9"]))' \
  "$work/ev/pcrs.json" "$work/ev/pcrs.bin"
if verify "$nonce" | tail -1; then
  echo "a tampered boot was accepted" >&2; exit 1
fi

step "8. Hostile bytes on the wire: the strict decoder refuses them, with the wire error it sends"
for f in duplicate-key unknown-message nesting-too-deep frame-too-large; do
  v="spec/vectors/negative/$f.json"
  printf '%-18s ' "$f:"
  frames=""; grep -q '"frame"' "$v" && frames=--frames
  rc=0
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["input"])' "$v" \
    | $HOST wire decode --hex $frames - > "$work/decode.out" || rc=$?
  [ "$rc" = 1 ] || { echo "expected a refusal (exit 1), got exit $rc" >&2; exit 1; }
  tr '\n' ' ' < "$work/decode.out"; echo
done

step "Summary"
cat <<EOF
  VM identity        demo-vm (vTPM: swtpm, EK ECC P-256, AK at 0x81000a4b)
  PCRs attested      sha256:0,7,9
  provisioning       ${t_prov} ms (CA + EK + AK + AK certificate + registry)
  quote (guest)      ${t_quote} ms
  verification       ${t_verify} ms (host, pure Rust, incl. process start)
  refused            replayed quote, tampered boot, 4 hostile inputs
  total              $(( $(ms) - t_all )) ms
  Next: key release over vsock/TLS arrives with the agents (make demo grows with them).
EOF
