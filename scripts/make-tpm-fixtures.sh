#!/usr/bin/env bash
# Makes the TPM quote fixtures in common/tests/fixtures/tpm/ from a real
# software TPM: swtpm on loopback TCP with a throw-away state directory,
# driven by tpm2-tools 5.4. Every quote is confirmed with tpm2_checkquote
# before it is stored, so the fixtures are what a real TPM produces and a
# reference verifier accepts.
#
# Usage: scripts/make-tpm-fixtures.sh [OUT_DIR]
# Needs: swtpm, tpm2-tools (5.x), python3 (to pick free ports).
#
# Per case directory (all binary files exactly as tpm2-tools writes them):
#   attest.bin   TPMS_ATTEST marshalled by the TPM (tpm2_quote -m)
#   sig.bin      TPMT_SIGNATURE marshalled ("tss" format, tpm2_quote -s)
#   ak.pub       TPM2B_PUBLIC of the signing key (tpm2_createak -u, tss format)
#   ak.name      the key's TPM name, nameAlg || digest (tpm2_createak -n)
#   ak.qname     the key's qualified name as the TPM reports it
#                (tpm2_readpublic -q): what the quote's qualifiedSigner is
#   parent.qname the qualified name of the key's parent (the EK for an
#                AK of tpm2_createak; an owner-hierarchy primary for the
#                unrestricted key), tpm2_readpublic -q
#   other-ak.pub TPM2B_PUBLIC of a second AK of the same kind (negative tests)
#   nonce.bin    the 32-byte qualifying data passed to tpm2_quote -q
#   pcrs.bin     tpm2-tools "values" PCR output (tpm2_quote -o, -F values):
#                the raw digests concatenated, banks in selection order,
#                PCR indices ascending, no header (so it only parses with the
#                selection beside it)
#   pcrs.txt     the same values, one "<alg> <index> <hex>" line each
#   selection.txt  the -l argument, e.g. "sha256:0,1,2,7"
#   meta.txt     key=value lines: key type, signature scheme, hash, notes

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/common/tests/fixtures/tpm}"

for tool in swtpm tpm2_createek tpm2_createak tpm2_quote tpm2_checkquote tpm2_pcrextend python3; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

WORK="$(mktemp -d)"
SWTPM_PID=""
cleanup() {
  if [[ -n "$SWTPM_PID" ]]; then
    kill "$SWTPM_PID" 2>/dev/null || true
    wait "$SWTPM_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Two consecutive free loopback ports (server, control). Racy in principle;
# a clash makes swtpm fail to start, which the readiness check reports.
read -r PORT CTRL_PORT < <(python3 - <<'EOF'
import socket
for _ in range(200):
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1))
    except OSError:
        a.close(); b.close(); continue
    a.close(); b.close(); print(p, p + 1); break
else:
    raise SystemExit("no free port pair")
EOF
)

mkdir -p "$WORK/state"
swtpm socket --tpm2 \
  --server "type=tcp,port=$PORT,bindaddr=127.0.0.1" \
  --ctrl "type=tcp,port=$CTRL_PORT,bindaddr=127.0.0.1" \
  --tpmstate "dir=$WORK/state" \
  --flags not-need-init,startup-clear \
  --log "file=$WORK/swtpm.log" &
SWTPM_PID=$!

export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$PORT"
ready=""
for _ in $(seq 1 50); do
  if tpm2_getrandom 8 >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.1
done
[[ -n "$ready" ]] || { echo "swtpm did not come up; log:" >&2; cat "$WORK/swtpm.log" >&2; exit 1; }

# Make the PCRs we quote non-zero (and distinct per bank) so a test that
# swaps or zeroes a value cannot pass by accident.
for pcr in 0 1 2 7; do
  for alg in sha1 sha256; do
    data="$(printf 'vkx fixture pcr %s' "$pcr" | openssl dgst -"$alg" -r | cut -d' ' -f1)"
    tpm2_pcrextend "$pcr:$alg=$data"
  done
done

cd "$WORK"
tpm2_createek -c ek-ecc.ctx -G ecc -u ek-ecc.pub >/dev/null
tpm2_readpublic -c ek-ecc.ctx -q ek-ecc.qname >/dev/null
tpm2_flushcontext -t
tpm2_createek -c ek-rsa.ctx -G rsa -u ek-rsa.pub >/dev/null
tpm2_readpublic -c ek-rsa.ctx -q ek-rsa.qname >/dev/null
tpm2_flushcontext -t

# make_ak NAME EK_CTX KEY_ALG SIG_SCHEME
make_ak() {
  tpm2_flushcontext -t
  tpm2_createak -C "$2" -c "$1.ctx" -G "$3" -g sha256 -s "$4" \
    -u "$1.pub" -n "$1.name" -f tss >/dev/null
  tpm2_readpublic -c "$1.ctx" -q "$1.qname" >/dev/null
  cp "${2%.ctx}.qname" "$1.parent.qname"
  # The TPM holds few transient objects: keep only contexts on disk.
  tpm2_flushcontext -t
  tpm2_flushcontext -s
}

# write_pcrs_txt SELECTION PCRS_BIN OUT_TXT: splits the "values" file
# using the selection (banks in order, indices ascending).
write_pcrs_txt() {
  python3 - "$1" "$2" "$3" <<'EOF'
import sys
sel, path, out = sys.argv[1:]
sizes = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
data = open(path, "rb").read()
pos, lines = 0, []
for bank in sel.split("+"):
    alg, pcrs = bank.split(":")
    for i in sorted(int(p) for p in pcrs.split(",")):
        n = sizes[alg]
        lines.append(f"{alg} {i} {data[pos:pos+n].hex()}")
        pos += n
assert pos == len(data), f"{path}: {len(data)} bytes, selection covers {pos}"
open(out, "w").write("\n".join(lines) + "\n")
EOF
}

# quote_case CASE AK OTHER_AK SELECTION KEYTYPE SCHEME [NOTE]
quote_case() {
  local case="$1" ak="$2" other="$3" sel="$4" keytype="$5" scheme="$6" note="${7:-}"
  local dir="$OUT/$case"
  rm -rf "$dir"
  mkdir -p "$dir"
  # A fresh 32-byte nonce per case: the transcript hash stands in here.
  head -c 32 /dev/urandom >"$dir/nonce.bin"
  local nonce_hex
  nonce_hex="$(od -An -tx1 -v "$dir/nonce.bin" | tr -d ' \n')"
  tpm2_flushcontext -t
  tpm2_quote -c "$ak.ctx" -l "$sel" -q "$nonce_hex" -g sha256 --scheme "$scheme" \
    -m "$dir/attest.bin" -s "$dir/sig.bin" -o "$dir/pcrs.bin" -F values >/dev/null
  if [[ "$scheme" == rsapss ]]; then
    # tpm2_checkquote in tpm2-tools 5.x cannot verify RSA-PSS quotes
    # (tpm2-software/tpm2-tools#3283): let the TPM check the signature, and
    # leave the PCR digest to our own verifier's tests.
    tpm2_flushcontext -t
    tpm2_verifysignature -c "$ak.ctx" -g sha256 -m "$dir/attest.bin" \
      -s "$dir/sig.bin" >/dev/null
  else
    tpm2_checkquote -u "$ak.pub" -m "$dir/attest.bin" -s "$dir/sig.bin" \
      -f "$dir/pcrs.bin" -g sha256 -q "$nonce_hex" -l "$sel" >/dev/null
  fi
  cp "$ak.pub" "$dir/ak.pub"
  cp "$ak.name" "$dir/ak.name"
  cp "$ak.qname" "$dir/ak.qname"
  cp "$ak.parent.qname" "$dir/parent.qname"
  cp "$other.pub" "$dir/other-ak.pub"
  printf '%s\n' "$sel" >"$dir/selection.txt"
  write_pcrs_txt "$sel" "$dir/pcrs.bin" "$dir/pcrs.txt"
  {
    echo "key=$keytype"
    echo "scheme=$scheme"
    echo "hash=sha256"
    echo "tools=$(tpm2_quote --version | tr -d '\n')"
    echo "swtpm=$(swtpm --version | head -1)"
    [[ -n "$note" ]] && echo "note=$note"
  } >"$dir/meta.txt"
  # tpm2-tools creates files 0640/0660; fixtures are ordinary files.
  chmod 0644 "$dir"/*
  echo "made $case"
}

make_ak ak-ecc ek-ecc.ctx ecc ecdsa
make_ak ak-ecc-2 ek-ecc.ctx ecc ecdsa
make_ak ak-rsassa ek-rsa.ctx rsa rsassa
make_ak ak-rsapss ek-rsa.ctx rsa rsapss

quote_case ecc-p256-ecdsa ak-ecc ak-ecc-2 "sha256:0,1,2,7" ecc ecdsa
quote_case ecc-p256-ecdsa-two-banks ak-ecc ak-ecc-2 "sha1:0,2+sha256:0,1,2,7" ecc ecdsa
quote_case rsa2048-rsassa ak-rsassa ak-rsapss "sha256:0,1,2,7" rsa rsassa
quote_case rsa2048-rsapss ak-rsapss ak-rsassa "sha256:0,1,2,7" rsa rsapss

# A signing key that is NOT restricted (no "restricted" attribute): the TPM
# quotes with it, and the signature is valid, but such a key would also sign
# a forged TPMS_ATTEST handed to it, so a verifier must refuse it.
tpm2_flushcontext -t
tpm2_createprimary -C o -G ecc -c primary.ctx >/dev/null
tpm2_readpublic -c primary.ctx -q primary.qname >/dev/null
tpm2_flushcontext -t
tpm2_create -C primary.ctx -G ecc:ecdsa-sha256 \
  -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign' \
  -u unrestricted.pubpart -r unrestricted.priv >/dev/null
tpm2_flushcontext -t
tpm2_flushcontext -s
tpm2_load -C primary.ctx -u unrestricted.pubpart -r unrestricted.priv \
  -c unrestricted.ctx -n unrestricted.name >/dev/null
tpm2_readpublic -c unrestricted.ctx -o unrestricted.pub -f tss \
  -q unrestricted.qname >/dev/null
cp primary.qname unrestricted.parent.qname
tpm2_flushcontext -t
tpm2_flushcontext -s
quote_case ecc-unrestricted unrestricted ak-ecc "sha256:0,1,2,7" ecc ecdsa \
  "signing key without the restricted attribute: must be refused"

echo "fixtures in $OUT"
