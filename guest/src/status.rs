//! The daemon's status file: what `vkx-guest status` shows (state, last
//! success, next attempt, last error), written atomically on every change
//! of state so a reader never sees half a file.
//!
//! It holds no secret and no byte from the host: the last error is the
//! agent's own description (an error code name, a transport failure).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The status file's name in the run directory.
pub const STATUS_FILE: &str = "status.json";
/// Largest status file `vkx-guest status` reads.
pub const MAX_STATUS_FILE: u64 = 16 * 1024;
/// Longest error description kept.
pub const MAX_ERROR_TEXT: usize = 256;

/// What the daemon is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Starting,
    Connecting,
    /// Attested; the session is held.
    Established,
    /// Waiting for the next attempt after a failure or a `retry-after`.
    BackingOff,
    /// Budget spent or permanent failure: only re-probes (§13.4).
    Dormant,
    Stopped,
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub state: State,
    pub pid: u32,
    pub updated_unix: u64,
    pub last_success_unix: Option<u64>,
    pub next_attempt_unix: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub attempts: u64,
    pub sessions_established: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps the status and writes it on every change.
#[derive(Debug)]
pub struct StatusFile {
    path: PathBuf,
    status: Status,
}

impl StatusFile {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join(STATUS_FILE),
            status: Status {
                state: State::Starting,
                pid: std::process::id(),
                updated_unix: unix_now(),
                last_success_unix: None,
                next_attempt_unix: None,
                last_error: None,
                consecutive_failures: 0,
                attempts: 0,
                sessions_established: 0,
            },
        }
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Applies `change` and writes the file. A write failure is reported
    /// to the caller (who logs it, rate-limited) and never stops the agent.
    pub fn update(&mut self, change: impl FnOnce(&mut Status)) -> std::io::Result<()> {
        change(&mut self.status);
        self.status.updated_unix = unix_now();
        if let Some(e) = &mut self.status.last_error {
            truncate(e, MAX_ERROR_TEXT);
        }
        write_atomic(&self.path, &self.status)
    }

    /// `next` as wall-clock seconds, for the file.
    pub fn at(next: Instant) -> u64 {
        let ahead = next.saturating_duration_since(Instant::now());
        unix_now().saturating_add(ahead.as_secs())
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

fn write_atomic(path: &Path, status: &Status) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{STATUS_FILE}.{}", std::process::id()));
    let mut json = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a status file (for `vkx-guest status`).
pub fn read(run_dir: &Path) -> anyhow::Result<Status> {
    use std::io::Read as _;
    let path = run_dir.join(STATUS_FILE);
    let f = std::fs::File::open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (is `vkx-guest run` running?)", path.display()))?;
    let mut text = String::new();
    f.take(MAX_STATUS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX_STATUS_FILE,
        "{} is larger than {MAX_STATUS_FILE} bytes",
        path.display()
    );
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A human summary of `s`, relative to `now_unix`.
pub fn render(s: &Status, now_unix: u64) -> String {
    let ago = |t: u64| human(Duration::from_secs(now_unix.saturating_sub(t)));
    let mut out = format!(
        "state:               {}\n",
        serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    );
    out += &format!("pid:                 {}\n", s.pid);
    out += &match s.last_success_unix {
        Some(t) => format!("last success:        {} ago\n", ago(t)),
        None => "last success:        never\n".into(),
    };
    if let Some(t) = s.next_attempt_unix {
        let wait = human(Duration::from_secs(t.saturating_sub(now_unix)));
        out += &format!("next attempt:        in {wait}\n");
    }
    out += &format!(
        "last error:          {}\n",
        s.last_error.as_deref().unwrap_or("none")
    );
    out += &format!("failures in a row:   {}\n", s.consecutive_failures);
    out += &format!(
        "attempts:            {} ({} attested)\n",
        s.attempts, s.sessions_established
    );
    out += &format!("updated:             {} ago\n", ago(s.updated_unix));
    out
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_and_render() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = StatusFile::new(dir.path());
        f.update(|s| {
            s.state = State::BackingOff;
            s.last_error = Some("x".repeat(1000));
            s.consecutive_failures = 3;
        })
        .unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(&back, f.status());
        assert_eq!(back.last_error.as_ref().unwrap().len(), MAX_ERROR_TEXT);
        let text = render(&back, back.updated_unix + 5);
        assert!(text.contains("backing-off"), "{text}");
        assert!(text.contains("never"), "{text}");
    }

    #[test]
    fn missing_or_oversize_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).is_err());
        std::fs::write(dir.path().join(STATUS_FILE), vec![b' '; 20_000]).unwrap();
        assert!(read(dir.path()).is_err());
    }
}
