//! The connection pump: the sans-I/O loop between a byte stream and a
//! session, the one both agents drive (quinn-proto's `handle_event` /
//! `poll_transmit`, here for one stream).
//!
//! A driver feeds the pump what its socket and clock give it:
//! [`Pump::handle_input`] with the bytes of each read,
//! [`Pump::handle_timeout`] at [`Pump::deadline`], [`Pump::handle_eof`] at
//! end of stream, and through [`Pump::step`] / [`Pump::absorb`] whatever
//! else the driver has for the session (a verdict, a quote, a rotation, a
//! stop). It takes back out, in this order: the session's events
//! ([`Pump::poll_event`]), the frames to write ([`Pump::poll_transmit`],
//! each saying which error code it carries, so that a driver counts what
//! it sent without decoding its own frames), and whether to close
//! ([`Pump::take_close`]). The pump does no I/O and reads no clock.
//!
//! Trusts nothing in the input: frames go through [`FrameDecoder`] (one
//! frame buffered at most, its length checked before anything is
//! allocated), payloads through the session's own decoders. A framing
//! error is answered with its code and closes the session; nothing is
//! decoded after the session asked to close.
//!
//! Bounds: the decoder's one frame, and [`MAX_EVENT_ROUNDS`] rounds of
//! events per input. The work an event asks for may yield more events
//! (a verdict yields `attested`, which may yield a request); chains are at
//! most three long, so a session whose events do not settle within the
//! bound has a bug, and the pump closes it with `internal` rather than
//! loop.

use std::collections::VecDeque;
use std::time::Instant;

use zeroize::Zeroizing;

use super::guest::{Guest, GuestEvent};
use super::host::{Host, HostEvent};
use super::{CloseReason, Output};
use crate::errors::ErrorCode;
use crate::retry::Failure;
use crate::wire::{FRAME_HEADER_LEN, FrameDecoder, FrameError, encode_frame};

/// Rounds of event handling from one input until the events settle: each
/// round takes the events the previous one produced. Real chains are at
/// most three rounds long (verify, attested, a request).
pub const MAX_EVENT_ROUNDS: usize = 8;

/// A session state machine the pump can drive: the inputs every session
/// takes, whatever its side.
pub trait Session: Sized {
    /// What the session asks its driver to act on.
    type Event;

    /// One received frame payload.
    fn on_payload(self, payload: &[u8], now: Instant) -> (Self, Output<Self::Event>);
    /// The deadline came.
    fn on_timeout(self, now: Instant) -> (Self, Output<Self::Event>);
    /// The stream ended.
    fn on_transport_closed(self) -> (Self, Output<Self::Event>);
    /// When the session next needs [`Session::on_timeout`]; `None` once
    /// closed.
    fn deadline(&self) -> Option<Instant>;
    /// The closed session, which takes nothing more.
    fn closed() -> Self;
}

impl Session for Host {
    type Event = HostEvent;

    fn on_payload(self, payload: &[u8], now: Instant) -> (Self, Output<HostEvent>) {
        Host::on_payload(self, payload, now)
    }
    fn on_timeout(self, now: Instant) -> (Self, Output<HostEvent>) {
        Host::on_timeout(self, now)
    }
    fn on_transport_closed(self) -> (Self, Output<HostEvent>) {
        Host::on_transport_closed(self)
    }
    fn deadline(&self) -> Option<Instant> {
        Host::deadline(self)
    }
    fn closed() -> Self {
        Host::Closed
    }
}

impl Session for Guest {
    type Event = GuestEvent;

    fn on_payload(self, payload: &[u8], now: Instant) -> (Self, Output<GuestEvent>) {
        Guest::on_payload(self, payload, now)
    }
    fn on_timeout(self, now: Instant) -> (Self, Output<GuestEvent>) {
        Guest::on_timeout(self, now)
    }
    fn on_transport_closed(self) -> (Self, Output<GuestEvent>) {
        Guest::on_transport_closed(self)
    }
    fn deadline(&self) -> Option<Instant> {
        Guest::deadline(self)
    }
    fn closed() -> Self {
        Guest::Closed
    }
}

/// Why the pump closed the session by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PumpError {
    /// The peer's stream broke the framing rules (§3), or ended inside a
    /// frame.
    #[error("frame refused: {0}")]
    Frame(#[from] FrameError),
    /// The session's events did not settle within [`MAX_EVENT_ROUNDS`]: a
    /// bug of this side.
    #[error("session events did not settle within {MAX_EVENT_ROUNDS} rounds")]
    EventRounds,
}

/// One frame to write.
#[derive(Debug)]
pub struct Transmit {
    frame: Zeroizing<Vec<u8>>,
    /// The code of the `error` message the frame carries, if it is one.
    pub error: Option<ErrorCode>,
}

impl Transmit {
    /// The whole frame: length prefix and payload.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The payload alone.
    pub fn payload(&self) -> &[u8] {
        self.frame.get(FRAME_HEADER_LEN..).unwrap_or_default()
    }
}

/// One connection's session, its frame decoder and what it asked for that
/// the driver has not taken yet.
#[derive(Debug)]
pub struct Pump<S: Session> {
    session: S,
    frames: FrameDecoder,
    /// What the session asked for; `pending.events` is the next round.
    pending: Output<S::Event>,
    /// The events of the round being handed out.
    round: VecDeque<S::Event>,
    /// Rounds started since the events last ran dry.
    rounds: usize,
    /// Payloads taken from `pending`, not yet framed and handed out.
    outgoing: VecDeque<(Zeroizing<Vec<u8>>, Option<ErrorCode>)>,
}

impl<S: Session> Pump<S> {
    /// Starts with a session and what its start asked for.
    pub fn new(session: S, first: Output<S::Event>) -> Self {
        Self {
            session,
            frames: FrameDecoder::new(),
            pending: first,
            round: VecDeque::new(),
            rounds: 0,
            outgoing: VecDeque::new(),
        }
    }

    pub fn session(&self) -> &S {
        &self.session
    }

    /// For the calls a session state offers beyond the inputs (a request,
    /// a push); what they return goes to [`Pump::absorb`].
    pub fn session_mut(&mut self) -> &mut S {
        &mut self.session
    }

    /// When the session next needs [`Pump::handle_timeout`]; `None` once
    /// it is closed.
    pub fn deadline(&self) -> Option<Instant> {
        self.session.deadline()
    }

    /// Takes in what the session asked for outside the pump's inputs.
    pub fn absorb(&mut self, out: Output<S::Event>) {
        self.pending.absorb(out);
    }

    /// Feeds the session one transition: `f` takes the session and gives
    /// back its next state and what it asks for.
    pub fn step(&mut self, f: impl FnOnce(S) -> (S, Output<S::Event>)) {
        let session = std::mem::replace(&mut self.session, S::closed());
        let (session, out) = f(session);
        self.session = session;
        self.pending.absorb(out);
    }

    /// The bytes of one read. Each complete frame's payload goes to
    /// `deliver` with the session (most drivers pass
    /// [`Session::on_payload`]; the host puts its message budget first),
    /// until the input runs out or the session asks to close; a partial
    /// frame waits for the next read. A framing error is answered with its
    /// code, closes the session and is returned for the driver to log.
    pub fn handle_input<F>(
        &mut self,
        mut input: &[u8],
        now: Instant,
        mut deliver: F,
    ) -> Result<(), PumpError>
    where
        F: FnMut(S, &[u8], Instant) -> (S, Output<S::Event>),
    {
        // Every frame consumes at least one byte, so this ends.
        while self.pending.close.is_none() {
            match self.frames.decode(&mut input) {
                Ok(Some(payload)) => {
                    let session = std::mem::replace(&mut self.session, S::closed());
                    let (session, out) = deliver(session, payload, now);
                    self.session = session;
                    self.pending.absorb(out);
                }
                Ok(None) => {
                    // Between frames: a fresh decoder, so an idle session
                    // keeps no capacity of its largest frame (the evidence).
                    if self.frames.buffered() == 0 {
                        self.frames = FrameDecoder::new();
                    }
                    break;
                }
                Err(e) => {
                    self.pending.frame_error(&e);
                    self.session = S::closed();
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// The session's deadline came.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.step(|s| s.on_timeout(now));
    }

    /// The stream ended (or failed): the session closes. An end inside a
    /// frame is returned for the driver to log.
    pub fn handle_eof(&mut self) -> Result<(), PumpError> {
        let end = self.frames.finish();
        self.step(S::on_transport_closed);
        end.map_err(PumpError::from)
    }

    /// The next event to act on, or `None` once they have settled. The
    /// events of one round are handed out before those their handling
    /// produced. `Err` when they do not settle within
    /// [`MAX_EVENT_ROUNDS`]: the rest are dropped and the session is
    /// closed with `internal`.
    pub fn poll_event(&mut self) -> Option<Result<S::Event, PumpError>> {
        if let Some(ev) = self.round.pop_front() {
            return Some(Ok(ev));
        }
        if self.pending.events.is_empty() {
            self.rounds = 0;
            // Settled: an idle session keeps no capacity of its busiest
            // round (about 1 KiB of events after the handshake).
            self.round = VecDeque::new();
            self.pending.events = Vec::new();
            return None;
        }
        if self.rounds >= MAX_EVENT_ROUNDS {
            self.pending.events.clear();
            self.rounds = 0;
            if self.pending.close.is_none() {
                self.pending.fail_code(ErrorCode::Internal);
            }
            self.session = S::closed();
            return Some(Err(PumpError::EventRounds));
        }
        self.rounds += 1;
        self.round = std::mem::take(&mut self.pending.events).into();
        self.round.pop_front().map(Ok)
    }

    /// Room held in the pump's queues, in elements: none once events have
    /// settled and frames are written (an idle session's memory).
    #[cfg(test)]
    fn held_capacity(&self) -> usize {
        self.round.capacity()
            + self.outgoing.capacity()
            + self.pending.events.capacity()
            + self.pending.send.capacity()
            + self.pending.errors.capacity()
    }

    /// Whether events wait for [`Pump::poll_event`].
    pub fn has_events(&self) -> bool {
        !self.round.is_empty() || !self.pending.events.is_empty()
    }

    /// The next frame to write, in the order the session asked.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.outgoing.is_empty() {
            self.outgoing.extend(self.pending.take_sends());
        }
        let Some((payload, error)) = self.outgoing.pop_front() else {
            // All written: no capacity of the busiest flight is kept.
            self.outgoing = VecDeque::new();
            return None;
        };
        let mut frame = Zeroizing::new(Vec::with_capacity(FRAME_HEADER_LEN + payload.len()));
        if encode_frame(&payload, &mut frame).is_err() {
            // Unreachable: a message encodes to 1..=MAX_FRAME_PAYLOAD bytes
            // or not at all. Were it not, closing is the only safe answer.
            self.outgoing.clear();
            self.pending.send.clear();
            self.pending.close(CloseReason::Failed(Failure::Permanent));
            self.session = S::closed();
            return None;
        }
        Some(Transmit { frame, error })
    }

    /// Why the session asked to close once its frames are written; taken
    /// once.
    pub fn take_close(&mut self) -> Option<CloseReason> {
        self.pending.close.take()
    }

    /// Whether the session asked to close.
    pub fn is_closing(&self) -> bool {
        self.pending.close.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::session::guest::AWAIT_CHALLENGE_TIMEOUT;
    use crate::testing::pair::{self, EXPORTER, Pair};
    use crate::wire::{FeatureState, MAX_FRAME_PAYLOAD, Message, Ping};

    fn framed(payloads: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for p in payloads {
            encode_frame(p, &mut bytes).unwrap();
        }
        bytes
    }

    fn transmits<S: Session>(pump: &mut Pump<S>) -> Vec<(Message, Option<ErrorCode>)> {
        std::iter::from_fn(|| pump.poll_transmit())
            .map(|t| {
                let len = u32::from_be_bytes(t.frame()[..4].try_into().unwrap());
                assert_eq!(len as usize, t.payload().len());
                (Message::decode(t.payload()).unwrap(), t.error)
            })
            .collect()
    }

    fn host(now: Instant) -> Pump<Host> {
        let host = pair::start_host(
            Some("vm-1"),
            None,
            pair::features(FeatureState::Enabled),
            now,
        );
        Pump::new(host, Output::default())
    }

    fn hello(now: Instant) -> Vec<u8> {
        let (_, out) = Guest::start(pair::guest_config(1, 1), EXPORTER, [3; 32], now);
        out.send[0].to_vec()
    }

    #[test]
    fn a_frame_split_across_reads_is_delivered_once_it_is_whole() {
        let t0 = Instant::now();
        let mut pump = host(t0);
        let bytes = framed(&[hello(t0)]);
        let mut delivered = 0;
        for (i, b) in bytes.iter().enumerate() {
            pump.handle_input(std::slice::from_ref(b), t0, |s, p, now| {
                delivered += 1;
                s.on_payload(p, now)
            })
            .unwrap();
            if i + 1 < bytes.len() {
                assert!(pump.poll_transmit().is_none(), "byte {i}");
            }
        }
        assert_eq!(delivered, 1);
        let sent = transmits(&mut pump);
        assert!(
            matches!(sent[..], [(Message::Challenge(_), None)]),
            "{sent:?}"
        );
        assert!(!pump.is_closing());
    }

    #[test]
    fn several_frames_in_one_read_are_each_delivered_in_order() {
        let mut p = Pair::new((1, 1), Some("vm-1"), FeatureState::Enabled);
        p.run();
        assert!(p.established());
        let mut pump = Pump::new(
            std::mem::replace(&mut p.host, Host::Closed),
            Output::default(),
        );
        let pings: Vec<Vec<u8>> = (1..=3)
            .map(|sequence| Message::Ping(Ping { sequence }).encode().unwrap().to_vec())
            .collect();
        pump.handle_input(&framed(&pings), p.now, Host::on_payload)
            .unwrap();
        let sequences: Vec<u64> = transmits(&mut pump)
            .into_iter()
            .map(|(m, error)| match (m, error) {
                (Message::Pong(p), None) => p.sequence,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sequences, [1, 2, 3]);
    }

    #[test]
    fn an_oversize_frame_is_a_typed_error_answered_with_its_code() {
        let t0 = Instant::now();
        let mut pump = host(t0);
        let len = u32::try_from(MAX_FRAME_PAYLOAD + 1).unwrap();
        let mut input = len.to_be_bytes().to_vec();
        input.extend_from_slice(&[0; 16]);
        let r = pump.handle_input(&input, t0, Host::on_payload);
        assert_eq!(
            r,
            Err(PumpError::Frame(FrameError::TooLarge {
                len: u64::from(len)
            }))
        );
        let sent = transmits(&mut pump);
        assert!(
            matches!(&sent[..], [(Message::Error(e), Some(ErrorCode::FrameTooLarge))]
                if e.code == ErrorCode::FrameTooLarge),
            "{sent:?}"
        );
        assert_eq!(
            pump.take_close(),
            Some(CloseReason::Failed(Failure::Permanent))
        );
        assert_eq!(pump.deadline(), None, "the session is closed");
        // Nothing more is decoded.
        let mut fed = false;
        let _ = pump.handle_input(&framed(&[hello(t0)]), t0, |s, p, now| {
            fed = true;
            s.on_payload(p, now)
        });
        assert!(!fed);
    }

    #[test]
    fn input_after_a_close_is_not_decoded() {
        let t0 = Instant::now();
        let mut pump = host(t0);
        // The second hello is never read: the first one's answer to an
        // unknown message closed the session.
        let bad = Message::Ping(Ping { sequence: 1 })
            .encode()
            .unwrap()
            .to_vec();
        let mut fed = 0;
        pump.handle_input(&framed(&[bad, hello(t0)]), t0, |s, p, now| {
            fed += 1;
            s.on_payload(p, now)
        })
        .unwrap();
        assert_eq!(fed, 1);
        let sent = transmits(&mut pump);
        assert!(
            matches!(sent[..], [(Message::Error(_), Some(_))]),
            "{sent:?}"
        );
        assert!(pump.take_close().is_some());
    }

    #[test]
    fn the_deadline_is_the_sessions_and_its_expiry_is_fed_to_it() {
        let t0 = Instant::now();
        let (guest, first) = Guest::start(pair::guest_config(1, 1), EXPORTER, [3; 32], t0);
        let mut pump = Pump::new(guest, first);
        assert_eq!(pump.deadline(), Some(t0 + AWAIT_CHALLENGE_TIMEOUT));
        let sent = transmits(&mut pump);
        assert!(matches!(sent[..], [(Message::Hello(_), None)]), "{sent:?}");
        pump.handle_timeout(t0 + AWAIT_CHALLENGE_TIMEOUT);
        let sent = transmits(&mut pump);
        assert!(
            matches!(sent[..], [(Message::Error(_), Some(ErrorCode::Timeout))]),
            "{sent:?}"
        );
        assert!(matches!(
            pump.take_close(),
            Some(CloseReason::Failed(Failure::Code {
                code: ErrorCode::Timeout,
                ..
            }))
        ));
        assert_eq!(pump.deadline(), None);
        assert!(pump.take_close().is_none(), "taken once");
    }

    #[test]
    fn a_stream_that_ends_inside_a_frame_is_reported_and_closes() {
        let t0 = Instant::now();
        let mut pump = host(t0);
        let bytes = framed(&[hello(t0)]);
        pump.handle_input(&bytes[..6], t0, Host::on_payload)
            .unwrap();
        assert!(matches!(
            pump.handle_eof(),
            Err(PumpError::Frame(FrameError::Truncated { .. }))
        ));
        assert_eq!(pump.deadline(), None);
        assert!(pump.take_close().is_some());
        assert!(pump.poll_transmit().is_none(), "nothing can be sent");
        // A clean end is not an error.
        let mut pump = host(t0);
        assert_eq!(pump.handle_eof(), Ok(()));
    }

    #[test]
    fn the_pair_reaches_established_through_two_pumps() {
        // The guest and host pumps wired together, as the agents wire them
        // to a TLS stream, with the pair's local work standing in for the
        // TPM and the verifier.
        let t0 = Instant::now();
        let (guest, first) = Guest::start(pair::guest_config(1, 1), EXPORTER, [3; 32], t0);
        let mut g = Pump::new(guest, first);
        let mut h = host(t0);
        for _ in 0..10 {
            let wire: Vec<u8> = std::iter::from_fn(|| g.poll_transmit())
                .flat_map(|t| t.frame().to_vec())
                .collect();
            h.handle_input(&wire, t0, Host::on_payload).unwrap();
            while let Some(ev) = h.poll_event() {
                if let HostEvent::Verify { .. } = ev.unwrap() {
                    h.step(|s| s.on_verdict(crate::session::host::Verdict::Accepted, t0));
                }
            }
            let wire: Vec<u8> = std::iter::from_fn(|| h.poll_transmit())
                .flat_map(|t| t.frame().to_vec())
                .collect();
            g.handle_input(&wire, t0, Guest::on_payload).unwrap();
            while let Some(ev) = g.poll_event() {
                if let GuestEvent::QuoteNeeded {
                    qualifying_data, ..
                } = ev.unwrap()
                {
                    g.step(|s| s.on_quote(Some(pair::evidence_for(qualifying_data)), t0));
                }
            }
        }
        assert!(matches!(h.session(), Host::Established(_)));
        assert!(g.session().is_established());
        // Settled and written: an idle pump holds no queue capacity.
        for held in [h.held_capacity(), g.held_capacity()] {
            assert_eq!(held, 0);
        }
    }

    /// A session whose every event asks for another: no real session does
    /// this (their chains settle within three rounds), so the round bound
    /// is shown with this one.
    #[derive(Debug)]
    struct Chain;

    impl Session for Chain {
        type Event = usize;
        fn on_payload(self, _: &[u8], _: Instant) -> (Self, Output<usize>) {
            (self, Output::default())
        }
        fn on_timeout(self, _: Instant) -> (Self, Output<usize>) {
            let mut out = Output::default();
            out.event(1);
            (self, out)
        }
        fn on_transport_closed(self) -> (Self, Output<usize>) {
            (self, Output::default())
        }
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn closed() -> Self {
            Chain
        }
    }

    /// Handles events as a driver does: event `n` asks for event `n + 1`
    /// until `last`. Returns the events handled and the error, if any.
    fn drive(pump: &mut Pump<Chain>, last: usize) -> (Vec<usize>, Option<PumpError>) {
        let mut seen = Vec::new();
        while let Some(ev) = pump.poll_event() {
            match ev {
                Ok(n) => {
                    seen.push(n);
                    if n < last {
                        let mut out = Output::default();
                        out.event(n + 1);
                        out.event(n + 1);
                        pump.absorb(out);
                    }
                }
                Err(e) => return (seen, Some(e)),
            }
        }
        (seen, None)
    }

    #[test]
    fn events_that_settle_within_the_round_bound_are_all_handed_out() {
        let mut pump = Pump::new(Chain, Output::default());
        pump.handle_timeout(Instant::now());
        let (seen, err) = drive(&mut pump, 4);
        assert_eq!(err, None);
        // Round by round: 1, then the two 2s, then the four 3s, ...
        assert_eq!(seen.len(), 1 + 2 + 4 + 8);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert!(!pump.is_closing());
        // The count starts again once the events settled.
        let mut pump2 = Pump::new(Chain, Output::default());
        pump2.handle_timeout(Instant::now());
        assert_eq!(drive(&mut pump2, MAX_EVENT_ROUNDS).1, None);
        pump2.handle_timeout(Instant::now());
        assert_eq!(drive(&mut pump2, MAX_EVENT_ROUNDS).1, None);
    }

    #[test]
    fn events_that_do_not_settle_close_the_session_with_internal() {
        let mut pump = Pump::new(Chain, Output::default());
        pump.handle_timeout(Instant::now());
        let (seen, err) = drive(&mut pump, usize::MAX);
        assert_eq!(err, Some(PumpError::EventRounds));
        assert_eq!(seen.iter().max(), Some(&MAX_EVENT_ROUNDS));
        assert!(!pump.has_events(), "the rest are dropped");
        let frames: Vec<Transmit> = std::iter::from_fn(|| pump.poll_transmit()).collect();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].error, Some(ErrorCode::Internal));
        assert_eq!(
            pump.take_close(),
            Some(CloseReason::Failed(Failure::Code {
                code: ErrorCode::Internal,
                retry_after: None
            }))
        );
    }
}
