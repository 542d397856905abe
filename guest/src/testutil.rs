//! Test support: a guest session driven to Established by hand-made host
//! messages (the host's checks are not the point of the guest's handler
//! tests), the host messages those tests send, and a capture of the log
//! lines written meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vkx_common::errors::ErrorCode;
use vkx_common::session::guest::{Guest, GuestConfig, GuestEvent};
use vkx_common::wire::{
    AgentName, AgentVersion, AttestationResult, Challenge, ErrorMessage, Evidence, FeatureState,
    FeatureUpdate, Features, HashAlg, MIN_AK_NAME, Message, PcrBankSelection, PcrBankValues,
    VersionRange, VmId, feature,
};

/// A feature map with key release and key derivation in these states.
pub(crate) fn features(release: FeatureState, derivation: FeatureState) -> Features {
    [
        (feature::KEY_RELEASE, release),
        (feature::KEY_DERIVATION, derivation),
    ]
    .into()
}

/// A session attested with `features`, and its `Attested` event. The guest
/// nonce (which seeds the session's jitter) is `[nonce; 32]`.
pub(crate) fn established(features: Features, nonce: u8, now: Instant) -> (Guest, GuestEvent) {
    let config = Arc::new(GuestConfig {
        versions: VersionRange { min: 1, max: 1 },
        agent_name: AgentName::new("vkx-guest").unwrap(),
        agent_version: AgentVersion::new("0.1.0").unwrap(),
    });
    let (g, out) = Guest::start(config, [7; 32], [nonce; 32], now);
    assert!(out.close.is_none());
    let challenge = Message::Challenge(Challenge {
        version: 1,
        host_nonce: [1; 32],
        vm_id: VmId::new("vm-17").unwrap(),
        cid: None,
        pcr_selection: vec![PcrBankSelection {
            hash_alg: HashAlg::Sha256,
            pcrs: vec![0],
        }],
        features,
    })
    .encode()
    .unwrap();
    let (g, out) = g.on_payload(&challenge, now);
    assert!(out.close.is_none());
    let evidence = Evidence {
        tpm_attest: vec![1],
        tpm_signature: vec![2],
        ak_name: vec![0; MIN_AK_NAME],
        ak_cert: None,
        pcr_values: vec![PcrBankValues {
            hash_alg: HashAlg::Sha256,
            values: [(0, vec![0; 32])].into(),
        }],
    };
    let (g, out) = g.on_quote(Some(evidence), now);
    assert!(out.close.is_none(), "{out:?}");
    let result = Message::AttestationResult(AttestationResult {
        session_id: [2; 16],
        reattest_after_s: 3600,
    })
    .encode()
    .unwrap();
    let (g, mut out) = g.on_payload(&result, now);
    assert!(g.is_established());
    assert_eq!(out.events.len(), 1);
    let ev = out.events.remove(0);
    assert!(matches!(ev, GuestEvent::Attested { .. }));
    (g, ev)
}

/// The host's `feature-update` with `features`.
pub(crate) fn feature_update(features: Features) -> Vec<u8> {
    Message::FeatureUpdate(FeatureUpdate { features })
        .encode()
        .unwrap()
        .to_vec()
}

/// The host's request-scoped refusal `code` with a retry-after.
pub(crate) fn refusal(code: ErrorCode, retry_after_ms: u32) -> Vec<u8> {
    Message::Error(ErrorMessage {
        retry_after_ms: Some(retry_after_ms),
        ..ErrorMessage::new(code)
    })
    .encode()
    .unwrap()
    .to_vec()
}

/// The log lines `f` writes on this thread (every level down to debug).
pub(crate) fn logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let r = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (r, text)
}
