//! What the guest does with an attested session's keys: asks for the keys
//! its configuration names, installs each released key in the key
//! directory ([`crate::keys::KeyDir`]), and installs and acknowledges every
//! rotation the host pushes. Shared by `once` (which ends the session when
//! the keys are in) and the daemon (which holds it for rotations).
//!
//! Logs name keys and versions, never material; a refusal is logged with
//! its code only (the reason stays on the host).

use std::time::Instant;

use vkx_common::session::Output;
use vkx_common::session::guest::{Guest, GuestEvent};
use vkx_common::wire::KeyName;
use vkx_common::{rl_info, rl_warn};

use crate::keys::KeyDir;

/// The delivery state of one session.
#[derive(Debug)]
pub struct Deliver<'a> {
    names: &'a [KeyName],
    dir: Option<&'a KeyDir>,
    /// Keys installed in this session: name, version.
    pub installed: Vec<(KeyName, u32)>,
    /// Keys the host refused or that could not be installed.
    pub failed: Vec<(KeyName, String)>,
    /// The initial request is answered (or there was nothing to ask).
    pub done: bool,
}

impl<'a> Deliver<'a> {
    pub fn new(names: &'a [KeyName], dir: Option<&'a KeyDir>) -> Self {
        Self {
            names,
            dir,
            installed: Vec::new(),
            failed: Vec::new(),
            done: false,
        }
    }

    /// Handles the key-related events; returns what to send.
    pub fn on_event(
        &mut self,
        ev: &GuestEvent,
        guest: &mut Guest,
        now: Instant,
    ) -> Output<GuestEvent> {
        let mut out = Output::default();
        match ev {
            GuestEvent::Attested { .. } => {
                if self.names.is_empty() {
                    self.done = true;
                } else if let Guest::Established(s) = guest {
                    match s.request_keys(self.names.to_vec(), now) {
                        Ok(o) => out = o,
                        Err(e) => {
                            rl_warn!(error = %e, "keys not requested");
                            self.done = true;
                        }
                    }
                }
            }
            GuestEvent::Keys(release) => {
                for key in &release.released {
                    self.install(key);
                }
                for r in &release.refused {
                    rl_warn!(key = %r.name, code = %r.code, "the host withheld a key");
                    self.failed
                        .push((r.name.clone(), format!("refused: {}", r.code)));
                }
                self.done = true;
            }
            GuestEvent::FeatureHeld { .. } => {
                rl_warn!("key release is held back by the host (rollout or kill switch)");
                self.done = true;
            }
            GuestEvent::KeyUpdate { update_id, key } => {
                let installed = self.install(key);
                if let Guest::Established(s) = guest {
                    out = s.ack_update(*update_id, key, installed, now);
                }
            }
            _ => {}
        }
        out
    }

    fn install(&mut self, key: &vkx_common::wire::ReleasedKey) -> bool {
        let Some(dir) = self.dir else {
            self.failed
                .push((key.name.clone(), "no key directory".into()));
            return false;
        };
        match dir.install(key) {
            Ok(path) => {
                rl_info!(
                    key = %key.name,
                    version = key.version,
                    path = %path.display(),
                    "key delivered"
                );
                self.installed.push((key.name.clone(), key.version));
                true
            }
            Err(e) => {
                rl_warn!(key = %key.name, error = %e, "key not installed");
                self.failed.push((key.name.clone(), e.to_string()));
                false
            }
        }
    }
}
