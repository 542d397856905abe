//! The drills (`vkx-host drill`, issue #12 item 3) run as the operator
//! runs them: the real binary, at reduced size, its exit code and printed
//! verdict asserted. `make test` runs this file; `make drill` runs every
//! scenario at full size through the binary directly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the failure report.
#![allow(clippy::print_stdout)] // The drill's timeline is the test's report.

use std::process::Command;

/// Runs `vkx-host drill --scenario NAME` (reduced) and returns its output
/// after asserting exit 0, a PASS verdict and the picture.
fn drill(scenario: &str) -> String {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(vkx_e2e::bin("vkx-host"))
        .args([
            "drill",
            "--scenario",
            scenario,
            "--size",
            "reduced",
            "--out",
        ])
        .arg(out.path())
        .output()
        .expect("run vkx-host drill");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("{text}");
    assert!(o.status.success(), "drill {scenario} failed:\n{text}");
    assert!(text.contains("verdict: PASS"), "{text}");
    let svg = out.path().join(format!("drill-{scenario}.svg"));
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg"), "{}", svg.display());
    text
}

#[test]
fn kill_under_load_reduced() {
    let text = drill("kill-under-load");
    for want in ["kill rev", "last guest told", "quiet", "recovered"] {
        assert!(text.contains(want), "no {want:?} in the timeline:\n{text}");
    }
}

#[test]
fn clean_reduced() {
    let text = drill("clean");
    for want in [
        "stage canary",
        "verdict canary",
        "stage all",
        "verdict all",
        "completed",
    ] {
        assert!(text.contains(want), "no {want:?} in the timeline:\n{text}");
    }
}

#[test]
fn seed_incident_reduced() {
    let text = drill("seed-incident");
    for want in [
        "stage canary",
        "stage 1pct",
        "first fault",
        "kill rev",
        "last guest updated",
        "quiet",
        "recovered",
    ] {
        assert!(text.contains(want), "no {want:?} in the timeline:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.contains("verdict 1pct") && l.contains("fail")),
        "the 1pct gate did not fail:\n{text}"
    );
}

#[test]
fn etcd_loss_reduced() {
    let text = drill("etcd-loss");
    for want in [
        "stage 1pct",
        "store lost",
        "hosts hold",
        "local kill",
        "last guest of node told",
        "local unkill",
        "store back",
        "controller resumed",
        "completed",
    ] {
        assert!(text.contains(want), "no {want:?} in the timeline:\n{text}");
    }
}

#[test]
fn live_reduced() {
    let text = drill("live");
    for want in [
        "live drill",
        "last guest told",
        "live drill done",
        "live drill killed",
        "restored",
        // The live drill's own report, kept as notes.
        "live |   overlay written -> every live session told",
        "live | verdict: PASS",
    ] {
        assert!(text.contains(want), "no {want:?} in the timeline:\n{text}");
    }
}
