//! Classifies tss-esapi errors so callers can turn them into actionable
//! messages instead of bare TSS return codes.
//!
//! A TSS2 return code carries its layer in bits 16..24 (0 = the TPM itself,
//! 7 = ESAPI, 10 = TCTI, ...); tss-esapi's `kind()` looks only at the low
//! bits, so a TCTI I/O error would be misread as a TPM error. This module
//! checks the layer first.
//!
//! Only built with the `tss` feature (the host's provisioning and the
//! guest's evidence): the host's verification path never links libtss2.

use std::time::Duration;

use bitfield::BitRange;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind};

/// What went wrong, by who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TssFault {
    /// The TPM answered with this response code.
    Tpm(Tss2ResponseCodeKind),
    /// The TPM answered with a code tss-esapi does not name.
    TpmOther,
    /// The transport (TCTI) failed: the TPM is gone or unreachable.
    Transport,
    /// The TSS software stack (ESAPI, marshalling) refused.
    Stack,
    /// tss-esapi's own checks refused a parameter.
    Wrapper,
}

/// Layer numbers of TSS2_RC (TSS 2.0 Overview, "Response code format").
const LAYER_TPM: u32 = 0;
const LAYER_TCTI: u32 = 10;

pub fn raw_code(e: &tss_esapi::Error) -> Option<u32> {
    match e {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::Success) => Some(0),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => Some(rc.bit_range(31, 0)),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => Some(rc.bit_range(31, 0)),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

pub fn classify(e: &tss_esapi::Error) -> TssFault {
    let tss = match e {
        tss_esapi::Error::WrapperError(_) => return TssFault::Wrapper,
        tss_esapi::Error::Tss2Error(rc) => *rc,
    };
    let layer = raw_code(e).map_or(LAYER_TPM, |raw| (raw >> 16) & 0xff);
    match layer {
        LAYER_TPM => tss.kind().map_or(TssFault::TpmOther, TssFault::Tpm),
        LAYER_TCTI => TssFault::Transport,
        _ => TssFault::Stack,
    }
}

/// Transient conditions the TPM asks the caller to retry.
pub fn is_transient(e: &tss_esapi::Error) -> bool {
    matches!(
        classify(e),
        TssFault::Tpm(
            Tss2ResponseCodeKind::Retry
                | Tss2ResponseCodeKind::Yielded
                | Tss2ResponseCodeKind::Testing
        )
    )
}

/// Attempts of one TPM command when the TPM answers RETRY, YIELDED or
/// TESTING: the self-test or the busy spell is over within a few tries.
/// Each attempt is one ESAPI call, and tpm2-tss's ESAPI itself resubmits
/// a command answered with those codes (at most 5 submissions per call,
/// with no pause), so the TPM sees at most 5 x 5 = 25 submissions of one
/// command (measured by `tests/tests/chaos_ef.rs`, case e).
pub const MAX_TPM_ATTEMPTS: u32 = 5;
/// First pause before a retry; doubles each time (50+100+200+400 ms).
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Runs one TPM command, retrying transient refusals a bounded number of
/// times; every other error is returned at once.
pub fn retry_transient<T>(
    mut command: impl FnMut() -> tss_esapi::Result<T>,
) -> tss_esapi::Result<T> {
    let mut pause = FIRST_RETRY_PAUSE;
    let mut attempt = 1;
    loop {
        match command() {
            Err(e) if is_transient(&e) && attempt < MAX_TPM_ATTEMPTS => {
                std::thread::sleep(pause);
                pause *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Whether a persistent handle or NV index is in use, asked with
/// TPM2_GetCapability so that an absent handle is not an error (which
/// tpm2-tss would log).
pub fn handle_exists(ctx: &mut tss_esapi::Context, handle: u32) -> tss_esapi::Result<bool> {
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let (data, _) = retry_transient(|| ctx.get_capability(CapabilityType::Handles, handle, 1))?;
    Ok(match data {
        CapabilityData::Handles(list) => list
            .iter()
            .any(|h| tss_esapi::tss2_esys::TPM2_HANDLE::from(*h) == handle),
        _ => false,
    })
}

/// One line: the cause in words, then the raw code for searching.
pub fn describe(e: &tss_esapi::Error) -> String {
    let hint = match classify(e) {
        TssFault::Transport => {
            "the connection to the TPM failed (is the TPM device or swtpm still there?)"
        }
        TssFault::Tpm(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
            "authorization failed: vkx expects the vTPM's owner and endorsement hierarchies to have empty auth"
        }
        TssFault::Tpm(Tss2ResponseCodeKind::Lockout) => {
            "the TPM is in dictionary-attack lockout: wait, or reset it with the lockout auth"
        }
        TssFault::Tpm(Tss2ResponseCodeKind::NvSpace) => "the TPM's NV memory is full",
        TssFault::Tpm(Tss2ResponseCodeKind::ObjectMemory | Tss2ResponseCodeKind::ObjectHandles) => {
            "the TPM has no room for another object: flush transient objects"
        }
        TssFault::Tpm(Tss2ResponseCodeKind::Initialize) => {
            "the TPM was not started (TPM2_Startup): start swtpm with --flags startup-clear"
        }
        TssFault::Tpm(Tss2ResponseCodeKind::Hierarchy) => "the hierarchy is disabled",
        TssFault::Tpm(
            Tss2ResponseCodeKind::Retry
            | Tss2ResponseCodeKind::Yielded
            | Tss2ResponseCodeKind::Testing,
        ) => {
            "the TPM stayed busy through every retry: try again later; if it persists, check its self-test (`tpm2_gettestresult`)"
        }
        TssFault::Tpm(_) | TssFault::TpmOther => "the TPM refused the command",
        TssFault::Stack => "the TPM software stack refused the command",
        TssFault::Wrapper => "tss-esapi refused a parameter",
    };
    match raw_code(e) {
        Some(raw) => format!("{hint}: {e} [TSS2_RC {raw:#010x}]"),
        None => format!("{hint}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_told_apart() {
        // TPM_RC_RETRY (warning 0x922) from the TPM is transient ...
        let retry = tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x0000_0922));
        assert!(is_transient(&retry));
        assert_eq!(raw_code(&retry), Some(0x922));
        // ... the same low bits from the TCTI layer are a transport failure.
        let tcti = tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x000a_000a));
        assert_eq!(classify(&tcti), TssFault::Transport);
        assert!(!is_transient(&tcti));
        assert!(describe(&tcti).contains("0x000a000a"));
        // A transient code that outlasted the retries says what to do.
        assert!(describe(&retry).contains("try again later"));
    }

    #[test]
    fn retries_are_bounded() {
        let mut calls = 0;
        let r: tss_esapi::Result<()> = retry_transient(|| {
            calls += 1;
            Err(tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(
                0x0000_0922,
            )))
        });
        assert!(r.is_err());
        assert_eq!(calls, MAX_TPM_ATTEMPTS);
        // A permanent error is not retried; a transient one then success is.
        let mut calls = 0;
        let r = retry_transient(|| {
            calls += 1;
            if calls == 1 {
                Err(tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(
                    0x0000_090a,
                )))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r, Ok(2));
        let mut calls = 0;
        let r: tss_esapi::Result<()> = retry_transient(|| {
            calls += 1;
            Err(tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(
                0x0000_018b,
            )))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
