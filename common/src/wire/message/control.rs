//! The control family: `ping`, `pong`, `error`, `goodbye`,
//! `feature-update` (PROTOCOL.md §6.11-§6.15).

use super::*;

// ---------------------------------------------------------------- control

/// Either direction (§6.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Ping {
    pub sequence: u64,
}

/// Either direction, echoing a ping's sequence (§6.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Pong {
    pub sequence: u64,
}

macro_rules! sequence_body {
    ($body:ident, $context:literal) => {
        impl Body for $body {
            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                let mut f = Fields::open(r, $context)?;
                let sequence = f.required(0, "sequence")?.uint("sequence")?;
                f.finish()?;
                Ok(Self { sequence })
            }

            fn write(&self, w: &mut Writer) {
                w.map(1);
                w.uint(0);
                w.uint(self.sequence);
            }

            fn validate(&self) -> Result<(), DecodeError> {
                Ok(())
            }
        }
    };
}

sequence_body!(Ping, "ping");
sequence_body!(Pong, "pong");

/// A protocol version range `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

/// Either direction (§6.14). After an error of a permanent class the
/// sender closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct ErrorMessage {
    #[cfg_attr(feature = "serde", serde(rename = "error-code"))]
    pub code: ErrorCode,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "retry-after"))]
    pub retry_after_ms: Option<u32>,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "error-detail"))]
    pub detail: Option<ErrorDetail>,
    /// Only with `unsupported-version`: the sender's supported range.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub supported: Option<VersionRange>,
}

impl ErrorMessage {
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            retry_after_ms: None,
            detail: None,
            supported: None,
        }
    }
}

impl Body for ErrorMessage {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "error")?;
        let code = read_error_code(f.required(0, "error-code")?)?;
        let retry_after_ms = match f.optional(1)? {
            Some(r) => Some(read_u32(r, "retry-after", 1, MAX_RETRY_AFTER_MS)?),
            None => None,
        };
        let detail = match f.optional(2)? {
            Some(r) => Some(ErrorDetail::new(r.text(
                "error-detail",
                1,
                MAX_ERROR_DETAIL,
            )?)?),
            None => None,
        };
        let supported = match f.optional(3)? {
            Some(r) => {
                r.array("supported", 2, 2)?;
                let min = read_u16(r, "supported", 1)?;
                let max = read_u16(r, "supported", 1)?;
                Some(VersionRange { min, max })
            }
            None => None,
        };
        f.finish()?;
        Ok(Self {
            code,
            retry_after_ms,
            detail,
            supported,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(
            1,
            &[
                self.retry_after_ms.is_some(),
                self.detail.is_some(),
                self.supported.is_some(),
            ],
        ));
        w.uint(0);
        w.uint(self.code.value().into());
        if let Some(ms) = self.retry_after_ms {
            w.uint(1);
            w.uint(ms.into());
        }
        if let Some(d) = &self.detail {
            w.uint(2);
            w.text(d.as_str());
        }
        if let Some(v) = self.supported {
            w.uint(3);
            w.array(2);
            w.uint(v.min.into());
            w.uint(v.max.into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_error_code(self.code)?;
        validate_retry_after(self.retry_after_ms)?;
        if let Some(v) = self.supported {
            if self.code != ErrorCode::UnsupportedVersion {
                return Err(DecodeError::InvalidValue {
                    field: "supported",
                    rule: "only with unsupported-version",
                });
            }
            if v.min == 0 || v.min > v.max {
                return Err(DecodeError::InvalidValue {
                    field: "supported",
                    rule: "not a version range",
                });
            }
        }
        Ok(())
    }
}

pub(super) fn validate_retry_after(ms: Option<u32>) -> Result<(), DecodeError> {
    match ms {
        Some(ms) if ms == 0 || ms > MAX_RETRY_AFTER_MS => Err(DecodeError::InvalidValue {
            field: "retry-after",
            rule: "out of range",
        }),
        _ => Ok(()),
    }
}

/// Either direction: orderly close (§6.15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct Goodbye {
    #[cfg_attr(feature = "serde", serde(rename = "goodbye-reason"))]
    pub reason: GoodbyeReason,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    #[cfg_attr(feature = "serde", serde(rename = "retry-after"))]
    pub retry_after_ms: Option<u32>,
}

impl Body for Goodbye {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "goodbye")?;
        let reason = GoodbyeReason::read(f.required(0, "goodbye-reason")?)?;
        let retry_after_ms = match f.optional(1)? {
            Some(r) => Some(read_u32(r, "retry-after", 1, MAX_RETRY_AFTER_MS)?),
            None => None,
        };
        f.finish()?;
        Ok(Self {
            reason,
            retry_after_ms,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.map(entries(1, &[self.retry_after_ms.is_some()]));
        w.uint(0);
        w.uint(self.reason.value());
        if let Some(ms) = self.retry_after_ms {
            w.uint(1);
            w.uint(ms.into());
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_retry_after(self.retry_after_ms)
    }
}

/// host → guest: the rollout state changed (§6.16, §12).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(deny_unknown_fields, rename_all = "kebab-case")
)]
pub struct FeatureUpdate {
    pub features: Features,
}

impl Body for FeatureUpdate {
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut f = Fields::open(r, "feature-update")?;
        let features = read_features(f.required(0, "features")?)?;
        f.finish()?;
        Ok(Self { features })
    }

    fn write(&self, w: &mut Writer) {
        w.map(1);
        w.uint(0);
        write_features(w, &self.features);
    }

    fn validate(&self) -> Result<(), DecodeError> {
        validate_features(&self.features)
    }
}
