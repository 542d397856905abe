#!/usr/bin/env python3
"""Replaces a target's committed corpus with its minimised working corpus,
within a size cap.

Usage: keep-seeds.py CORPUS_DIR SEEDS_DIR MAX_KIB
CORPUS_DIR has been minimised by `cargo fuzz cmin` (each file adds
coverage). The smallest files are kept first until MAX_KIB would be
exceeded; the rest stay in the working corpus only, and the count left
out is printed so a cap that bites is seen.
"""
import os, shutil, sys

corpus, seeds, max_kib = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted((os.path.getsize(os.path.join(corpus, f)), f) for f in os.listdir(corpus))
os.makedirs(seeds, exist_ok=True)
for f in os.listdir(seeds):
    os.remove(os.path.join(seeds, f))
total, kept = 0, 0
for size, f in files:
    if total + size > max_kib * 1024:
        break
    shutil.copyfile(os.path.join(corpus, f), os.path.join(seeds, f))
    total += size
    kept += 1
print(f"{seeds}: {kept} of {len(files)} inputs, {total / 1024:.1f} KiB (cap {max_kib} KiB)"
      + (f"; {len(files) - kept} left out by the cap" if kept < len(files) else ""))
