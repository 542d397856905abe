//! Prints the fault-injection table (`make chaos`): one row per case of
//! issue #6 item 5, with the measured figure and the bound beside it, from
//! the row files the suite writes to `target/chaos/<case>.json`
//! (`tests/tests/chaos_ab.rs` writes a and b, `chaos_ef.rs` e and f; cases c, d and g are
//! written by their own harnesses, `chaos_cd.rs` and `chaos_g.rs`, in the
//! same format).
//!
//! A row file holds one JSON object:
//! `{"case":"a","title":"...","figure":"...","bound":"...","pass":true,"run":"full"}`.
//! A case without a file prints "not run here"; an unreadable file is a
//! failed row. Exits 1 if any row present did not pass, so the table can
//! gate a pipeline.

#![allow(clippy::print_stdout)] // A report: printing is its job.

use std::path::PathBuf;
use std::process::ExitCode;

/// The cases, in order, with the title printed when a case has no row.
const CASES: [(&str, &str); 8] = [
    ("a", "host unreachable for 1 h (virtual time)"),
    ("b", "host answers unknown-message / unsupported-version"),
    ("c", "1,024 guests reconnect at once (herd)"),
    ("d", "hostile peer"),
    ("d2", "many hostile VMs stall handshakes"),
    ("e", "TPM faults: transient codes, device missing"),
    ("f", "host and guest killed mid-handshake, restarted"),
    ("g", "kill switch flipped while 1,024 guests hold sessions"),
];
/// Largest row file read: a row is a few hundred bytes.
const MAX_ROW_FILE: u64 = 64 * 1024;
/// Column widths: case, title, measured, bound, result (cells wrap at
/// spaces).
const WIDTHS: [usize; 5] = [4, 24, 56, 36, 14];

struct Row {
    title: String,
    figure: String,
    bound: String,
    verdict: &'static str,
    run: String,
}

fn results_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("chaos")
}

fn read_row(case: &str, title: &str) -> Row {
    let path = results_dir().join(format!("{case}.json"));
    let missing = || Row {
        title: title.to_owned(),
        figure: "not run here".into(),
        bound: String::new(),
        verdict: "-",
        run: String::new(),
    };
    let broken = |why: String| Row {
        title: title.to_owned(),
        figure: format!("unreadable row file {}: {why}", path.display()),
        bound: String::new(),
        verdict: "FAIL",
        run: String::new(),
    };
    let text = match std::fs::metadata(&path) {
        Err(_) => return missing(),
        Ok(m) if m.len() > MAX_ROW_FILE => return broken(format!("{} bytes", m.len())),
        Ok(_) => match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return broken(e.to_string()),
        },
    };
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return broken(e.to_string()),
    };
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Row {
        title: Some(field("title"))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| title.to_owned()),
        figure: field("figure"),
        bound: field("bound"),
        verdict: if v["pass"].as_bool() == Some(true) {
            "pass"
        } else {
            "FAIL"
        },
        run: field("run"),
    }
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().map_or(0, |l| l.chars().count());
        if last > 0 && last + 1 + word.chars().count() > width {
            lines.push(String::new());
        }
        if let Some(l) = lines.last_mut() {
            if !l.is_empty() {
                l.push(' ');
            }
            l.push_str(word);
        }
    }
    lines
}

fn rule() -> String {
    let dashes: Vec<String> = WIDTHS.iter().map(|w| "-".repeat(*w)).collect();
    format!("+-{}-+", dashes.join("-+-"))
}

/// Prints one table row whose cells wrap within their columns.
fn print_row(cells: [&str; 5]) {
    let wrapped: Vec<Vec<String>> = cells.iter().zip(WIDTHS).map(|(c, w)| wrap(c, w)).collect();
    let height = wrapped.iter().map(Vec::len).max().unwrap_or(1);
    for i in 0..height {
        let line: Vec<String> = wrapped
            .iter()
            .zip(WIDTHS)
            .map(|(lines, w)| format!("{:<w$}", lines.get(i).map_or("", String::as_str)))
            .collect();
        println!("| {} |", line.join(" | "));
    }
}

fn main() -> ExitCode {
    let dir = results_dir();
    println!(
        "fault-injection suite (issue #6 item 5): rows from {}",
        dir.canonicalize().unwrap_or(dir).display()
    );
    println!("{}", rule());
    print_row(["case", "fault", "measured", "bound", "result"]);
    println!("{}", rule());
    let mut failed = 0;
    for (case, title) in CASES {
        let row = read_row(case, title);
        if row.verdict == "FAIL" {
            failed += 1;
        }
        let result = if row.run.is_empty() {
            row.verdict.to_owned()
        } else {
            format!("{} ({} run)", row.verdict, row.run)
        };
        print_row([case, &row.title, &row.figure, &row.bound, &result]);
        println!("{}", rule());
    }
    if failed > 0 {
        println!("{failed} case(s) outside their bounds");
        ExitCode::from(1)
    } else {
        println!("every case run here is within its bound");
        ExitCode::SUCCESS
    }
}
