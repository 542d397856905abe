#!/usr/bin/env python3
"""make lint: library code logs only through the rate-limited macros.

Every module of the agents' libraries (common/src, host/src, guest/src) can
be reached by something a peer sends, so none of them may write a log line
or print except through `rl_error!` / `rl_warn!` / `rl_info!` / `rl_log!`,
which rate-limit per call site and per peer and report what they
suppressed. This is the check clippy's `disallowed-macros` cannot make:
that lint also fires inside the expansion of our own macros, which must
call `tracing` in the end.

Exempt: `main.rs` (the CLI's own output to its operator), the module that
defines the macros (`common/src/ratelimit.rs`), and `#[cfg(test)]` modules
(by convention the last item of a file). Exit 1 with file:line for each
violation. `--self-test` proves the check catches what it should.
"""
import pathlib
import re
import sys
import tempfile

ROOTS = ["common/src", "host/src", "guest/src"]
EXEMPT = {"main.rs"}
EXEMPT_PATHS = {"common/src/ratelimit.rs"}
FORBIDDEN = re.compile(
    r"(?<![A-Za-z0-9_])("
    r"tracing::(error|warn|info|debug|trace|event|span)!"
    r"|(?<!rl_)(?<!::)\b(error|warn|info|debug|trace)!\s*\("
    r"|use\s+tracing::"
    r"|log::(error|warn|info|debug|trace)!"
    r"|e?println!|e?print!|dbg!"
    r")"
)
TEST_MOD = re.compile(r"^\s*#\[cfg\(test\)\]\s*$")


def violations(path: pathlib.Path, text: str):
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        if TEST_MOD.match(line):
            break  # the test module: to the end of the file
        code = line.split("//", 1)[0]
        if FORBIDDEN.search(code):
            yield f"{path}:{n}: raw logging or printing: {line.strip()}"


def check(root: pathlib.Path) -> list:
    found = []
    for r in ROOTS:
        for path in sorted((root / r).rglob("*.rs")):
            rel = path.relative_to(root).as_posix()
            if path.name in EXEMPT or rel in EXEMPT_PATHS:
                continue
            found.extend(violations(path.relative_to(root), path.read_text()))
    return found


def self_test() -> None:
    bad = [
        'tracing::warn!("x");',
        'warn!("peer sent {}", x);',
        "use tracing::info;",
        'eprintln!("x");',
        'println!("x");',
        "dbg!(x);",
    ]
    good = [
        'rl_warn!(peer: vm, "x");',
        'vkx_common::rl_log!(trace, "x");',
        "// tracing::warn! in a comment",
        'let warning = 1;',
    ]
    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "common/src"
        p.mkdir(parents=True)
        for i, line in enumerate(bad):
            (p / f"bad{i}.rs").write_text(f"fn f() {{\n    {line}\n}}\n")
        (p / "good.rs").write_text(
            "fn f() {\n" + "\n".join(good) + "\n}\n#[cfg(test)]\nmod tests {\n    fn t() { println!(\"ok\"); }\n}\n"
        )
        found = check(pathlib.Path(d))
    assert len(found) == len(bad), found
    assert not any("good.rs" in f for f in found), found
    print(f"check-logging self-test: {len(bad)} violations caught, {len(good)} allowed forms passed")


def main() -> int:
    if "--self-test" in sys.argv:
        self_test()
        return 0
    root = pathlib.Path(__file__).resolve().parent.parent
    found = check(root)
    for f in found:
        print(f, file=sys.stderr)
    if found:
        print(f"check-logging: {len(found)} violation(s): log through rl_error!/rl_warn!/rl_info!/rl_log!", file=sys.stderr)
        return 1
    print("check-logging: library code logs only through the rate-limited macros")
    return 0


if __name__ == "__main__":
    sys.exit(main())
