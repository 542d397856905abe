#!/usr/bin/env python3
"""deb-copyright.py PACKAGE OUT: the licence part of PACKAGE's Debian
copyright file (cargo-deb's `license-file`): vkx's own licence, then every
crate linked into the binary (normal dependencies of PACKAGE for Linux,
proc-macros excluded: they run at build time only) with its licence
expression, then the licence and notice files those crates ship, each
distinct text once with the crates that ship it. The Apache-2.0 text
itself is /usr/share/common-licenses/Apache-2.0 on Debian and is referenced,
not copied; Apache NOTICE files are copied.

Reads `cargo metadata --locked` (offline: the lock file and the local
registry). Fails if a crate declares no licence or ships no licence file
where its licence requires one (anything but Apache-2.0 alone)."""
import hashlib, json, os, re, subprocess, sys

pkg, out = sys.argv[1], sys.argv[2]
meta = json.loads(subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--locked",
     "--filter-platform", "x86_64-unknown-linux-gnu"],
    check=True, capture_output=True, text=True).stdout)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(p["id"] for p in meta["packages"] if p["name"] == pkg and p["source"] is None)

def is_proc_macro(p):
    return any("proc-macro" in t["kind"] for t in p["targets"])

seen, stack = set(), [root]
while stack:
    i = stack.pop()
    if i in seen:
        continue
    seen.add(i)
    for d in nodes[i]["deps"]:
        if any(k["kind"] is None for k in d["dep_kinds"]) and not is_proc_macro(packages[d["pkg"]]):
            stack.append(d["pkg"])

crates = sorted((packages[i] for i in seen if packages[i]["source"] is not None),
                key=lambda p: (p["name"], p["version"]))
MIT = """Copyright (c) HOLDERS

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE."""
LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|COPYRIGHT|NOTICE|UNLICENSE)", re.I)
texts = {}      # sha256 -> (text, [crate names])
problems = []
for p in crates:
    lic = p.get("license")
    if not lic:
        problems.append(f"{p['name']} {p['version']}: no SPDX licence field")
        continue
    d = os.path.dirname(p["manifest_path"])
    files = sorted(f for f in os.listdir(d) if LICENSE_FILE.match(f) and os.path.isfile(os.path.join(d, f)))
    if p.get("license_file"):
        files.append(p["license_file"])
    found = False
    for f in files:
        text = open(os.path.join(d, f), encoding="utf-8", errors="replace").read().strip()
        if not text:
            continue
        found = True
        if "Apache License" in text and "Version 2.0, January 2004" in text and "NOTICE" not in f.upper():
            continue  # the standard Apache-2.0 text: common-licenses
        h = hashlib.sha256(text.encode()).hexdigest()
        texts.setdefault(h, (text, []))[1].append(f"{p['name']} {p['version']} ({f})")
    if not found and lic.strip() != "Apache-2.0":
        if "MIT" in lic:
            # The crate ships no text: MIT's standard one, with the authors
            # it declares as the copyright holders.
            holders = ", ".join(p.get("authors") or []) or f"the {p['name']} authors"
            text = MIT.replace("HOLDERS", holders)
            h = hashlib.sha256(text.encode()).hexdigest()
            texts.setdefault(h, (text, []))[1].append(
                f"{p['name']} {p['version']} (no licence file in the crate: MIT's standard text)")
        else:
            problems.append(f"{p['name']} {p['version']}: licence {lic} but no licence file in the crate")

if problems:
    # Some crates ship no licence file; name them rather than hide them.
    print("deb-copyright: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)

with open(out, "w", encoding="utf-8") as o:
    o.write(f"{pkg} is licensed under the Apache License, Version 2.0; on Debian systems its\n"
            "full text is in /usr/share/common-licenses/Apache-2.0.\n\n")
    o.write(f"The {pkg} binary contains these {len(crates)} crates from crates.io, each under\n"
            "its own licence (SPDX expression as the crate declares it):\n\n")
    for p in crates:
        o.write(f"  {p['name']} {p['version']}: {p['license']}\n")
    o.write("\nThe Apache-2.0 text is /usr/share/common-licenses/Apache-2.0. The other licence\n"
            "and notice texts those crates ship follow, each once, with the crates that ship it.\n")
    for h, (text, who) in sorted(texts.items(), key=lambda kv: kv[1][1][0]):
        o.write("\n" + "-" * 72 + "\n" + "Shipped by: " + ", ".join(who) + "\n\n" + text + "\n")
print(f"deb-copyright: {pkg}: {len(crates)} crates, {len(texts)} licence/notice texts -> {out}")
