#!/usr/bin/env python3
"""Sorts a perf profile of `vkx-host serve` into the README's breakdown.

Reads `perf script -F period,ip,sym,dso` (with call chains, leaf frame
first) on stdin, as `scripts/profile-storm.sh` produces it for storm (a),
and prints one row per cause: its share of the host's sampled CPU and,
given the measured host CPU per attested key release (`--us`), the
microseconds of it. The rows are disjoint and say what the CPU did, not
which Rust crate asked for it:

  registry          everything under the registry's entry reads and the
                    quote record (vkx_host::registry, record_quote),
                    split into its kernel part (open, rename, fsync) and
                    its user part (JSON, hex, paths)
  crypto            ring's primitives (ECDHE, ECDSA, SHA-2, AES-GCM): the
                    kind of work the floor counts
  kernel: X         other system calls, by the syscall at the stack's
                    kernel entry (socket I/O, epoll, mmap, ...)
  allocation        malloc/free/realloc and what they call
  logging           tracing and the rate limiter
  rustls            rustls itself, beyond the primitives and allocation
  tpm               vkx_common::tpm's parsing and checks of the quote
  tokio             the runtime: scheduler, timers, I/O driver, blocking pool
  vkx               the rest of vkx's code (session, codec, policy, ...)
  other             anything else (memcpy, libc, unresolved frames)

Usage: perf script -i FILE -F period,ip,sym,dso | profile-breakdown.py --us 1084
"""
import argparse
import collections
import re
import sys

HEADER = re.compile(r"^\s*(\d+)\s*$")
FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")

CRYPTO = re.compile(
    r"ring_core_|ring::(ec|aead|digest|agreement|hmac|hkdf|rsa|arithmetic|limb|bssl)|"
    r"GFp_|nistz256|p256_|x25519|sha256_block|sha512_block|aes_hw|aesni|gcm_|"
    r"ChaCha20|chacha20|poly1305|bn_mul|LIMBS_|ecp_"
)
REGISTRY = re.compile(r"vkx_host::registry|vkx_host::attestation::(record_quote|registered)")
LOGGING = re.compile(r"tracing_subscriber|tracing_core|tracing::|vkx_common::ratelimit")
ALLOC = re.compile(r"^(__libc_)?(malloc|free|realloc|calloc|cfree)|^_int_(malloc|free|realloc)|"
                   r"^malloc_consolidate|^tcache_|^__rust_(alloc|dealloc|realloc)|"
                   r"^alloc::alloc|^sysmalloc|^unlink_chunk")
TOKIO = re.compile(r"^tokio::|^mio::")
RUSTLS = re.compile(r"rustls::")
TPM = re.compile(r"vkx_common::tpm")
VKX = re.compile(r"vkx_")
SYSCALL = re.compile(r"__(x64|se|do)_sys_(\w+)|^(ksys|do)_(\w+)")


def is_kernel(dso):
    return "kernel" in dso or dso.startswith("[k")


def syscall_of(frames):
    """What a kernel sample is doing: the system call at the stack's
    kernel entry, or the fault or interrupt that entered the kernel."""
    name = None
    for sym, dso in frames:
        if not is_kernel(dso):
            break
        for pattern in (r"__(?:x64|se|do)_sys_(\w+)", r"^ksys_(\w+)", r"^__sys_(\w+)",
                        r"^do_(writev|readv|epoll_wait|sys_openat2|fsync|accept4?)$"):
            m = re.search(pattern, sym)
            if m:
                name = m.group(1).replace("sys_openat2", "openat")
                break
    if name:
        return name
    syms = [s for s, d in frames if is_kernel(d)]
    if any("page_fault" in s for s in syms):
        return "page faults"
    if any("exit_to_user_mode" in s for s in syms) and any(s == "schedule" for s in syms):
        return "context switches (preempted on return to user)"
    if any("interrupt" in s or "irq" in s for s in syms):
        return "interrupts"
    return "other"


def classify(frames):
    if not frames:
        return "other"
    syms = [s for s, _ in frames]
    leaf, leaf_dso = frames[0]
    if any(REGISTRY.search(s) for s in syms):
        return "registry: kernel, " + syscall_of(frames) if is_kernel(leaf_dso) \
            else "registry: user (JSON, hex, paths)"
    if is_kernel(leaf_dso):
        return "kernel: " + syscall_of(frames)
    if CRYPTO.search(leaf):
        return "crypto: " + crypto_kind(leaf)
    if ALLOC.search(leaf):
        return "allocation (malloc/free)"
    if any(LOGGING.search(s) for s in syms):
        return "logging (tracing, rate limiter)"
    if RUSTLS.search(leaf):
        return "rustls beyond its primitives"
    if TPM.search(leaf):
        return "TPM quote parsing and checks"
    if TOKIO.search(leaf):
        return "tokio (scheduler, timers, I/O driver)"
    if VKX.search(leaf):
        return "vkx (session, codec, policy, release)"
    # A libc or unresolved leaf: by the nearest known caller.
    for s in syms[1:]:
        if RUSTLS.search(s):
            return "rustls beyond its primitives"
        if TPM.search(s):
            return "TPM quote parsing and checks"
        if TOKIO.search(s):
            return "tokio (scheduler, timers, I/O driver)"
        if VKX.search(s):
            return "vkx (session, codec, policy, release)"
    return "other (libc, unresolved)"


def crypto_kind(leaf):
    if re.search(r"curve25519|x25519|fe_|fe4_", leaf):
        return "X25519 (ECDHE)"
    if re.search(r"nistz256|p256|ecp_|ord_", leaf):
        return "P-256 (TLS signature, quote verification)"
    if re.search(r"sha256|sha512|digest|hmac|hkdf", leaf):
        return "SHA-2 (key schedule, transcripts, HMAC)"
    if re.search(r"aes|gcm|chacha|poly1305|aead", leaf):
        return "AEAD (records)"
    return "other"


def samples(lines):
    period, frames = None, []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if period is not None:
                yield period, frames
            period, frames = None, []
            continue
        m = FRAME.match(line)
        if m and period is not None:
            frames.append((m.group(1), m.group(2)))
            continue
        m = HEADER.match(line)
        if m:
            if period is not None:
                yield period, frames
            period, frames = int(m.group(1)), []
    if period is not None:
        yield period, frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--us", type=float, help="measured host CPU per key release (us)")
    ap.add_argument("--min-share", type=float, default=0.5,
                    help="rows under this share (%%) are summed per family")
    ap.add_argument("--top", type=int, default=0, help="also print the top N leaf symbols")
    args = ap.parse_args()
    by = collections.Counter()
    leaves = collections.Counter()
    total = 0
    n = 0
    for period, frames in samples(sys.stdin):
        by[classify(frames)] += period
        if frames:
            leaves[re.sub(r"\+0x[0-9a-f]+$", "", frames[0][0])] += period
        total += period
        n += 1
    if not total:
        sys.exit("no samples")
    print(f"{n} samples")
    print(f"{'cause':<60}{'share':>8}" + (f"{'us/release':>12}" if args.us else ""))
    # Rows under MIN_SHARE are summed into one per family.
    rows = collections.Counter()
    for cause, p in by.items():
        if p / total < args.min_share / 100 and ": " in cause:
            cause = cause.split(": ")[0] + ": rest"
        rows[cause] += p
    for cause, p in sorted(rows.items(), key=lambda kv: -kv[1]):
        share = p / total
        row = f"{cause:<60}{100 * share:>7.1f}%"
        if args.us:
            row += f"{share * args.us:>12.0f}"
        print(row)
    for sym, p in leaves.most_common(args.top):
        print(f"  {100 * p / total:5.1f}%  {sym[:110]}")


if __name__ == "__main__":
    main()
