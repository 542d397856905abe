//! A host node for tests: a node identity (`vkx-host init`: TLS key and
//! vTPM CA) and a registry in a temporary directory, driven through the
//! real `vkx-host` binary.

use std::path::Path;
use std::process::Output;

use crate::run;
use crate::swtpm::Swtpm;

/// The prefix of the pin line `vkx-host init` prints.
pub const PIN_LINE: &str = "host key pin (SPKI SHA-256, for guest configs): ";

/// A node: identity, CA and registry directories.
#[derive(Debug)]
pub struct Node {
    dir: tempfile::TempDir,
    pin: String,
}

impl Node {
    #[allow(clippy::new_without_default)] // Runs `vkx-host init`: not a default.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node_dir = dir.path().join("node").display().to_string();
        let o = run("vkx-host", &["init", "--dir", &node_dir], b"");
        assert!(
            o.status.success(),
            "init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let pin = String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(PIN_LINE))
            .expect("init prints the pin")
            .to_owned();
        Self { dir, pin }
    }

    /// The directory `vkx-host init` made (host.toml's `node_dir`).
    pub fn node_dir(&self) -> String {
        self.dir.path().join("node").display().to_string()
    }

    /// The host key pin guests configure.
    pub fn pin(&self) -> &str {
        &self.pin
    }

    pub fn ca(&self) -> String {
        self.dir
            .path()
            .join("node")
            .join("ca")
            .display()
            .to_string()
    }

    pub fn registry(&self) -> String {
        self.dir.path().join("registry").display().to_string()
    }

    pub fn provision(&self, tpm: &Swtpm, vm_id: &str, ek: &str) -> Output {
        run(
            "vkx-host",
            &[
                "vtpm",
                "provision",
                "--tcti",
                &tpm.tcti(),
                "--vm-id",
                vm_id,
                "--registry",
                &self.registry(),
                "--ca-dir",
                &self.ca(),
                "--ek",
                ek,
            ],
            b"",
        )
    }

    /// The AK authValue file `vkx-host vtpm provision` wrote for `vm_id`
    /// (the guest's `ak_auth_file`).
    pub fn ak_auth_file(&self, vm_id: &str) -> String {
        Path::new(&self.registry())
            .join("vtpm-auth")
            .join(format!("{vm_id}.ak-auth"))
            .display()
            .to_string()
    }

    pub fn entry(&self, vm_id: &str) -> serde_json::Value {
        let path = Path::new(&self.registry()).join(format!("{vm_id}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }
}
