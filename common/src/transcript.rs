//! The handshake transcript and key-confirmation tags (PROTOCOL.md §7, §9).
//!
//! The transcript hash binds the TPM quote to this TLS connection (through
//! the exporter), both nonces, the host-observed VM identity, the PCR
//! selection, the feature state, the guest's offered version range and the
//! host's selection: it is the quote's qualifying data. Inputs are the exact
//! frame payloads as sent and received, never a re-encoding.

use ring::{digest, hmac};

use crate::wire::{CONFIRM_TAG_LEN, NONCE_LEN};

/// Domain-separation prefix of the transcript hash.
pub const TRANSCRIPT_LABEL: &[u8] = b"vkx-v1-transcript";
/// TLS exporter label for the transcript's channel binding (RFC 8446 §7.5).
pub const TRANSCRIPT_EXPORTER_LABEL: &[u8] = b"EXPORTER-vkx-v1-transcript";
/// Bytes taken from the exporter for the transcript.
pub const TRANSCRIPT_EXPORTER_LEN: usize = 32;
/// Bytes of the transcript hash (SHA-256); also the quote's qualifying data.
pub const TRANSCRIPT_HASH_LEN: usize = 32;
/// TLS exporter label for derived shared keys (§9); the context is the
/// purpose.
pub const DERIVE_EXPORTER_LABEL: &[u8] = b"EXPORTER-vkx-v1-derive";

const _: () = assert!(
    TRANSCRIPT_HASH_LEN <= 64,
    "TPM qualifying data is at most 64 bytes"
);
const _: () = assert!(NONCE_LEN == TRANSCRIPT_HASH_LEN);

/// TH = SHA-256(label || 0x00 || exporter || u32be(|hello|) || hello ||
/// u32be(|challenge|) || challenge).
pub fn transcript_hash(
    exporter: &[u8; TRANSCRIPT_EXPORTER_LEN],
    hello: &[u8],
    challenge: &[u8],
) -> [u8; TRANSCRIPT_HASH_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(TRANSCRIPT_LABEL);
    ctx.update(&[0]);
    ctx.update(exporter);
    for part in [hello, challenge] {
        // Frame payloads are at most 64 KiB, so the length fits.
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ctx.update(&len.to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; TRANSCRIPT_HASH_LEN];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Which side computes a confirmation tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmRole {
    Guest,
    Host,
}

impl ConfirmRole {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Guest => b"vkx-v1 confirm guest",
            Self::Host => b"vkx-v1 confirm host",
        }
    }
}

/// HMAC-SHA-256(key, label || 0x00 || purpose), truncated to 16 bytes.
pub fn confirm_tag(key: &[u8], role: ConfirmRole, purpose: &str) -> [u8; CONFIRM_TAG_LEN] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&k);
    ctx.update(role.label());
    ctx.update(&[0]);
    ctx.update(purpose.as_bytes());
    let mut out = [0u8; CONFIRM_TAG_LEN];
    out.copy_from_slice(&ctx.sign().as_ref()[..CONFIRM_TAG_LEN]);
    out
}

/// Checks a peer's tag in constant time.
pub fn verify_confirm_tag(
    key: &[u8],
    role: ConfirmRole,
    purpose: &str,
    tag: &[u8; CONFIRM_TAG_LEN],
) -> bool {
    let want = confirm_tag(key, role, purpose);
    tags_equal(&want, tag)
}

/// Equality of two confirmation tags in constant time (`subtle`): a tag
/// is derived from a secret key, so how long a comparison takes must not
/// say how many leading bytes matched.
pub fn tags_equal(a: &[u8; CONFIRM_TAG_LEN], b: &[u8; CONFIRM_TAG_LEN]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_separates_its_parts() {
        let x = [1u8; 32];
        // Moving a byte from hello to challenge must change the hash.
        assert_ne!(
            transcript_hash(&x, b"ab", b"c"),
            transcript_hash(&x, b"a", b"bc")
        );
        assert_ne!(
            transcript_hash(&x, b"a", b"b"),
            transcript_hash(&[2u8; 32], b"a", b"b")
        );
    }

    #[test]
    fn confirm_tags_differ_by_role_and_verify() {
        let k = [9u8; 32];
        let g = confirm_tag(&k, ConfirmRole::Guest, "disk");
        assert_ne!(g, confirm_tag(&k, ConfirmRole::Host, "disk"));
        assert!(verify_confirm_tag(&k, ConfirmRole::Guest, "disk", &g));
        assert!(!verify_confirm_tag(&k, ConfirmRole::Host, "disk", &g));
    }

    #[test]
    fn a_tag_wrong_in_any_bit_is_refused() {
        let k = [9u8; 32];
        let g = confirm_tag(&k, ConfirmRole::Guest, "disk");
        for byte in 0..CONFIRM_TAG_LEN {
            for bit in 0..8 {
                let mut t = g;
                t[byte] ^= 1 << bit;
                assert!(!verify_confirm_tag(&k, ConfirmRole::Guest, "disk", &t));
                assert!(!tags_equal(&g, &t));
            }
        }
        assert!(!verify_confirm_tag(
            &[8u8; 32],
            ConfirmRole::Guest,
            "disk",
            &g
        ));
        assert!(!verify_confirm_tag(&k, ConfirmRole::Guest, "disc", &g));
        assert!(tags_equal(&g, &g));
    }
}
