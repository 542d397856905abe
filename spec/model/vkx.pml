/*
 * A Promela model of vkx protocol v1 (PROTOCOL.md), checked with SPIN.
 *
 * It models one guest and one host over a sequence of connections, with a
 * host that may misbehave in every way the guest must survive: speak an
 * unsupported version, send a message type the guest does not know (the
 * "unknown endpoint" of the incident in shared/CONTEXT.md), reject the
 * evidence, be busy, flip the kill switch, drop the connection. Time is
 * abstract: a clock process advances "windows" and "re-probe ticks".
 *
 * Checked properties (assertions, plus SPIN's default checks for invalid
 * end states, i.e. deadlocks):
 *  P1  no error is ever answered with an error (no error ping-pong);
 *  P2  after a permanent error the guest makes no attempt until a
 *      re-probe tick has passed (no retry loop on unknown-message,
 *      unsupported-version, attestation-failed);
 *  P3  connection attempts per window never exceed BUDGET plus the
 *      re-probes that fit in a window (the 30 + 2 per hour of §13.9);
 *  P4  the guest never sends a key request while key release is not
 *      enabled in its current feature map;
 *  P5  the guest only uses a session after attestation succeeded.
 *
 * Run: spin -a vkx.pml && gcc -O2 -o pan pan.c && ./pan -a -m100000
 * (make test does this and requires "errors: 0").
 */

#define BUDGET    3   /* attempts per window (RETRY_BUDGET, scaled down) */
#define WINDOWS   2   /* windows the clock may advance */
#define TICKS     3   /* re-probe ticks the clock may advance */
#define TICKS_PER_WINDOW 2  /* REPROBE_INTERVAL fits twice in RETRY_WINDOW */
#define MAXCONN   8   /* connections explored in one run */

mtype = { HELLO, CHALLENGE, EVIDENCE, RESULT, KEYREQ, KEYREL,
          FEATOFF, FEATON, UNKNOWN, ERR_P, ERR_A, ERR_B, GOODBYE, CLOSE };

/* Each message carries the number of the connection it belongs to, so
 * that a late message of a closed connection is never read as part of the
 * next one (on the wire they are different streams). */
chan g2h = [2] of { mtype, byte };
chan h2g = [2] of { mtype, byte };

byte window = 0;          /* advanced by the clock */
byte tick = 0;            /* advanced by the clock */
byte attempts_in_window = 0;
byte conns = 0;           /* number of the current connection */
bool dormant = false;
byte dormant_tick = 0;    /* tick at which the guest went dormant */
bool key_release_enabled = true;
bool attested = false;
bool guest_done = false;
bool time_exhausted = false;  /* the clock can show no more re-probe ticks */
/* Ghost state for P2, kept apart from the guest's own dormancy logic. */
bool perm_seen = false;
byte perm_tick = 0;

/* The clock: windows and re-probe ticks pass, a bounded number of times. */
active proctype Clock() {
  byte w = 0; byte t = 0; byte in_window = 0;
end_clock:
  do
  :: w < WINDOWS -> atomic { w++; window++; attempts_in_window = 0; in_window = 0 }
  :: t < TICKS && in_window < TICKS_PER_WINDOW -> atomic { t++; tick++; in_window++ }
  :: atomic { w == WINDOWS && (t == TICKS || in_window == TICKS_PER_WINDOW) &&
              !time_exhausted -> time_exhausted = true }
  :: guest_done -> break
  od
}

/* The host: may choose any misbehaviour on each connection. */
active proctype Host() {
  mtype m; byte c;
end_idle:
  do
  :: g2h?m,c ->
     if
     :: m == HELLO ->
        if
        :: h2g!CHALLENGE,c
        :: h2g!ERR_P,c          /* unsupported-version / unmapped peer */
        :: h2g!UNKNOWN,c        /* a type the guest does not know */
        :: h2g!ERR_A,c          /* busy, with retry-after */
        :: h2g!CLOSE,c          /* transport failure */
        fi
     :: m == EVIDENCE ->
        if
        :: h2g!RESULT,c
        :: h2g!ERR_P,c          /* attestation-failed, opaque */
        :: h2g!CLOSE,c
        fi
     :: m == KEYREQ ->
        if
        :: key_release_enabled -> h2g!KEYREL,c
        :: else -> h2g!ERR_A,c  /* feature-disabled: request-scoped */
        fi
     :: else -> skip            /* P1: never answer an error or goodbye */
     fi
  /* The operator flips the kill switch; live sessions are told (§12). */
  :: atomic { attested && key_release_enabled && nfull(h2g) ->
              key_release_enabled = false; h2g!FEATOFF,conns }
  :: atomic { attested && !key_release_enabled && nfull(h2g) ->
              key_release_enabled = true; h2g!FEATON,conns }
  od
}

/* Receives the next message of the current connection. */
inline recv(m) {
  do
  :: h2g?m,c -> if
                :: c == conns -> break
                :: else -> skip      /* a closed connection's leftover */
                fi
  od
}

inline go_dormant() {
  atomic { dormant = true; dormant_tick = tick }
}

/* Records, for P2, that a permanent error ended the connection. */
inline saw_permanent() {
  atomic { perm_seen = true; perm_tick = tick }
}

/* The guest: one connection per iteration, governed by the retry rules. */
active proctype Guest() {
  mtype m; byte c;
  bool feature_on;
  do
  :: conns >= MAXCONN -> break
  :: conns < MAXCONN ->
     /* May we attempt? (§13) */
     if
     :: dormant ->
        if
        :: tick > dormant_tick -> dormant = false   /* P2: a re-probe tick passed */
        :: time_exhausted && tick == dormant_tick ->
           break                 /* the time the model can show has run out */
        fi
     :: !dormant && attempts_in_window >= BUDGET ->
        go_dormant();
        goto next
     :: !dormant && attempts_in_window < BUDGET -> skip
     fi;
     atomic {
       assert(!perm_seen || tick > perm_tick);     /* P2 */
       perm_seen = false;
       attempts_in_window++;
       assert(attempts_in_window <= BUDGET + TICKS_PER_WINDOW);   /* P3 */
       conns++;
       attested = false;
       feature_on = key_release_enabled
     };
     g2h!HELLO,conns;
     recv(m);
     if
     :: m == CHALLENGE -> g2h!EVIDENCE,conns
     :: m == UNKNOWN -> saw_permanent(); g2h!ERR_P,conns; go_dormant(); goto closed
     :: m == ERR_P -> saw_permanent(); go_dormant(); goto closed   /* P1: no reply */
     :: m == ERR_A || m == ERR_B || m == CLOSE -> goto closed
     :: else -> g2h!ERR_P,conns; go_dormant(); goto closed   /* unexpected */
     fi;
     do                          /* AwaitResult; feature pushes may come first */
     :: recv(m);
        if
        :: m == RESULT -> attested = true; break
        :: m == FEATOFF -> feature_on = false
        :: m == FEATON -> feature_on = true
        :: m == ERR_P -> saw_permanent(); go_dormant(); goto closed
        :: m == ERR_A || m == ERR_B || m == CLOSE -> goto closed
        :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
        fi
     od;
     /* Established: use the session a little. */
     do
     :: feature_on ->
        assert(attested);                      /* P5 */
        assert(feature_on);                    /* P4 */
        g2h!KEYREQ,conns;
        do
        :: recv(m);
           if
           :: m == KEYREL -> break
           :: m == ERR_A -> feature_on = false; break   /* held */
           :: m == FEATOFF -> feature_on = false         /* the answer follows */
           :: m == FEATON -> skip
           :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
           fi
        od
     :: h2g?[m,c] && c == conns -> recv(m);
        if
        :: m == FEATOFF -> feature_on = false
        :: m == FEATON -> feature_on = true
        :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
        fi
     :: g2h!GOODBYE,conns; break
     od;
closed:
     attested = false;
next:
     skip
  od;
  guest_done = true
}
