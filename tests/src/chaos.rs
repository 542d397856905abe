//! The rows of the fault-injection suite's table (`make chaos`): each
//! case of `tests/chaos_ab.rs`, `tests/chaos_ef.rs`, `tests/chaos_cd.rs`
//! and `tests/chaos_g.rs` writes one JSON line
//! `{"case","title","figure","bound","pass","run"}` to
//! `<target>/chaos/<case>.json`; `examples/chaos_report.rs` prints them.
//! `VKX_CHAOS_FULL=1` selects the full sizes.

#![allow(clippy::print_stdout)] // Each case prints its figure.

use std::path::PathBuf;

/// Set to 1 for the full-size run (`make chaos`).
pub const FULL_ENV: &str = "VKX_CHAOS_FULL";

pub fn full() -> bool {
    std::env::var(FULL_ENV).is_ok_and(|v| v == "1")
}

/// The size of this run: `full` or `reduced`.
pub fn size<T>(full_size: T, reduced: T) -> T {
    if full() { full_size } else { reduced }
}

/// Where the rows go: `<target>/chaos`.
pub fn results_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("chaos")
}

/// One case's row. Written by [`Row::finish`]; if the test panics before
/// that, dropping the row writes it as failed.
#[derive(Debug)]
pub struct Row {
    case: &'static str,
    title: &'static str,
    bound: String,
    done: bool,
}

impl Row {
    pub fn start(case: &'static str, title: &'static str, bound: impl Into<String>) -> Self {
        let _ = std::fs::remove_file(Self::path(case));
        Self {
            case,
            title,
            bound: bound.into(),
            done: false,
        }
    }

    fn path(case: &str) -> PathBuf {
        results_dir().join(format!("{case}.json"))
    }

    fn write(&self, figure: &str, pass: bool) {
        let row = serde_json::json!({
            "case": self.case,
            "title": self.title,
            "figure": figure,
            "bound": self.bound,
            "pass": pass,
            "run": size("full", "reduced"),
        });
        std::fs::create_dir_all(results_dir()).unwrap();
        std::fs::write(Self::path(self.case), format!("{row}\n")).unwrap();
    }

    /// The bound, once the test knows it (e.g. from a measured baseline).
    pub fn set_bound(&mut self, bound: impl Into<String>) {
        self.bound = bound.into();
    }

    /// Writes the row and prints the figure; the caller asserts after.
    pub fn finish(mut self, figure: &str, pass: bool) {
        self.write(figure, pass);
        self.done = true;
        println!(
            "chaos {}: {figure} (bound: {}) {}",
            self.case,
            self.bound,
            if pass { "PASS" } else { "FAIL" }
        );
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        if !self.done {
            self.write("the test failed before it measured: see its output", false);
        }
    }
}
