//! The Prometheus text exposition format (0.0.4): a family's
//! `# HELP`/`# TYPE` head, one sample line, and a family with a sample per
//! value of one label. Shared by the
//! renderers of `metrics` and `health`, so neither borrows the other's.
//! What it trusts: its callers' names, help texts and label strings
//! (fixed tables, never peer bytes). No I/O.

use std::fmt::Write as _;

/// Writes the head of family `name`: its help text and its `kind`
/// (`counter`, `gauge`, `histogram`).
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample of `name`: `labels` (`k="v",...`, may be empty)
/// and its value.
pub fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// One family (`(name, kind, help)`) with a sample per value of one
/// label: `label="value"`.
pub fn by_label<'a>(
    o: &mut String,
    (name, kind, help): (&str, &str, &str),
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) {
    family(o, name, kind, help);
    for (value, v) in samples {
        sample(o, name, &format!("{label}=\"{value}\""), v);
    }
}
