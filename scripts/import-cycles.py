#!/usr/bin/env python3
"""make lint: no import circles between the modules of a crate.

A module here is a file-level module of a library crate (common/src,
host/src, guest/src): `foo.rs` and `foo/mod.rs` are `foo`, `foo/bar.rs` is
`foo::bar`, and an inline `mod x { ... }` belongs to the file it is
written in. A module depends on another when its code names a path into it:
`use crate::a::b::{C, d::E}`, an expression path `crate::a::f()`, or a
relative `super::...` path. The path is charged to the longest file-level
module it starts with, followed through that module's re-exports
(`pub use inner::Item;` in `hub/mod.rs` charges `crate::hub::Item` to
`hub::inner`); a path into the crate root, into the module itself,
or into one of its ancestors or descendants is no dependency (a module and
the modules nested in it are one unit along that line).

Not counted: comments and string literals (intra-doc links and messages
name paths without depending on them), `$crate` inside macros, the
binaries' `main.rs` (a crate of its own), and test-only code: an item
under `#[cfg(test)]`, and the whole file of a `#[cfg(test)] mod x;`. Only
production dependencies can form a circle the build has to live with.

Prints each elementary circle, with the file and line of every step, and
exits 1 if there is any. `--self-test` runs the check on small inline
fixtures first, and proves both that it finds the circles they contain and
that it ignores what it should.
"""
import argparse
import pathlib
import re
import sys
import tempfile

CRATES = ("common/src", "host/src", "guest/src")
# Elementary circles printed per strongly connected component; a larger
# tangle is reported by its members past this many.
MAX_CIRCLES_SHOWN = 64
TOKEN = re.compile(r"\$?[A-Za-z_][A-Za-z0-9_]*|::|\S")


def strip_comments_and_literals(src: str) -> str:
    """The source with comments, string and char literals blanked out.

    Newlines are kept, so a token's line number stays right. Lifetimes
    (`'a`) are not char literals and are kept.
    """
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
            continue
        if src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * src.count("\n", i, j))
            i = j
            continue
        raw = re.match(r'b?r(#*)"', src[i:i + 260]) if c in "br" else None
        if raw and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            close = '"' + raw.group(1)
            j = src.find(close, i + raw.end())
            j = n if j < 0 else j + len(close)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
            continue
        if c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
            continue
        if c == "'":
            lit = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'\n])'", src[i:i + 12])
            if lit:
                out.append("' '")
                i += lit.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def tokens(src: str):
    """(token, line) pairs of the cleaned source."""
    line = 1
    pos = 0
    for m in TOKEN.finditer(src):
        line += src.count("\n", pos, m.start())
        pos = m.start()
        yield m.group(0), line


def skip_item(toks, k):
    """Index just past the item starting at toks[k] (ends at `;` or at
    the close of its first brace block, whichever comes first)."""
    depth = 0
    while k < len(toks):
        t = toks[k][0]
        if t == ";" and depth == 0:
            return k + 1
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return k


def path_at(toks, k):
    """The `a::b::c` path starting at toks[k] and the index after it."""
    segs = [toks[k][0]]
    k += 1
    while k + 1 < len(toks) and toks[k][0] == "::" and re.match(r"\w", toks[k + 1][0]):
        segs.append(toks[k + 1][0])
        k += 2
    return segs, k


def use_tree(toks, k, prefix):
    """Expand the use tree at toks[k] into full paths; returns (paths, next).

    `a::{b, c::{d, self}}` under prefix p gives p::a::b, p::a::c::d, p::a::c.
    """
    paths = []
    segs = list(prefix)
    while k < len(toks):
        t = toks[k][0]
        if t == "{":
            k += 1
            while k < len(toks) and toks[k][0] != "}":
                sub, k = use_tree(toks, k, segs)
                paths.extend(sub)
                if k < len(toks) and toks[k][0] == ",":
                    k += 1
            return paths, k + 1
        if t == "::":
            k += 1
            continue
        if t == "*":
            return [segs], k + 1
        if t == "self" and segs:
            return [segs], k + 1
        if re.match(r"\w", t) and t != "as":
            segs.append(t)
            k += 1
            continue
        if t == "as":
            k += 2
        break
    return [segs], k


def references(src: str):
    """What a file's production code names: (inline module nesting, path
    segments starting with `crate` or `super`, line) for each reference,
    the test-only child modules, and the file's top-level re-exports
    (name -> path as written). Test-only items are skipped."""
    toks = list(tokens(strip_comments_and_literals(src)))
    refs, test_children, reexports = [], set(), {}
    inline = []  # (name, brace depth at which it closes)
    depth = 0
    k = 0
    while k < len(toks):
        t, line = toks[k]
        window = [x for x, _ in toks[k:k + 7]]
        if window == ["#", "[", "cfg", "(", "test", ")", "]"]:
            k += 7
            while k < len(toks) and toks[k][0] == "#":  # further attributes
                k = skip_attribute(toks, k)
            j = k
            while j < len(toks) and toks[j][0] in ("pub", "(", ")", "crate", "super", "in"):
                j += 1
            if j + 2 < len(toks) and toks[j][0] == "mod" and toks[j + 2][0] == ";":
                test_children.add(tuple(n for n, _ in inline) + (toks[j + 1][0],))
            k = skip_item(toks, k)
            continue
        if t == "mod" and k + 2 < len(toks) and toks[k + 2][0] == "{":
            inline.append((toks[k + 1][0], depth + 1))
            depth += 1
            k += 3
            continue
        if t == "{":
            depth += 1
        elif t == "}":
            if inline and inline[-1][1] == depth:
                inline.pop()
            depth -= 1
        elif t == "use":
            public = k > 0 and toks[k - 1][0] in ("pub", ")")
            paths, k = use_tree(toks, k + 1, [])
            nest = tuple(n for n, _ in inline)
            if public and not nest:
                reexports.update((p[-1], p) for p in paths if len(p) > 1)
            refs.extend((nest, p, line) for p in paths if p and p[0] in ("crate", "super"))
            continue
        elif t in ("crate", "super") and k + 1 < len(toks) and toks[k + 1][0] == "::":
            prev = toks[k - 1][0] if k else ""
            if prev not in ("::", "in"):
                segs, k = path_at(toks, k)
                refs.append((tuple(n for n, _ in inline), segs, line))
                continue
        k += 1
    return refs, test_children, reexports


def skip_attribute(toks, k):
    """Index just past the `#[...]` attribute at toks[k]."""
    depth = 0
    k += 1
    while k < len(toks):
        if toks[k][0] == "[":
            depth += 1
        elif toks[k][0] == "]":
            depth -= 1
            if depth == 0:
                return k + 1
        k += 1
    return k


def module_of(rel: pathlib.PurePosixPath) -> tuple:
    """The module path of a file relative to its crate's src/."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def absolute(module: tuple, nest: tuple, segs: list):
    """The crate-absolute path a reference names, or None if it leaves
    the crate (too many `super`s)."""
    if segs[0] == "crate":
        return tuple(segs[1:])
    here = list(module + nest)
    rest = list(segs)
    while rest and rest[0] == "super":
        if not here:
            return None
        here.pop()
        rest.pop(0)
    return tuple(here + rest)


def related(a: tuple, b: tuple) -> bool:
    """A module and its own ancestors and descendants are one unit."""
    short, long_ = sorted((a, b), key=len)
    return long_[: len(short)] == short


class Graph:
    """The file-level modules of one crate and the references between them."""

    def __init__(self, src_dir: pathlib.Path, shown_as: str):
        self.edges = {}  # module -> {module: (file, line)}
        self.reexports = {}  # module -> {name: path as written}
        files, refs, test_only = {}, {}, set()
        for path in sorted(src_dir.rglob("*.rs")):
            rel = pathlib.PurePosixPath(path.relative_to(src_dir).as_posix())
            if rel.name == "main.rs" or rel.parts[0] == "bin":
                continue
            module = module_of(rel)
            files[module] = f"{shown_as}/{rel}"
            refs[module], children, self.reexports[module] = references(path.read_text())
            test_only.update(module + c for c in children)
        self.modules = {
            m for m in files if not any(m[: len(t)] == t for t in test_only)
        }
        for module in sorted(self.modules):
            out = self.edges.setdefault(module, {})
            for nest, segs, line in refs[module]:
                target = absolute(module, nest, segs)
                if target is None:
                    continue
                owner = self.owner(target)
                if owner is not None and not related(module, owner):
                    out.setdefault(owner, (files[module], line))

    def owner(self, path: tuple):
        """The file-level module that defines what `path` names: the
        longest module it starts with, through that module's re-exports."""
        for _ in range(16):  # re-exports of re-exports, bounded
            module = next(
                (path[:end] for end in range(len(path), 0, -1) if path[:end] in self.modules), None
            )
            if module is None or len(path) == len(module):
                return module
            written = self.reexports.get(module, {}).get(path[len(module)])
            if written is None:
                return module
            if written[0] in ("crate", "super"):
                target = absolute(module, (), written)
            elif written[0] == "self":
                target = module + tuple(written[1:])
            elif module + (written[0],) in self.modules:
                target = module + tuple(written)
            else:
                return module  # re-exported from another crate
            if target is None:
                return module
            path = target + path[len(module) + 1:]
        return module

    def components(self):
        """Strongly connected components with more than one module
        (Tarjan, iterative)."""
        index, low, on_stack, stack, found = {}, {}, set(), [], []
        counter = 0
        for root in sorted(self.edges):
            if root in index:
                continue
            work = [(root, iter(sorted(self.edges[root])))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                node, succ = work[-1]
                nxt = next(succ, None)
                if nxt is not None:
                    if nxt not in index:
                        index[nxt] = low[nxt] = counter
                        counter += 1
                        stack.append(nxt)
                        on_stack.add(nxt)
                        work.append((nxt, iter(sorted(self.edges.get(nxt, {})))))
                    elif nxt in on_stack:
                        low[node] = min(low[node], index[nxt])
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
        return found

    def circles(self, comp):
        """Elementary circles inside one component, each starting at its
        smallest module, at most MAX_CIRCLES_SHOWN + 1 of them."""
        members = set(comp)
        out = []
        for start in comp:
            allowed = {m for m in members if m >= start}
            path = [start]

            def walk(node):
                for nxt in sorted(self.edges.get(node, {})):
                    if len(out) > MAX_CIRCLES_SHOWN:
                        return
                    if nxt == start:
                        out.append(list(path))
                    elif nxt in allowed and nxt not in path:
                        path.append(nxt)
                        walk(nxt)
                        path.pop()

            walk(start)
        return out


def name(module: tuple) -> str:
    return "::".join(module) or "crate"


def report(root: pathlib.Path, out=sys.stdout) -> int:
    """Print every circle of every crate under `root`; the count."""
    total = 0
    for crate in CRATES:
        if not (root / crate).is_dir():
            continue
        graph = Graph(root / crate, crate)
        for comp in graph.components():
            circles = graph.circles(comp)
            for circle in circles[:MAX_CIRCLES_SHOWN]:
                total += 1
                steps = []
                for a, b in zip(circle, circle[1:] + circle[:1]):
                    file, line = graph.edges[a][b]
                    steps.append(f"  {name(a)} -> {name(b)}   ({file}:{line})")
                print(f"{crate}: circle {' -> '.join(map(name, circle + circle[:1]))}", file=out)
                print("\n".join(steps), file=out)
            if len(circles) > MAX_CIRCLES_SHOWN:
                total += 1
                print(f"{crate}: more circles among {', '.join(map(name, comp))}", file=out)
    return total


# Fixture crates for --self-test: file -> source. Each `EXPECT` line names a
# circle the check must report (modules in order from the smallest).
FIXTURES = {
    "lib.rs": "pub mod a; pub mod b; pub mod c; pub mod d; pub mod e; pub mod f; pub mod g;\n"
              "pub mod nest; pub mod quiet; pub mod hub; pub mod r;\n#[cfg(test)]\nmod only_tests;\n",
    # a <-> b: a `use` one way, an expression path the other.
    "a.rs": "use crate::b::Thing;\npub fn f() -> Thing { Thing }\n",
    "b.rs": "pub struct Thing;\npub fn g() { crate::a::f(); }\n",
    # c -> d -> e -> c through grouped and renamed uses.
    "c.rs": "use crate::{d::{self, D as Dee}, quiet};\n",
    "d.rs": "pub struct D;\npub(crate) use crate::e::E;\n",
    "e.rs": "pub struct E;\nfn h() {\n    let _ = crate\n        ::c::X;\n}\n",
    # nest::x <-> nest::y through `super::`, and from an inline module.
    "nest/mod.rs": "pub mod x;\npub mod y;\nuse self::x::X;\n",
    "nest/x.rs": "pub struct X;\nmod inner {\n    use super::super::y::Y;\n}\n",
    "nest/y.rs": "pub struct Y;\nuse crate::nest::x::X;\n",
    # None of these is a dependency: comments, strings, char literals
    # around lifetimes, a parent, a child, test-only code, `$crate`.
    "f.rs": "// use crate::g::G;\n/* crate::g::G */\n/// [`crate::g::G`]\n"
            "fn s<'a>(x: &'a str) -> char { let _ = \"crate::g::G\"; let _ = r#\"crate::g\"#; '\"' }\n"
            "macro_rules! m { () => { $crate::g::G } }\n"
            "pub(crate) fn p() { use super::*; }\n",
    "g.rs": "pub struct G;\nuse crate::f;\n"
            "#[cfg(test)]\nmod tests {\n    use crate::f::p;\n}\n"
            "#[cfg(test)]\n#[allow(unused)]\nuse crate::f::q;\n",
    "quiet.rs": "use crate::only_tests::T;\n",
    "only_tests.rs": "pub struct T;\nuse crate::quiet;\n",
    # hub::inner <-> r, through the re-export in hub/mod.rs.
    "hub/mod.rs": "mod inner;\npub use inner::Item;\n",
    "hub/inner.rs": "pub struct Item;\nuse crate::r::R;\n",
    "r.rs": "pub struct R;\nuse crate::hub::Item;\n",
    # `main.rs` is the binary's own crate.
    "main.rs": "mod a;\nuse crate::a::f;\n",
}
EXPECT = [
    "circle a -> b -> a",
    "circle c -> d -> e -> c",
    "circle hub::inner -> r -> hub::inner",
    "circle nest::x -> nest::y -> nest::x",
]


def self_test() -> None:
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d) / "host/src"
        for rel, text in FIXTURES.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)

        class Lines(list):
            def write(self, s):
                self.append(s)

        printed = Lines()
        count = report(pathlib.Path(d), printed)
        heads = sorted(
            line.split(": ", 1)[1] for line in "".join(printed).splitlines() if ": circle " in line
        )
    if heads != EXPECT or count != len(EXPECT):
        sys.exit("import-cycles self-test failed:\n" + "".join(printed))
    print(f"import-cycles self-test: {len(EXPECT)} circles found, no false ones")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--self-test", action="store_true", help="check the checker on fixtures")
    args = parser.parse_args()
    if args.self_test:
        self_test()
    else:
        circles = report(pathlib.Path(__file__).resolve().parent.parent)
        if circles:
            sys.exit(f"import-cycles: {circles} circle(s) between modules; break them")
        print("import-cycles: no circles between the modules of " + ", ".join(CRATES))
