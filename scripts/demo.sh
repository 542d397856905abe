#!/usr/bin/env bash
# make demo: vkx end to end on this machine, with real components.
#
# swtpm is the VM's vTPM; the host agent initialises its node, provisions
# that vTPM, stores a disk key and a policy, and serves; the guest agent
# connects the way a Firecracker/Cloud Hypervisor guest's vsock connection
# arrives on the host (a hybrid-vsock Unix socket), attests its boot with a
# TPM quote over TLS 1.3, and receives the key into a tmpfs directory. Then
# a rotation reaches the running guest daemon, the kill switch turns key
# release off for the live guest and back on (signed), a tampered boot is
# refused, and hostile wire input is refused. Stops everything it started; fails
# loudly if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST=./target/debug/vkx-host
GUEST=./target/debug/vkx-guest
work="$(mktemp -d /tmp/vkx-demo.XXXXXX)"
# Keys go to a tmpfs, as /run/vkx/keys does in a VM.
keys="$(mktemp -d /dev/shm/vkx-demo-keys.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work" "$keys"
}
trap cleanup EXIT
fail() { echo "DEMO FAILED: $*" >&2; exit 1; }

ms() { date +%s%3N; }
step() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" && return 0; sleep 0.1; done
  fail "timed out waiting for $what"
}
t_all=$(ms)

# A free TCP port pair on loopback for swtpm (server, control).
port=$(python3 -c 'import socket
for p in range(23000, 24000, 2):
    try:
        a=socket.socket(); a.bind(("127.0.0.1",p)); b=socket.socket(); b.bind(("127.0.0.1",p+1)); a.close(); b.close(); print(p); break
    except OSError: pass')
[ -n "$port" ] || fail "no free port pair for swtpm"

step "1. The VM's vTPM: swtpm on 127.0.0.1:$port"
mkdir -p "$work/tpm"
swtpm socket --tpm2 --server type=tcp,port="$port",bindaddr=127.0.0.1 \
  --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
  --tpmstate dir="$work/tpm" --flags not-need-init,startup-clear &
pids+=($!)
tcti="swtpm:host=127.0.0.1,port=$port"
wait_for 5 swtpm tpm2_getrandom -T "$tcti" 8 >/dev/null 2>&1

step "2. Host: initialise the node (TLS key guests pin, vTPM CA, master key), provision the VM's vTPM"
t=$(ms)
pin=$($HOST init --dir "$work/node" | sed -n 's/^host key pin (SPKI SHA-256, for guest configs): //p')
[ ${#pin} = 64 ] || fail "no host key pin"
$HOST vtpm provision --tcti "$tcti" --vm-id demo-vm --registry "$work/registry" --ca-dir "$work/node/ca" >/dev/null
t_prov=$(( $(ms) - t ))
# The AK's authValue: installed in the guest for the agent only.
ak_auth="$work/registry/vtpm-auth/demo-vm.ak-auth"
[ -f "$ak_auth" ] || fail "provisioning wrote no AK auth file"
echo "host key pin: $pin"
echo "demo-vm provisioned: EK and AK (authValue only the agent holds) in its vTPM, AK certificate in its NV, registry entry in $work/registry"

step "3. The VM boots: firmware and OS measure themselves into PCRs 7 and 9"
tpm2_pcrextend -T "$tcti" "7:sha256=$(printf 'secure boot: on' | sha256sum | cut -d' ' -f1)"
tpm2_pcrextend -T "$tcti" "9:sha256=$(printf 'kernel 6.1 + initrd' | sha256sum | cut -d' ' -f1)"

step "4. Operator: policy (this boot's PCRs 0,7,9 are the reference) and a disk key for the image"
$GUEST evidence --tcti "$tcti" --ak-auth-file "$ak_auth" --nonce "$(printf '0%.0s' $(seq 64))" --pcrs sha256:0,7,9 --out-dir "$work/ref" >/dev/null
python3 - "$work/ref/pcrs.json" "$work/policy.toml" <<'PY'
import json, sys
pcrs = json.load(open(sys.argv[1]))["sha256"]
rules = "".join(f'\n[[image.pcr]]\nbank = "sha256"\nindex = {i}\nallowed = ["{pcrs[i]}"]\n' for i in ["0", "7", "9"])
open(sys.argv[2], "w").write('[[image]]\nname = "demo-image"\nkeys = ["disk"]\n' + rules +
                             '\n[[vm]]\nid = "demo-vm"\nimage = "demo-image"\n')
PY
$HOST keys generate disk --node-dir "$work/node" --bytes 32 --allow-image demo-image >/dev/null
$HOST keys list --node-dir "$work/node" | sed 's/^/  /'

step "5. Host agent: vkx-host serve (the VM's vsock arrives on $work/vm.vsock_7861)"
# The release engineers' signing key (offline in real life): any change
# that turns a feature on must carry its signature; a kill needs none.
public=$($HOST rollout keygen --out "$work/release.key" --key-id release | sed -n 's/^public_key = "\(.*\)"$/\1/p')
[ ${#public} = 64 ] || fail "no rollout public key"
cat > "$work/host.toml" <<EOF
node_dir = "$work/node"
registry = "$work/registry"
policy = "$work/policy.toml"
shutdown_retry_after_s = 2

[rollout]
source = "file"
file = "$work/rollout.json"

[[rollout.trusted_key]]
id = "release"
public_key = "$public"

[[hybrid_vsock]]
path = "$work/vm.vsock"
vm_id = "demo-vm"
EOF
$HOST serve --config "$work/host.toml" 2> "$work/host.log" &
pids+=($!)
wait_for 10 "the host to listen" test -S "$work/vm.vsock_7861"

cat > "$work/guest.toml" <<EOF
host_socket = "$work/vm.vsock_7861"
host_key_sha256 = "$pin"
tcti = "$tcti"
ak_auth_file = "$ak_auth"
run_dir = "$work/run"
keys = ["disk"]
key_dir = "$keys"
EOF

step "6. Guest: vkx-guest once (TLS 1.3 with the pinned key, hello, challenge, TPM quote, verdict, key)"
t=$(ms)
$GUEST once --config "$work/guest.toml" 2>> "$work/once.log" | sed 's/^/  /'
t_once=$(( $(ms) - t ))
[ -f "$keys/disk" ] || fail "the key was not delivered"
echo "  delivered: $(stat -c '%n, %s bytes, mode %a, owner %U' "$keys/disk") (tmpfs: $(stat -f -c %T "$keys"))"
digest_v1=$(sha256sum "$keys/disk" | cut -c1-16)

step "7. Rotation reaches a running guest: vkx-guest run, then vkx-host keys rotate disk"
$GUEST run --config "$work/guest.toml" 2> "$work/guest.log" &
pids+=($!)
wait_for 20 "the daemon's session" grep -q 'key delivered' "$work/guest.log"
t=$(ms)
$HOST keys rotate disk --node-dir "$work/node" | sed 's/^/  /'
wait_for 20 "the pushed rotation" grep -q 'version=2' "$work/guest.log"
t_rot=$(( $(ms) - t ))
digest_v2=$(sha256sum "$keys/disk" | cut -c1-16)
[ "$digest_v1" != "$digest_v2" ] || fail "the key file did not change"
grep -q 'key update installed' "$work/host.log" || fail "the host saw no acknowledgement"
echo "  key file replaced atomically (sha256 prefix $digest_v1 -> $digest_v2); the guest acknowledged version 2"
$GUEST status --config "$work/guest.toml" | sed 's/^/  /'

step "8. Kill switch: key-release off for the whole node with one command, no key, no redeploy"
t=$(ms)
$HOST rollout kill key-release --config "$work/host.toml" | sed 's/^/  /'
wait_for 5 "the live guest to be told" grep -q 'key-release=disabled' "$work/guest.log"
t_kill=$(( $(ms) - t ))
echo "  the running guest was told in ${t_kill} ms (its session stays up): $(grep 'key-release=disabled' "$work/guest.log" | tail -1 | sed 's/^.*INFO //')"
rc=0; $GUEST once --config "$work/guest.toml" 2> "$work/once.err" || rc=$?
[ "$rc" = 4 ] || fail "once during the kill got exit $rc, not 4 (refused)"
grep -q 'feature-disabled' "$work/once.err" || fail "once was not refused with feature-disabled"
echo "  vkx-guest once (exit $rc): $(grep -o 'disk: feature-disabled.*' "$work/once.err" | head -1)"
$HOST rollout unkill key-release --config "$work/host.toml" --key "$work/release.key" --key-id release | sed 's/^/  /'
wait_for 5 "the unkill" grep -q 'revision=2' "$work/host.log"
$GUEST once --config "$work/guest.toml" 2>> "$work/once.log" | sed 's/^/  /'
echo "  after the signed unkill, vkx-guest once gets its key again"
$HOST rollout show --config "$work/host.toml" | sed 's/^/  /'

step "9. A tampered boot (PCR 9 changed) is refused: the guest learns only attestation-failed"
tpm2_pcrextend -T "$tcti" "9:sha256=$(printf 'rootkit' | sha256sum | cut -d' ' -f1)"
rc=0; $GUEST once --config "$work/guest.toml" 2> "$work/once.err" || rc=$?
[ "$rc" = 2 ] || fail "a tampered boot got exit $rc, not 2 (permanent)"
echo "  guest (exit $rc): $(tail -1 "$work/once.err")"
echo "  host log: $(grep 'attestation refused' "$work/host.log" | tail -1 | sed 's/^.*WARN //')"

step "10. Hostile bytes on the wire: the strict decoder refuses them, with the wire error it sends"
for f in duplicate-key unknown-message nesting-too-deep frame-too-large; do
  v="spec/vectors/negative/$f.json"
  printf '  %-18s ' "$f:"
  frames=""; grep -q '"frame"' "$v" && frames=--frames
  rc=0
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["input"])' "$v" \
    | $HOST wire decode --hex $frames - > "$work/decode.out" || rc=$?
  [ "$rc" = 1 ] || fail "expected a refusal (exit 1), got exit $rc"
  tr '\n' ' ' < "$work/decode.out"; echo
done

for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
pids=()

step "Summary"
cat <<EOF
  VM identity        demo-vm (vTPM: swtpm, EK and AK ECC P-256; transport: hybrid vsock)
  PCRs attested      sha256:0,7,9 against the image policy demo-image
  key delivered      disk -> $keys/disk (32 bytes, mode 0400, tmpfs; removed at exit); rotated to version 2 live
  provisioning       ${t_prov} ms (node init + EK + AK + AK certificate + registry)
  attest + key       ${t_once} ms (vkx-guest once, process start to key on disk)
  rotation           ${t_rot} ms (keys rotate to the running guest's new file; the host polls every 2 s)
  kill switch        ${t_kill} ms from \`rollout kill key-release\` to the live guest's feature-update; once refused (feature-disabled); signed unkill restored it
  refused            tampered boot (attestation-failed), 4 hostile wire inputs
  total              $(( $(ms) - t_all )) ms; everything started has been stopped
EOF
