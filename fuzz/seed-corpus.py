#!/usr/bin/env python3
"""Writes the fuzz seed corpora from spec/vectors.

message_decode: every positive message (cbor) and every message-layer
negative input; tpm_parse: the TPM structures of common/tests/fixtures/tpm. frame_decoder: the same payloads framed, a stream of all
positive messages back to back, and the frame-layer negative inputs; each
prefixed with the target's chunk-size header (0 = no chunk sizes).
Usage: seed-corpus.py OUT_DIR   (creates OUT_DIR/<target>/)
"""
import glob, json, os, struct, sys

root = os.path.dirname(os.path.abspath(__file__))
vectors = os.path.join(root, "..", "spec", "vectors")
out = sys.argv[1]
msg_dir = os.path.join(out, "message_decode")
frame_dir = os.path.join(out, "frame_decoder")
os.makedirs(msg_dir, exist_ok=True)
os.makedirs(frame_dir, exist_ok=True)

def frame(p):
    return struct.pack(">I", len(p)) + p

def write(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

stream = b""
for path in sorted(glob.glob(os.path.join(vectors, "messages", "*.json"))):
    v = json.load(open(path))
    name = os.path.basename(path)[:-5]
    cbor = bytes.fromhex(v["cbor"])
    write(msg_dir, "pos-" + name, cbor)
    write(frame_dir, "pos-" + name, b"\x00" + frame(cbor))
    stream += frame(cbor)
write(frame_dir, "stream-all", b"\x00" + stream)
write(frame_dir, "stream-all-chunks-1-7", b"\x02\x01\x07" + stream)
for path in sorted(glob.glob(os.path.join(vectors, "negative", "*.json"))):
    v = json.load(open(path))
    name = os.path.basename(path)[:-5]
    data = bytes.fromhex("".join(v["input"].split()))
    if v["layer"] == "message":
        write(msg_dir, "neg-" + name, data)
        write(frame_dir, "neg-" + name, b"\x00" + frame(data))
    else:
        write(frame_dir, "neg-" + name, b"\x00" + data)
# tpm_parse: every TPM structure of the fixtures (made by swtpm).
tpm_dir = os.path.join(out, "tpm_parse")
os.makedirs(tpm_dir, exist_ok=True)
fixtures = os.path.join(root, "..", "common", "tests", "fixtures", "tpm")
for case in sorted(os.listdir(fixtures)):
    for f in ("attest.bin", "sig.bin", "ak.pub", "other-ak.pub"):
        path = os.path.join(fixtures, case, f)
        if os.path.exists(path):
            write(tpm_dir, f"{case}-{f}", open(path, "rb").read())
# The session targets build their own messages; start from nothing (and
# from their committed corpora, fuzz/seeds).
for t in ("host_session", "guest_session", "session_pair"):
    os.makedirs(os.path.join(out, t), exist_ok=True)
print(f"{len(os.listdir(msg_dir))} message seeds, {len(os.listdir(frame_dir))} frame seeds, "
      f"{len(os.listdir(tpm_dir))} TPM seeds in {out}")
