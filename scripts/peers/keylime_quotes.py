"""The Keylime half of the function-level comparison (`make bench-peers`).

    target/peers/venv/bin/python scripts/peers/keylime_quotes.py DIR [ITERATIONS]

Reads DIR/cases.json (the quotes `peer_quotes` recorded from swtpm vTPMs and
the tampered cases derived from them) and DIR/vkx.json (vkx's verdicts and
timings on the same cases), judges every case with Keylime 7.14's own code,
unmodified from the PyPI package, and prints one table.

Keylime is called as its verifier calls it for a pull-mode agent:
`Tpm().check_quote(...)` with the quote string the agent's quote endpoint
returns ("r" + base64 TPMS_ATTEST + ":" + base64 TPMT_SIGNATURE + ":" +
base64 PCR values in tpm2-tools' `tpm2_quote -o` layout), the AK's
TPM2B_PUBLIC as the registrar stores it, the nonce, and a tpm_policy that
allows exactly the case's PCR values. Inside: `_tpm2_checkquote` (the AK to
PEM, the signature, the hash algorithm, the nonce, the PCR digest), then
`check_pcrs` (the PCR values against the policy; no IMA, no measured boot,
no data PCR since no `data` is passed). Two columns: that whole call, and
`Tpm._tpm2_checkquote` alone (the quote without the policy). No
AgentAttestState is passed, so the TPM clock check between consecutive
quotes of one agent is skipped (the same quote is verified many times).

CPU time per verification: `time.process_time()` (this process's CPU, all
threads) over ITERATIONS calls (default 5,000), 3 repeats, median.
"""

import base64
import json
import logging
import struct
import sys
import time

# Keylime's modules log a missing /etc/keylime config at import; its
# verifier logs at INFO. Keep the measurement free of log output.
logging.disable(logging.CRITICAL)

from keylime.common.algorithms import Hash  # noqa: E402
from keylime.mba import mba  # noqa: E402
from keylime.tpm.tpm_main import Tpm  # noqa: E402

TPM_ALG_SHA256 = 0x000B
REPEATS = 3


def pcr_blob(pcrs):
    """PCR values as tpm2-tools' `tpm2_quote -o` writes them (what a Keylime
    agent sends): a TPML_PCR_SELECTION and TPML_DIGESTs copied from memory,
    little endian, 16 selection slots, 8 digest slots of 64 bytes each."""
    indices = sorted(int(i) for i in pcrs)
    mask = 0
    for i in indices:
        mask |= 1 << i
    out = struct.pack("<I", 1)
    slots = [struct.pack("<HB", TPM_ALG_SHA256, 3) + mask.to_bytes(3, "little") + b"\0\0"]
    slots += [b"\0" * 8] * 15
    out += b"".join(slots)
    chunks = [indices[i : i + 8] for i in range(0, len(indices), 8)]
    out += struct.pack("<I", len(chunks))
    for chunk in chunks:
        out += struct.pack("<I", len(chunk))
        for slot in range(8):
            if slot < len(chunk):
                d = bytes.fromhex(pcrs[str(chunk[slot])])
                out += struct.pack("<H", len(d)) + d + b"\0" * (64 - len(d))
            else:
                out += struct.pack("<H", 0) + b"\0" * 64
    return out


def keylime_inputs(case):
    quote = "r" + ":".join(
        base64.b64encode(b).decode()
        for b in (bytes.fromhex(case["attest"]), bytes.fromhex(case["signature"]), pcr_blob(case["pcrs"]))
    )
    policy = {} if case["no_pcr_rules"] else {str(i): [v] for i, v in case["policy"].items()}
    return {
        "nonce": bytes.fromhex(case["nonce"]),
        "quote": quote,
        "ak": bytes.fromhex(case["ak_public"]),
        "policy": policy,
    }


def check_quote(tpm, k):
    failure = tpm.check_quote(
        None,
        k["nonce"],
        None,
        k["quote"],
        k["ak"],
        tpm_policy=k["policy"],
        hash_alg=Hash.SHA256,
    )
    if not failure:
        return "accept"
    return "refuse: " + "; ".join(e.event_id for e in failure.events)


def checkquote_only(k):
    pcrs, err = Tpm._tpm2_checkquote(
        base64.b64encode(k["ak"]).decode(),
        k["quote"],
        base64.b64encode(k["nonce"]).decode(),
        str(Hash.SHA256),
        False,
    )
    if err:
        return "refuse: " + err
    # An empty error string is success to Keylime (check_quote tests `if
    # err:`); an exception whose message is empty (cryptography's
    # InvalidSignature) comes back so, with no PCRs.
    return "accept" if pcrs else "accept, 0 PCRs"


def timed(f, inputs, iterations):
    runs = []
    for _ in range(REPEATS):
        start = time.process_time()
        for i in range(iterations):
            assert f(inputs[i % len(inputs)]) == "accept"
        runs.append((time.process_time() - start) / iterations * 1e6)
    return {"median": sorted(runs)[len(runs) // 2], "runs": runs}


def verdict_word(v):
    if v.startswith("accept"):
        return v
    return "REFUSE"


def main():
    out = sys.argv[1]
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    cases = json.load(open(f"{out}/cases.json"))["cases"]
    vkx = json.load(open(f"{out}/vkx.json"))
    # As the verifier does at start (without its config file: the
    # measured-boot parsers Keylime ships, no custom policy modules).
    mba.load_imports(skip_custom_policies=True)
    tpm = Tpm()

    rows = []
    for c in cases:
        k = keylime_inputs(c)
        rows.append((c, checkquote_only(k), check_quote(tpm, k), vkx["verdicts"][c["name"]]))

    genuine = [keylime_inputs(c) for c in cases if c["name"].startswith("genuine")]
    t_full = timed(lambda k: check_quote(tpm, k), genuine, iterations)
    t_quote = timed(checkquote_only, genuine, iterations)
    report = {
        "iterations": iterations,
        "repeats": REPEATS,
        "cpu_us_per_verification": {"check_quote": t_full, "_tpm2_checkquote": t_quote},
        "verdicts": {c["name"]: {"_tpm2_checkquote": q, "check_quote": f} for c, q, f, _ in rows},
    }
    json.dump(report, open(f"{out}/keylime.json", "w"), indent=2)

    print()
    print("Same quotes (swtpm vTPMs, ECC P-256 AK, ECDSA-SHA256, sha256 PCRs 0,7), both verifiers:")
    print()
    head = ("case", "vkx verify_quote", "vkx verify_evidence", "Keylime _tpm2_checkquote", "Keylime check_quote")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    vkx_wrong = []
    keylime_accepts = []
    shown_genuine = False
    for c, q, f, v in rows:
        cols = (verdict_word(v["verify_quote"]), verdict_word(v["verify_evidence"]), verdict_word(q), verdict_word(f))
        if c["name"].startswith("genuine"):
            if cols != ("accept",) * 4:
                vkx_wrong.append(c["name"])
            if shown_genuine:
                continue
            shown_genuine = True
            n = sum(1 for x in rows if x[0]["name"].startswith("genuine"))
            print(f"| genuine quotes ({n} vTPMs) | " + " | ".join(cols) + " |")
            continue
        # A tampered quote: the whole paths must refuse it.
        if cols[1] != "REFUSE":
            vkx_wrong.append(c["name"])
        if cols[3] != "REFUSE":
            keylime_accepts.append(c["name"])
        print(f"| {c['name']}: {c['what']} | " + " | ".join(cols) + " |")
    print()
    print("Reasons (vkx verify_evidence / Keylime check_quote):")
    for c, q, f, v in rows:
        if not c["name"].startswith("genuine"):
            print(f"  {c['name']}: {v['verify_evidence']}  /  {f}")
            if q != f and f.startswith("refuse") and q.startswith("refuse"):
                print(f"      (Keylime _tpm2_checkquote: {q})")
    print()
    kv = vkx["cpu_us_per_verification"]
    print(f"CPU per verification, median of {REPEATS} repeats (us; the runs in brackets):")

    def line(label, t, n):
        runs = ", ".join(f"{r:.1f}" for r in t["runs"])
        print(f"  {label:<62} {t['median']:>9.1f}   [{runs}] x {n}")

    line("vkx  verify_quote (quote only, no policy)", kv["verify_quote"], vkx["iterations"])
    line("vkx  verify_evidence (registry read + quote + policy)", kv["verify_evidence"], vkx["iterations"])
    line("Keylime Tpm._tpm2_checkquote (quote only, no policy)", t_quote, iterations)
    line("Keylime Tpm().check_quote (quote + PCR policy)", t_full, iterations)
    print(
        f"  ratio, quote only: {t_quote['median'] / kv['verify_quote']['median']:.1f}x;"
        f" whole call: {t_full['median'] / kv['verify_evidence']['median']:.1f}x"
    )
    status = 0
    if keylime_accepts:
        print(
            f"\nKeylime's check_quote ACCEPTS tampered quotes: {', '.join(keylime_accepts)}."
            "\n  Its _tpm2_checkquote returns str(exception) as the error and check_quote tests `if err:`;"
            "\n  cryptography's InvalidSignature has an empty message, so a quote whose signature does not"
            "\n  verify goes on as valid with no PCRs, and only a policy naming some PCR refuses it"
            "\n  (as 'missing_pcrs')."
        )
    if vkx_wrong:
        print(f"\nHARNESS OR VKX WRONG on: {', '.join(vkx_wrong)} (a genuine quote refused, or a tampered one accepted)")
        status = 1
    else:
        print("\nvkx's whole path refuses every tampered case; all four calls accept every genuine quote.")
    sys.exit(status)


if __name__ == "__main__":
    main()
