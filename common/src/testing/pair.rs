//! A deterministic in-memory pair: a guest and a host session wired
//! together with virtual time, the way the async drivers wire them to a
//! TLS stream. Local work (quote, verification, key lookup) is done by the
//! harness with fake evidence that carries the transcript hash it was
//! made for; faults are injected by the caller, who can reach every queue
//! and both sessions.
//!
//! Trusts nothing it delivers: payloads go through the sessions' own
//! decoders. Bounded: [`Pair::run`] stops after [`MAX_STEPS`] steps.

#![allow(clippy::expect_used)] // Test support: a panic is the failure report.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::errors::ErrorCode;
use crate::session::guest::{self, Guest, GuestConfig, GuestEvent};
use crate::session::host::{Host, HostConfig, HostEvent, PeerContext, SessionRandom, Verdict};
use crate::session::{CloseReason, Output};
use crate::wire::{
    AgentName, AgentVersion, Evidence, FeatureState, Features, HashAlg, KeyMaterial, KeyRefusal,
    KeyRelease, PcrBankSelection, PcrBankValues, ReleasedKey, VersionRange, VmId, feature,
};

/// Upper bound on [`Pair::run`] steps: every step delivers a payload or
/// does one piece of local work.
pub const MAX_STEPS: usize = 1000;
/// The TLS exporter value both sides are given.
pub const EXPORTER: [u8; 32] = [7; 32];
/// The key name the harness's key lookup refuses (every other is released).
pub const REFUSED_KEY: &str = "secret";

/// A guest and a host session and what travels between them.
#[derive(Debug)]
pub struct Pair {
    pub now: Instant,
    pub guest: Guest,
    pub host: Host,
    /// Payloads the guest sent that the host has not read yet, in order.
    pub to_host: VecDeque<Vec<u8>>,
    /// Payloads the host sent that the guest has not read yet, in order.
    pub to_guest: VecDeque<Vec<u8>>,
    pub guest_events: Vec<GuestEvent>,
    pub host_events: Vec<HostEvent>,
    /// How each side closed, first reason only.
    pub guest_closed: Option<CloseReason>,
    pub host_closed: Option<CloseReason>,
    /// What the harness answers for verification of evidence bound to the
    /// host's transcript (evidence bound to another is always rejected).
    pub verdict: Verdict,
    /// The qualifying data of the guest's last quote request.
    pub quote_th: Option<[u8; 32]>,
    /// The transcript hash of the host's last verification request.
    pub verify_th: Option<[u8; 32]>,
}

/// A feature map with key release in state `release`, the rest enabled.
pub fn features(release: FeatureState) -> Features {
    [
        (feature::KEY_RELEASE, release),
        (feature::KEY_DERIVATION, FeatureState::Enabled),
        (feature::KEY_ROTATION, FeatureState::Enabled),
    ]
    .into()
}

/// The PCR selection the host asks for: sha256 PCRs 0 and 7.
pub fn selection() -> Vec<PcrBankSelection> {
    vec![PcrBankSelection {
        hash_alg: HashAlg::Sha256,
        pcrs: vec![0, 7],
    }]
}

/// A guest speaking versions `min..=max`.
pub fn guest_config(min: u16, max: u16) -> Arc<GuestConfig> {
    Arc::new(GuestConfig {
        versions: VersionRange { min, max },
        agent_name: AgentName::new("vkx-guest").expect("valid name"),
        agent_version: AgentVersion::new("0.1.0").expect("valid version"),
    })
}

/// A host speaking version 1, re-attesting after an hour.
pub fn host_config() -> Arc<HostConfig> {
    Arc::new(HostConfig {
        versions: VersionRange { min: 1, max: 1 },
        reattest_after_s: 3600,
        feature_retry_after: Duration::from_secs(300),
    })
}

/// A host session as the harness starts it: [`host_config`], the
/// harness's selection and exporter, fixed randoms, accepted at `now`.
pub fn start_host(vm_id: Option<&str>, cid: Option<u32>, features: Features, now: Instant) -> Host {
    Host::start(
        host_config(),
        PeerContext {
            vm_id: vm_id.map(|v| VmId::new(v).expect("valid vm id")),
            cid,
            selection: selection(),
            features,
            accepted_at: now,
        },
        EXPORTER,
        SessionRandom {
            host_nonce: [1; 32],
            session_id: [2; 16],
        },
        now,
    )
}

/// The fake evidence for a quote over `qualifying_data`: the verifier of
/// this harness reads the binding from `tpm_attest`.
pub fn evidence_for(qualifying_data: [u8; 32]) -> Evidence {
    Evidence {
        tpm_attest: qualifying_data.to_vec(),
        tpm_signature: vec![0x18],
        ak_name: [vec![0, 0x0b], vec![0x44; 32]].concat(),
        ak_cert: None,
        pcr_values: vec![PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: [(0u8, vec![0; 32]), (7u8, vec![1; 32])].into(),
        }],
    }
}

impl Pair {
    /// A pair whose guest speaks `guest_versions`, mapped to `vm_id` (or
    /// not mapped), with key release in state `release`.
    pub fn new(guest_versions: (u16, u16), vm_id: Option<&str>, release: FeatureState) -> Self {
        Self::with_nonce(guest_versions, vm_id, features(release), [3; 32])
    }

    /// A pair with a chosen feature map and guest nonce (which seeds the
    /// guest's jitter). The guest's `hello` is queued for the host.
    pub fn with_nonce(
        guest_versions: (u16, u16),
        vm_id: Option<&str>,
        features: Features,
        guest_nonce: [u8; 32],
    ) -> Self {
        let now = Instant::now();
        let host = start_host(vm_id, Some(42), features, now);
        let (guest, out) = Guest::start(
            guest_config(guest_versions.0, guest_versions.1),
            EXPORTER,
            guest_nonce,
            now,
        );
        let mut p = Pair {
            now,
            guest,
            host,
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
            guest_events: Vec::new(),
            host_events: Vec::new(),
            guest_closed: None,
            host_closed: None,
            verdict: Verdict::Accepted,
            quote_th: None,
            verify_th: None,
        };
        p.take_guest(out);
        p
    }

    /// Queues what the guest asked for.
    pub fn take_guest(&mut self, out: Output<GuestEvent>) {
        self.to_host.extend(out.send.iter().map(|b| b.to_vec()));
        self.guest_events.extend(out.events);
        if let Some(c) = out.close {
            self.guest_closed.get_or_insert(c);
        }
    }

    /// Queues what the host asked for.
    pub fn take_host(&mut self, out: Output<HostEvent>) {
        self.to_guest.extend(out.send.iter().map(|b| b.to_vec()));
        self.host_events.extend(out.events);
        if let Some(c) = out.close {
            self.host_closed.get_or_insert(c);
        }
    }

    /// Hands `payload` to the host session now; returns what it asked for
    /// (already queued).
    pub fn host_reads(&mut self, payload: &[u8]) -> Step {
        let host = std::mem::replace(&mut self.host, Host::Closed);
        let (h, out) = host.on_payload(payload, self.now);
        self.host = h;
        let step = Step::of(&out);
        self.take_host(out);
        step
    }

    /// Hands `payload` to the guest session now; returns what it asked for
    /// (already queued).
    pub fn guest_reads(&mut self, payload: &[u8]) -> Step {
        let guest = std::mem::replace(&mut self.guest, Guest::Closed);
        let (g, out) = guest.on_payload(payload, self.now);
        self.guest = g;
        let step = Step::of(&out);
        self.take_guest(out);
        step
    }

    /// Delivers messages and does local work until both sides are quiet.
    pub fn run(&mut self) {
        for _ in 0..MAX_STEPS {
            if let Some(p) = self.to_host.pop_front() {
                self.host_reads(&p);
            } else if let Some(p) = self.to_guest.pop_front() {
                self.guest_reads(&p);
            } else if !self.do_local_work() {
                return;
            }
        }
        panic!("pair did not settle in {MAX_STEPS} steps");
    }

    /// Answers one pending local request (quote, verification, key
    /// lookup); false if none.
    pub fn do_local_work(&mut self) -> bool {
        self.quote().is_some() || self.verify().is_some() || self.look_up_keys().is_some()
    }

    /// Answers the guest's first pending quote request with evidence bound
    /// to its qualifying data; None if none is pending.
    pub fn quote(&mut self) -> Option<Step> {
        let i = self
            .guest_events
            .iter()
            .position(|e| matches!(e, GuestEvent::QuoteNeeded { .. }))?;
        let GuestEvent::QuoteNeeded {
            qualifying_data, ..
        } = self.guest_events.remove(i)
        else {
            unreachable!("matched above")
        };
        self.quote_th = Some(qualifying_data);
        let guest = std::mem::replace(&mut self.guest, Guest::Closed);
        let (g, out) = guest.on_quote(Some(evidence_for(qualifying_data)), self.now);
        self.guest = g;
        let step = Step::of(&out);
        self.take_guest(out);
        Some(step)
    }

    /// Answers the host's first pending verification request: `verdict`
    /// if the evidence is bound to the host's transcript, else rejected.
    /// Returns the verdict given; None if nothing was pending.
    pub fn verify(&mut self) -> Option<Verdict> {
        let i = self
            .host_events
            .iter()
            .position(|e| matches!(e, HostEvent::Verify { .. }))?;
        let HostEvent::Verify {
            transcript_hash,
            evidence,
            ..
        } = self.host_events.remove(i)
        else {
            unreachable!("matched above")
        };
        self.verify_th = Some(transcript_hash);
        // The real verifier checks the quote's qualifying data; the fake
        // evidence carries it in tpm_attest.
        let verdict = if evidence.tpm_attest == transcript_hash {
            self.verdict
        } else {
            Verdict::Rejected
        };
        let host = std::mem::replace(&mut self.host, Host::Closed);
        let (h, out) = host.on_verdict(verdict, self.now);
        self.host = h;
        self.take_host(out);
        Some(verdict)
    }

    /// Answers the host's first pending key request: every key but
    /// [`REFUSED_KEY`] is released. None if nothing was pending.
    pub fn look_up_keys(&mut self) -> Option<()> {
        let i = self
            .host_events
            .iter()
            .position(|e| matches!(e, HostEvent::KeyRequest { .. }))?;
        let HostEvent::KeyRequest { names, .. } = self.host_events.remove(i) else {
            unreachable!("matched above")
        };
        let release = KeyRelease {
            released: names
                .iter()
                .filter(|n| n.as_str() != REFUSED_KEY)
                .map(|n| ReleasedKey {
                    name: n.clone(),
                    version: 1,
                    material: KeyMaterial::new(vec![9; 32]),
                })
                .collect(),
            refused: names
                .iter()
                .filter(|n| n.as_str() == REFUSED_KEY)
                .map(|n| KeyRefusal {
                    name: n.clone(),
                    code: ErrorCode::NotPermitted,
                })
                .collect(),
        };
        let Host::Established(s) = &mut self.host else {
            panic!("key request outside Established")
        };
        let out = s.answer_keys(release);
        self.take_host(out);
        Some(())
    }

    /// Fires both sessions' timers at `now` (without moving time).
    pub fn fire_timers(&mut self) {
        let guest = std::mem::replace(&mut self.guest, Guest::Closed);
        let (g, out) = guest.on_timeout(self.now);
        self.guest = g;
        self.take_guest(out);
        let host = std::mem::replace(&mut self.host, Host::Closed);
        let (h, out) = host.on_timeout(self.now);
        self.host = h;
        self.take_host(out);
    }

    /// Moves virtual time by `d`, fires both timers, and lets both sides
    /// act until quiet.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.fire_timers();
        self.run();
    }

    /// Moves virtual time to `t` (never back) and lets both sides act.
    pub fn advance_to(&mut self, t: Instant) {
        let d = t.saturating_duration_since(self.now);
        self.advance(d);
    }

    /// Both sessions are established.
    pub fn established(&self) -> bool {
        self.guest.is_established() && matches!(self.host, Host::Established(_))
    }

    /// The host changes the VM's feature map; the guest receives it now.
    pub fn host_updates(&mut self, features: Features) {
        let Host::Established(h) = &mut self.host else {
            panic!("host not established")
        };
        let out = h.update_features(features);
        self.take_host(out);
        self.run();
    }

    /// The established guest session.
    pub fn guest_established(&mut self) -> &mut guest::Established {
        let Guest::Established(s) = &mut self.guest else {
            panic!("guest not established")
        };
        s
    }

    /// The features announced usable so far, in order.
    pub fn usable_events(&self) -> Vec<u16> {
        self.guest_events
            .iter()
            .filter_map(|e| match e {
                GuestEvent::FeatureUsable { feature } => Some(*feature),
                _ => None,
            })
            .collect()
    }
}

/// What one input to a session produced, for invariant checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Payloads it sent.
    pub sends: usize,
    /// Whether it asked to close.
    pub closed: bool,
}

impl Step {
    fn of<E>(out: &Output<E>) -> Self {
        Self {
            sends: out.send.len(),
            closed: out.close.is_some(),
        }
    }
}
