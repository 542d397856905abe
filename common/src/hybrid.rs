//! The hybrid-vsock CONNECT preamble (PROTOCOL.md §2.3.2), sans-I/O.
//!
//! A host-side program reaches guest port P through a VMM that exposes the
//! guest's vsock as a Unix socket PATH (Firecracker, Cloud Hypervisor, the
//! vhost-device-vsock convention): it connects to PATH, writes
//! [`connect_request`] (`CONNECT <P>\n`), and reads one reply line,
//! `OK <assigned-port>\n`. After that LF the stream is guest port P.
//!
//! [`ConnectReply`] parses the reply one byte at a time, so the driver
//! never reads past the LF: the first byte after it already belongs to the
//! protocol carried on the stream, and a buffered reader would swallow it.
//! The parser accepts exactly the ABNF of §2.3.2 and nothing else:
//!
//! ```text
//! connect-reply = "OK" SP assigned-port LF
//! assigned-port = 1*10DIGIT          ; value at most 4294967295
//! ```
//!
//! Leading zeros are allowed in `assigned-port` (the grammar is
//! `1*10DIGIT`), unlike the request's `port`, which [`connect_request`]
//! always writes without them. No CR, no sign, no extra space; a reply
//! line is at most [`HYBRID_CONNECT_REPLY_MAX`] bytes including the LF
//! (the grammar itself caps a valid line at [`MAX_VALID_REPLY_LEN`]
//! bytes, so the parser fails well before that bound). After its first
//! error the parser stays failed.
//!
//! Waiting at most [`HYBRID_CONNECT_TIMEOUT`] and closing the socket on
//! failure are the driver's job.

use std::time::Duration;

/// Longest hybrid-vsock `OK <n>\n` reply, LF included.
pub const HYBRID_CONNECT_REPLY_MAX: usize = 32;
/// Wait for the hybrid-vsock `OK` reply.
pub const HYBRID_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Digits of the longest `assigned-port`: 4294967295 has ten.
pub const MAX_PORT_DIGITS: usize = 10;

/// Longest reply the grammar allows: `OK`, SP, ten digits, LF.
pub const MAX_VALID_REPLY_LEN: usize = 3 + MAX_PORT_DIGITS + 1;

/// The bytes of the reply before the port: `OK` and one space.
const REPLY_PREFIX: &[u8; 3] = b"OK ";

/// Why a CONNECT reply was refused. Every variant means the exchange has
/// failed and the socket must be closed (§2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HybridError {
    /// A CR anywhere in the reply: lines end with a bare LF.
    #[error("CR at byte {offset} of the CONNECT reply")]
    CarriageReturn { offset: usize },
    /// A space other than the single one after `OK`.
    #[error("extra space at byte {offset} of the CONNECT reply")]
    ExtraSpace { offset: usize },
    /// `+` or `-` where the port's digits belong.
    #[error("sign at byte {offset} of the CONNECT reply")]
    Sign { offset: usize },
    /// LF right after `OK `: the port has no digits.
    #[error("CONNECT reply without a port")]
    NoDigits,
    /// An eleventh digit.
    #[error("CONNECT reply port longer than {MAX_PORT_DIGITS} digits")]
    TooManyDigits,
    /// Ten digits with a value above 4294967295.
    #[error("CONNECT reply port {value} exceeds 4294967295")]
    PortOutOfRange { value: u64 },
    /// Any other byte that does not fit the grammar: other text (an error
    /// message from the VMM, a lower-case `ok`), a missing space, a letter
    /// in the port.
    #[error("unexpected byte 0x{byte:02x} at byte {offset} of the CONNECT reply")]
    UnexpectedByte { offset: usize, byte: u8 },
    /// [`HYBRID_CONNECT_REPLY_MAX`] bytes without an LF. Unreachable
    /// through the grammar (which fails by byte [`MAX_VALID_REPLY_LEN`]);
    /// kept so the bound holds whatever the grammar checks.
    #[error("CONNECT reply longer than {HYBRID_CONNECT_REPLY_MAX} bytes without LF")]
    TooLong,
    /// The stream ended before the LF.
    #[error("stream ended after {received} bytes of the CONNECT reply, before its LF")]
    Truncated { received: usize },
    /// A byte after the LF was offered to the parser: the caller read past
    /// the end of the reply (or handed over a line with trailing bytes).
    #[error("byte after the end of the CONNECT reply")]
    AfterEnd,
}

impl HybridError {
    /// A stable snake_case name, for logs and test vectors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CarriageReturn { .. } => "carriage_return",
            Self::ExtraSpace { .. } => "extra_space",
            Self::Sign { .. } => "sign",
            Self::NoDigits => "no_digits",
            Self::TooManyDigits => "too_many_digits",
            Self::PortOutOfRange { .. } => "port_out_of_range",
            Self::UnexpectedByte { .. } => "unexpected_byte",
            Self::TooLong => "too_long",
            Self::Truncated { .. } => "truncated",
            Self::AfterEnd => "after_end",
        }
    }
}

/// The request for guest port `port`: exactly `CONNECT <port>\n`, the port
/// in decimal without sign or leading zeros (§2.3.2 step 1).
pub fn connect_request(port: u32) -> Vec<u8> {
    format!("CONNECT {port}\n").into_bytes()
}

/// Where the parser is in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading `OK ` and then the digits; `len` bytes consumed so far.
    Reading,
    /// The LF has been consumed; the reply was valid.
    Done,
    /// The reply was refused; every later call repeats the error.
    Failed(HybridError),
}

/// Incremental parser of the CONNECT reply, fed one byte at a time.
#[derive(Debug, Clone)]
pub struct ConnectReply {
    state: State,
    /// Bytes consumed, the LF included once seen.
    len: usize,
    /// Digits of the port seen so far.
    digits: usize,
    /// Their value; ten digits fit in a `u64` with room to spare.
    value: u64,
}

impl Default for ConnectReply {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectReply {
    pub fn new() -> Self {
        Self {
            state: State::Reading,
            len: 0,
            digits: 0,
            value: 0,
        }
    }

    /// Bytes consumed so far (the LF included once seen).
    pub fn len(&self) -> usize {
        self.len
    }

    /// No byte consumed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Consumes one byte of the reply. Returns `Ok(Some(assigned_port))`
    /// when `byte` is the LF that completes a valid reply, `Ok(None)` when
    /// more bytes are needed. After `Ok(Some(_))` the caller must stop
    /// reading: the next byte on the stream belongs to guest port P (a
    /// further call fails with [`HybridError::AfterEnd`]).
    pub fn push(&mut self, byte: u8) -> Result<Option<u32>, HybridError> {
        match self.state {
            State::Reading => {}
            State::Done => return self.fail(HybridError::AfterEnd),
            State::Failed(e) => return Err(e),
        }
        if self.len >= HYBRID_CONNECT_REPLY_MAX {
            return self.fail(HybridError::TooLong);
        }
        let offset = self.len;
        self.len += 1;
        if byte == b'\r' {
            return self.fail(HybridError::CarriageReturn { offset });
        }
        if let Some(&want) = REPLY_PREFIX.get(offset) {
            return if byte == want {
                Ok(None)
            } else if byte == b' ' {
                self.fail(HybridError::ExtraSpace { offset })
            } else {
                self.fail(HybridError::UnexpectedByte { offset, byte })
            };
        }
        match byte {
            b'0'..=b'9' => {
                if self.digits == MAX_PORT_DIGITS {
                    return self.fail(HybridError::TooManyDigits);
                }
                self.digits += 1;
                self.value = self.value * 10 + u64::from(byte - b'0');
                if self.value > u64::from(u32::MAX) {
                    return self.fail(HybridError::PortOutOfRange { value: self.value });
                }
                Ok(None)
            }
            b'\n' => {
                if self.digits == 0 {
                    return self.fail(HybridError::NoDigits);
                }
                match u32::try_from(self.value) {
                    Ok(port) => {
                        self.state = State::Done;
                        Ok(Some(port))
                    }
                    Err(_) => self.fail(HybridError::PortOutOfRange { value: self.value }),
                }
            }
            b' ' => self.fail(HybridError::ExtraSpace { offset }),
            b'+' | b'-' => self.fail(HybridError::Sign { offset }),
            _ => self.fail(HybridError::UnexpectedByte { offset, byte }),
        }
    }

    /// Call at end of stream: fails unless a complete reply was parsed.
    pub fn finish(&self) -> Result<u32, HybridError> {
        match self.state {
            State::Done => u32::try_from(self.value)
                .map_err(|_| HybridError::PortOutOfRange { value: self.value }),
            State::Failed(e) => Err(e),
            State::Reading => Err(HybridError::Truncated { received: self.len }),
        }
    }

    fn fail<T>(&mut self, e: HybridError) -> Result<T, HybridError> {
        self.state = State::Failed(e);
        Err(e)
    }
}

/// Parses one complete reply line, LF included and nothing after it.
pub fn parse_connect_reply(line: &[u8]) -> Result<u32, HybridError> {
    let mut p = ConnectReply::new();
    for &b in line {
        p.push(b)?;
    }
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The example of §2.3.2, byte for byte.
    const EXAMPLE_REQUEST: [u8; 13] = [
        0x43, 0x4f, 0x4e, 0x4e, 0x45, 0x43, 0x54, 0x20, 0x37, 0x38, 0x36, 0x31, 0x0a,
    ];
    const EXAMPLE_REPLY: [u8; 14] = [
        0x4f, 0x4b, 0x20, 0x31, 0x30, 0x37, 0x33, 0x37, 0x34, 0x31, 0x38, 0x32, 0x34, 0x0a,
    ];

    /// An independent reading of the grammar, for the property tests.
    fn oracle(line: &[u8]) -> Option<u32> {
        let digits = line.strip_prefix(b"OK ")?.strip_suffix(b"\n")?;
        if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits)
            .ok()?
            .parse::<u64>()
            .ok()?
            .try_into()
            .ok()
    }

    /// The request grammar: "CONNECT" SP ("0" / %x31-39 0*9DIGIT) LF.
    fn is_request(b: &[u8]) -> bool {
        let Some(port) = b
            .strip_prefix(b"CONNECT ")
            .and_then(|r| r.strip_suffix(b"\n"))
        else {
            return false;
        };
        let shape = port == b"0"
            || (matches!(port.first(), Some(b'1'..=b'9'))
                && port.len() <= 10
                && port.iter().all(u8::is_ascii_digit));
        shape
            && std::str::from_utf8(port)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|v| v <= u64::from(u32::MAX))
    }

    #[test]
    fn the_spec_example_bytes() {
        assert_eq!(connect_request(7861), EXAMPLE_REQUEST);
        assert_eq!(parse_connect_reply(&EXAMPLE_REPLY), Ok(1_073_741_824));
    }

    #[test]
    fn the_port_arrives_with_the_lf_and_not_before() {
        let mut p = ConnectReply::new();
        for &b in &EXAMPLE_REPLY[..EXAMPLE_REPLY.len() - 1] {
            assert_eq!(p.push(b), Ok(None));
        }
        assert_eq!(p.push(b'\n'), Ok(Some(1_073_741_824)));
        assert_eq!(p.len(), EXAMPLE_REPLY.len());
        assert_eq!(p.finish(), Ok(1_073_741_824));
        // The caller must stop at the LF; a further byte is its mistake.
        assert_eq!(p.push(0x16), Err(HybridError::AfterEnd));
        assert_eq!(p.push(b'1'), Err(HybridError::AfterEnd));
    }

    #[test]
    fn requests_have_no_sign_and_no_leading_zero() {
        assert_eq!(connect_request(0), b"CONNECT 0\n");
        assert_eq!(connect_request(1), b"CONNECT 1\n");
        assert_eq!(connect_request(u32::MAX), b"CONNECT 4294967295\n");
        for port in [0, 1, 9, 10, 1023, 7861, u32::MAX] {
            assert!(is_request(&connect_request(port)), "{port}");
        }
    }

    #[test]
    fn boundaries_of_the_assigned_port() {
        assert_eq!(parse_connect_reply(b"OK 0\n"), Ok(0));
        assert_eq!(parse_connect_reply(b"OK 4294967295\n"), Ok(u32::MAX));
        // 1*10DIGIT: leading zeros are allowed, up to ten digits in all.
        assert_eq!(parse_connect_reply(b"OK 0000000000\n"), Ok(0));
        assert_eq!(parse_connect_reply(b"OK 0000001024\n"), Ok(1024));
        assert_eq!(
            parse_connect_reply(b"OK 4294967296\n"),
            Err(HybridError::PortOutOfRange {
                value: 4_294_967_296
            })
        );
        assert_eq!(
            parse_connect_reply(b"OK 9999999999\n"),
            Err(HybridError::PortOutOfRange {
                value: 9_999_999_999
            })
        );
        assert_eq!(
            parse_connect_reply(b"OK 00000000001\n"),
            Err(HybridError::TooManyDigits)
        );
    }

    /// Every failure §2.3.2 lists, one case (or more) each.
    #[test]
    fn every_failure_the_spec_lists() {
        use HybridError::*;
        let cases: &[(&[u8], HybridError)] = &[
            // Other text.
            (
                b"ERR no listener\n",
                UnexpectedByte {
                    offset: 0,
                    byte: b'E',
                },
            ),
            (
                b"ok 1\n",
                UnexpectedByte {
                    offset: 0,
                    byte: b'o',
                },
            ),
            (
                b"OKAY 1\n",
                UnexpectedByte {
                    offset: 2,
                    byte: b'A',
                },
            ),
            (
                b"OK1\n",
                UnexpectedByte {
                    offset: 2,
                    byte: b'1',
                },
            ),
            (
                b"OK\n",
                UnexpectedByte {
                    offset: 2,
                    byte: b'\n',
                },
            ),
            (
                b"OK 12a\n",
                UnexpectedByte {
                    offset: 5,
                    byte: b'a',
                },
            ),
            (
                b"OK 0x10\n",
                UnexpectedByte {
                    offset: 4,
                    byte: b'x',
                },
            ),
            (
                b"\n",
                UnexpectedByte {
                    offset: 0,
                    byte: b'\n',
                },
            ),
            (
                b"OK \t1\n",
                UnexpectedByte {
                    offset: 3,
                    byte: b'\t',
                },
            ),
            (b"OK 1\0\n", UnexpectedByte { offset: 4, byte: 0 }),
            // A CR, wherever it is.
            (b"OK 1\r\n", CarriageReturn { offset: 4 }),
            (b"OK\r 1\n", CarriageReturn { offset: 2 }),
            (b"\r\n", CarriageReturn { offset: 0 }),
            (b"OK \r\n", CarriageReturn { offset: 3 }),
            // Extra spaces.
            (b"OK  1\n", ExtraSpace { offset: 3 }),
            (b"OK 1 \n", ExtraSpace { offset: 4 }),
            (b" OK 1\n", ExtraSpace { offset: 0 }),
            (b"O K 1\n", ExtraSpace { offset: 1 }),
            (b"OK 1 2\n", ExtraSpace { offset: 4 }),
            // A sign.
            (b"OK +1\n", Sign { offset: 3 }),
            (b"OK -1\n", Sign { offset: 3 }),
            (b"OK 1-\n", Sign { offset: 4 }),
            // No port, a port too long, a value above 4294967295.
            (b"OK \n", NoDigits),
            (b"OK 12345678901\n", TooManyDigits),
            (
                b"OK 4294967296\n",
                PortOutOfRange {
                    value: 4_294_967_296,
                },
            ),
            // End of stream before the LF.
            (b"", Truncated { received: 0 }),
            (b"OK", Truncated { received: 2 }),
            (b"OK 1073741824", Truncated { received: 13 }),
            // Bytes after the LF handed over as part of the line.
            (b"OK 1\nX", AfterEnd),
            (b"OK 1\n\n", AfterEnd),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_connect_reply(line),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn thirty_two_bytes_without_lf_fail_before_the_bound() {
        // Whatever the 32 bytes, the grammar has failed by byte 14, and
        // no call returns a port.
        for line in [[b'7'; 40], [b'O'; 40], [b' '; 40]] {
            let mut p = ConnectReply::new();
            let mut first_err = None;
            for (i, &b) in line.iter().enumerate() {
                match p.push(b) {
                    Ok(None) => {}
                    Ok(Some(port)) => panic!("port {port} from {line:?}"),
                    Err(e) => {
                        first_err.get_or_insert((i, e));
                    }
                }
            }
            let (at, _) = first_err.expect("must fail");
            assert!(at < MAX_VALID_REPLY_LEN, "failed only at byte {at}");
            assert!(p.finish().is_err());
        }
        let mut long = b"OK 1".to_vec();
        long.extend_from_slice(&[b'0'; 40]);
        assert_eq!(parse_connect_reply(&long), Err(HybridError::TooManyDigits));
    }

    #[test]
    fn errors_are_sticky() {
        let mut p = ConnectReply::new();
        assert_eq!(p.push(b'O'), Ok(None));
        assert_eq!(
            p.push(b'X'),
            Err(HybridError::UnexpectedByte {
                offset: 1,
                byte: b'X'
            })
        );
        for &b in b"K 1\n" {
            assert_eq!(
                p.push(b),
                Err(HybridError::UnexpectedByte {
                    offset: 1,
                    byte: b'X'
                })
            );
        }
        assert_eq!(
            p.finish(),
            Err(HybridError::UnexpectedByte {
                offset: 1,
                byte: b'X'
            })
        );
    }

    #[test]
    fn kinds_are_distinct() {
        use HybridError::*;
        let all = [
            CarriageReturn { offset: 0 },
            ExtraSpace { offset: 0 },
            Sign { offset: 0 },
            NoDigits,
            TooManyDigits,
            PortOutOfRange { value: 0 },
            UnexpectedByte { offset: 0, byte: 0 },
            TooLong,
            Truncated { received: 0 },
            AfterEnd,
        ];
        let kinds: std::collections::BTreeSet<_> = all.iter().map(HybridError::kind).collect();
        assert_eq!(kinds.len(), all.len());
    }

    /// Bytes that make grammar-shaped strings likely.
    fn near_grammar() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            8 => b'0'..=b'9',
            1 => Just(b' '),
            1 => Just(b'\n'),
            1 => Just(b'\r'),
            1 => Just(b'+'),
            1 => Just(b'-'),
            1 => any::<u8>(),
        ];
        (
            prop_oneof![
                Just(b"OK ".to_vec()),
                Just(b"OK".to_vec()),
                Just(Vec::new())
            ],
            proptest::collection::vec(byte, 0..20),
        )
            .prop_map(|(mut head, tail)| {
                head.extend(tail);
                head
            })
    }

    /// Feeds `bytes` one at a time as a driver would: stops at the first
    /// port or error. Returns the port and how many bytes it took.
    fn drive(bytes: &[u8]) -> (Result<Option<u32>, HybridError>, usize) {
        let mut p = ConnectReply::new();
        for (i, &b) in bytes.iter().enumerate() {
            match p.push(b) {
                Ok(None) => {}
                done => return (done, i + 1),
            }
        }
        (p.finish().map(Some), bytes.len())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn every_u32_round_trips(port in any::<u32>()) {
            let line = format!("OK {port}\n");
            prop_assert_eq!(parse_connect_reply(line.as_bytes()), Ok(port));
            prop_assert!(is_request(&connect_request(port)));
        }

        #[test]
        fn leading_zeros_round_trip_within_ten_digits(port in any::<u32>()) {
            let line = format!("OK {port:010}\n");
            prop_assert_eq!(parse_connect_reply(line.as_bytes()), Ok(port));
        }

        #[test]
        fn random_bytes_yield_a_port_only_for_the_grammar(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..48),
                near_grammar(),
            ]
        ) {
            prop_assert_eq!(parse_connect_reply(&bytes).ok(), oracle(&bytes));
            let (res, used) = drive(&bytes);
            prop_assert!(used <= HYBRID_CONNECT_REPLY_MAX);
            if let Ok(Some(port)) = res {
                // A port only ever comes with the LF of a valid line, and
                // nothing after that LF was consumed.
                prop_assert_eq!(oracle(&bytes[..used]), Some(port));
            }
        }
    }
}
