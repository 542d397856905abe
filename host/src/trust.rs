//! What the host trusts now, and what a live session proved against it:
//! the policy and the AF_VSOCK CID map published together as one
//! [`Trust`] (`reload` replaces it whole on SIGHUP), each Established
//! session's [`Proof`], and the one question a reload asks of every
//! session ([`allows`]). Pure: no I/O but [`Trust::load`] at start.
//!
//! What it trusts: a [`Trust`] is checked whole at load (policy.toml by
//! `policy`, the CID map by `vsock`). What it bounds: a [`Proof`] holds
//! what the policy's limits allow (PCR banks, grants); [`Ended`] names at
//! most [`MAX_NAMED`] sessions.

use std::collections::BTreeSet;

use vkx_common::wire::{KeyName, PcrBankValues, Purpose, VmId};

use crate::config::ServeConfig;
use crate::policy::{Policy, PolicyError, Refusal};
use crate::vsock::{CidMap, VsockConfigError};

/// Sessions a reload's log line names (the count covers all of them).
pub const MAX_NAMED: usize = 8;

/// What a reload replaces, published as one value: a session is judged
/// by a policy and a CID map of the same reload, never a mix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub policy: Policy,
    /// Empty without an AF_VSOCK listener.
    pub cid_map: CidMap,
}

impl Trust {
    /// The policy and CID map `config` names, as `serve` starts.
    pub fn load(config: &ServeConfig) -> Result<Self, TrustError> {
        Ok(Self {
            policy: Policy::load(&config.policy)?,
            cid_map: match &config.vsock {
                Some(v) => v.cid_map()?,
                None => CidMap::default(),
            },
        })
    }
}

/// What one Established session proved and was given: what a reload
/// checks it against. Bounded by the policy's limits (PCR banks, grants).
#[derive(Debug, Clone, Default)]
pub struct Proof {
    /// The AF_VSOCK peer's CID; `None` on a socket that is the VM.
    pub cid: Option<u32>,
    /// The PCR values of the accepted evidence.
    pub pcrs: Vec<PcrBankValues>,
    /// The keys and purposes the policy granted when the session was
    /// registered.
    pub keys: BTreeSet<KeyName>,
    pub derive: BTreeSet<Purpose>,
}

/// Why a [`Trust`] no longer allows a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoLonger {
    #[error("CID {cid} now maps to {}", .now.as_ref().map_or("no VM", |v| v.as_str()))]
    CidRemapped { cid: u32, now: Option<VmId> },
    #[error("{0}")]
    Policy(#[from] Refusal),
    #[error("a key or derivation purpose it was granted is no longer granted")]
    GrantWithdrawn,
}

/// Does `trust` still allow the session of `vm` that proved `proof`?
pub fn allows(trust: &Trust, vm: &VmId, proof: &Proof) -> Result<(), NoLonger> {
    if let Some(cid) = proof.cid {
        let now = trust.cid_map.get(cid);
        if now != Some(vm) {
            return Err(NoLonger::CidRemapped {
                cid,
                now: now.cloned(),
            });
        }
    }
    let grants = trust.policy.evaluate(vm, &proof.pcrs)?;
    if !proof.keys.is_subset(&grants.keys) || !proof.derive.is_subset(&grants.derive) {
        return Err(NoLonger::GrantWithdrawn);
    }
    Ok(())
}

/// Why the policy or the CID map `serve` starts with could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    CidMap(#[from] VsockConfigError),
}

/// What `service::VmSessions::reattest_disallowed` did.
#[derive(Debug, Default)]
pub(crate) struct Ended {
    pub(crate) count: usize,
    /// The first [`MAX_NAMED`] sessions, and why.
    pub(crate) named: Vec<(VmId, NoLonger)>,
}

impl Ended {
    pub(crate) fn note(&mut self, vm: &VmId, why: NoLonger) {
        self.count += 1;
        if self.named.len() < MAX_NAMED {
            self.named.push((vm.clone(), why));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use vkx_common::wire::HashAlg;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn policy(allowed: &[&str], keys: &str) -> Policy {
        let allowed = allowed
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        Policy::from_toml(&format!(
            "[[image]]\nname = \"img\"\nkeys = [{keys}]\n\
             [[image.pcr]]\nbank = \"sha256\"\nindex = 7\nallowed = [{allowed}]\n\
             [[vm]]\nid = \"vm-1\"\nimage = \"img\"\n"
        ))
        .unwrap()
    }

    fn proof(cid: Option<u32>, pcr7: &str, keys: &[&str]) -> Proof {
        Proof {
            cid,
            pcrs: vec![PcrBankValues {
                hash_alg: HashAlg::Sha256,
                values: BTreeMap::from([(7, hex::decode(pcr7).unwrap())]),
            }],
            keys: keys.iter().map(|k| KeyName::new(*k).unwrap()).collect(),
            derive: BTreeSet::new(),
        }
    }

    fn cid_map(pairs: &[(u32, &str)]) -> CidMap {
        crate::vsock::VsockListenerConfig {
            vm: pairs
                .iter()
                .map(|(cid, vm)| crate::vsock::VsockVm {
                    cid: *cid,
                    vm_id: (*vm).to_owned(),
                })
                .collect(),
            ..Default::default()
        }
        .cid_map()
        .unwrap()
    }

    #[test]
    fn a_session_is_kept_only_while_the_trust_allows_what_it_proved() {
        let vm = VmId::new("vm-1").unwrap();
        let p = proof(None, A, &["disk"]);
        let both = Trust {
            policy: policy(&[A, B], "\"disk\""),
            cid_map: CidMap::default(),
        };
        assert_eq!(allows(&both, &vm, &p), Ok(()));
        // Its PCR 7 value revoked.
        let revoked = Trust {
            policy: policy(&[B], "\"disk\""),
            ..both.clone()
        };
        assert!(matches!(
            allows(&revoked, &vm, &p),
            Err(NoLonger::Policy(Refusal::PcrMismatch { index: 7, .. }))
        ));
        // A key it was granted withdrawn; a grant added is no reason.
        let narrowed = Trust {
            policy: policy(&[A], ""),
            ..both.clone()
        };
        assert_eq!(allows(&narrowed, &vm, &p), Err(NoLonger::GrantWithdrawn));
        let widened = Trust {
            policy: policy(&[A], "\"disk\", \"more\""),
            ..both.clone()
        };
        assert_eq!(allows(&widened, &vm, &p), Ok(()));
        // Its VM left the policy.
        assert!(matches!(
            allows(&Trust::default(), &vm, &p),
            Err(NoLonger::Policy(Refusal::UnknownVm(_)))
        ));
        // A CID that now maps to another VM, or to none.
        let p = proof(Some(17), A, &["disk"]);
        let mapped = Trust {
            cid_map: cid_map(&[(17, "vm-1")]),
            ..both.clone()
        };
        assert_eq!(allows(&mapped, &vm, &p), Ok(()));
        let moved = Trust {
            cid_map: cid_map(&[(17, "vm-2"), (18, "vm-1")]),
            ..both.clone()
        };
        assert_eq!(
            allows(&moved, &vm, &p),
            Err(NoLonger::CidRemapped {
                cid: 17,
                now: Some(VmId::new("vm-2").unwrap())
            })
        );
        let gone = Trust {
            cid_map: cid_map(&[(18, "vm-1")]),
            ..both
        };
        assert_eq!(
            allows(&gone, &vm, &p),
            Err(NoLonger::CidRemapped { cid: 17, now: None })
        );
    }
}
