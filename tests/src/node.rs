//! A host node for tests: a vTPM CA and a registry in a temporary
//! directory, driven through the real `vkx-host` binary.

use std::path::Path;
use std::process::Output;

use crate::run;
use crate::swtpm::Swtpm;

/// A node: CA and registry directories.
#[derive(Debug)]
pub struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    #[allow(clippy::new_without_default)] // Runs `vkx-host vtpm ca-init`: not a default.
    pub fn new() -> Self {
        let node = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let o = run("vkx-host", &["vtpm", "ca-init", "--dir", &node.ca()], b"");
        assert!(
            o.status.success(),
            "ca-init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        node
    }

    pub fn ca(&self) -> String {
        self.dir.path().join("ca").display().to_string()
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

    pub fn entry(&self, vm_id: &str) -> serde_json::Value {
        let path = Path::new(&self.registry()).join(format!("{vm_id}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }
}
