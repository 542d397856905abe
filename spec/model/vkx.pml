/*
 * A Promela model of vkx protocol v1 (PROTOCOL.md), checked with SPIN.
 *
 * It models one guest and one host over a sequence of connections, with a
 * host that may misbehave in every way the guest must survive: speak an
 * unsupported version, send a message type the guest does not know (the
 * "unknown endpoint" of the incident in shared/CONTEXT.md), reject the
 * evidence, be busy, drop the connection; an operator meanwhile kills
 * and unkills key-release through the rollout document. Time is
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
 *  P5  the guest only uses a session after attestation succeeded;
 *  P6  (P-kill) once the guest has received a map (challenge or
 *      feature-update) in which key-release is not enabled, it sends no
 *      key request on that session until an enabling feature-update has
 *      come and its delay has elapsed (§12.3); a request already in flight
 *      when the host applied the kill is refused with feature-disabled
 *      (ERR_A), which is allowed (§12.2);
 *  P7  (P-jitter) no key request between the receipt of an enabling
 *      feature-update and the end of its re-enable delay, nor while a
 *      retry-after hold from a refusal runs (§12.3);
 *  P8  (P-rev) at admission (ROLLOUT.md §8): the accepted revision never
 *      decreases, the accepted document changes only with a strictly
 *      higher revision (a replay, or an edit at the same revision, never
 *      re-enables), and an unsigned document never widens (§8.1 there).
 *
 * The rollout is modelled for key-release alone, whose state is
 * "everyone" or "nobody" (ROLLOUT.md §8.1). The host starts from the
 * signed document r = 1 with key-release enabled. The Operator publishes
 * a kill at r+1, unsigned (narrowing), then an unkill at r+2, signed,
 * then optionally a kill again at r+3; stale or hostile deliveries come
 * with them: the signed r replayed, a concurrent signed edit at r+1, an
 * unsigned unkill, the kill replayed. Each step is a source's delivery,
 * the host's admission of it (ROLLOUT.md §8) and resolution (§5 there)
 * at once; since a refused document changes nothing, the stale
 * deliveries are explored right after the document they follow. When
 * the map it serves changes during an attested session, the host sends
 * feature-update (§12.2).
 * The U[0,10 s] re-enable delay and the retry-after hold are abstract:
 * each ends with a guest step that may come at any time after it began.
 * Ghost variables (gh_*) follow what the guest has received, apart from
 * its own logic, and are what P6 and P7 check.
 *
 * Seeded bugs that check.sh must see caught: P1 the host answers errors
 * with errors; P2 the guest does not go dormant; P4 it ignores the map;
 * P6 it ignores a feature-update that disables, or a kill does not cancel
 * a running delay; P7 it re-enables at once, or ends the delay while a
 * retry-after runs; P8 the host admits a lower revision, the same
 * revision, or an unsigned widening.
 *
 * Run: spin -a vkx.pml && gcc -O2 -o pan pan.c && ./pan -a -m200000
 * (make test runs check.sh, which requires "errors: 0").
 */

#define BUDGET    3   /* attempts per window (RETRY_BUDGET, scaled down) */
#define WINDOWS   2   /* windows the clock may advance */
#define TICKS     3   /* re-probe ticks the clock may advance */
#define TICKS_PER_WINDOW 2  /* REPROBE_INTERVAL fits twice in RETRY_WINDOW */
#ifndef MAXCONN
#define MAXCONN   8   /* connections explored in one run */
#endif

/* A challenge and a feature-update carry the map (§12.2): CHALON and
 * FEATON enable key-release, CHALOFF and FEATOFF do not. */
mtype = { HELLO, CHALON, CHALOFF, EVIDENCE, RESULT, KEYREQ, KEYREL,
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
bool key_release_enabled = true;  /* what the host serves (ROLLOUT.md §5) */
/* Host rollout state: the accepted document is r = 1, signed, with
 * key-release enabled (the state before the incident). */
byte accepted_rev = 1;
bool doc_on = true;       /* key-release in the accepted document */
byte live = 0;            /* the attested session, 0: none */
bool sent_on = true;      /* key-release in the map last sent the guest */
/* Ghost state for P6/P7: what the guest has received on this session,
 * set on receipt (recv), not by the guest's decisions. */
bool gh_off = false;      /* the last map received says not enabled */
bool gh_wait = false;     /* an enabling update came; its delay runs */
bool gh_held = false;     /* a refusal came; its retry-after runs */
bool attested = false;
bool guest_done = false;
bool time_exhausted = false;  /* the clock can show no more re-probe ticks */
/* Ghost state for P2, kept apart from the guest's own dormancy logic. */
bool perm_seen = false;
byte perm_tick = 0;

/* Admission (ROLLOUT.md §8) of a document abstracted to its revision,
 * whether it enables key-release, and whether it carries a signature that
 * verifies, then resolution (ROLLOUT.md §5). Unsigned, it is admitted only
 * if it narrows (§8.1): it disables, or key-release was enabled already. */
inline admit(rev, on, sg) {
  old_rev = accepted_rev; old_on = doc_on; was_on = key_release_enabled;
  if
  :: rev > accepted_rev && (sg || !on || doc_on) ->  /* §8 steps 3-5 */
     accepted_rev = rev; doc_on = on
  :: else -> skip             /* replay, or unsigned-widening: no change */
  fi;
  key_release_enabled = doc_on;
  assert(accepted_rev >= old_rev);                       /* P8 */
  assert(accepted_rev > old_rev || doc_on == old_on);    /* P8 */
  assert(sg || was_on || !key_release_enabled)           /* P8 */
}

/* The operator's edits (ROLLOUT.md §10), and what sources deliver besides.
 * Declared first, it is the process a search tries last: a mutant's
 * violation is then found within a few thousand states. */
active proctype Operator() {
  byte old_rev; bool old_on, was_on;
  atomic {
    admit(2, false, false);   /* kill: r+1, unsigned */
    if
    :: admit(1, true, true)   /* a stale source replays the signed r */
    :: admit(2, true, true)   /* a concurrent signed edit of r, also r+1 */
    :: skip
    fi;
    old_rev = 0; old_on = false; was_on = false };
  atomic {
    if
    :: admit(3, true, false)  /* an unkill without a signature */
    :: skip
    fi;
    admit(3, true, true);     /* unkill: r+2, signed */
    if
    :: admit(2, false, false) /* the kill replayed */
    :: admit(1, true, true)   /* the signed r replayed */
    :: skip
    fi;
    old_rev = 0; old_on = false; was_on = false };
  if
  :: atomic { admit(4, false, false);   /* kill again: r+3, unsigned */
              old_rev = 0; old_on = false; was_on = false }
  :: skip
  fi
}

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
  :: atomic { g2h?m,c ->     /* a reply is sent from the state at receipt */
     if
     :: m == HELLO ->
        live = 0; sent_on = true;       /* a new connection: no session */
        if
        :: atomic { sent_on = key_release_enabled;
                    if
                    :: sent_on -> h2g!CHALON,c
                    :: else -> h2g!CHALOFF,c
                    fi }
        :: h2g!ERR_P,c          /* unsupported-version / unmapped peer */
        :: h2g!UNKNOWN,c        /* a type the guest does not know */
        :: h2g!ERR_A,c          /* busy, with retry-after */
        :: h2g!CLOSE,c          /* transport failure */
        fi
     :: m == EVIDENCE ->
        if
        :: atomic { h2g!RESULT,c; live = c }   /* updates may follow (§6.16) */
        :: h2g!ERR_P,c          /* attestation-failed, opaque */
        :: h2g!CLOSE,c
        fi
     :: m == KEYREQ ->
        if
        :: key_release_enabled -> h2g!KEYREL,c
        :: else -> h2g!ERR_A,c  /* feature-disabled: request-scoped */
        fi
     :: else -> skip            /* P1: never answer an error or goodbye */
     fi;
     if
     :: m == GOODBYE || m == ERR_P -> live = 0   /* the session is over */
     :: else -> skip
     fi;
     m = 0; c = 0 }
  /* The map changed during an attested session: feature-update, never
   * before attestation-result (§6.16, §12.2). It may come some time after
   * the change; requests racing it are answered from the applied state. */
  :: atomic { live > 0 && sent_on != key_release_enabled && nfull(h2g) ->
       sent_on = key_release_enabled;
       if
       :: sent_on -> h2g!FEATON,live
       :: else -> h2g!FEATOFF,live
       fi }
  od
}

/* Receives the next message of the current connection. */
inline recv(m) {
  do
  :: h2g?m,c -> if
                :: c == conns -> observe(m); c = 0; break
                :: else -> c = 0     /* a closed connection's leftover */
                fi
  od
}

/* Ghost bookkeeping for P6/P7 on receipt of a message of the session. */
inline observe(m) {
  atomic {
    if
    :: m == CHALON || m == CHALOFF ->
       gh_off = (m == CHALOFF); gh_wait = false; gh_held = false
    :: m == FEATOFF -> gh_off = true; gh_wait = false
    :: m == FEATON && gh_off -> gh_off = false; gh_wait = true
    :: m == ERR_A -> gh_held = true
    :: else -> skip
    fi
  }
}

/* An enabling feature-update: the feature is used after the delay. */
inline reenable() {
  if
  :: !feature_on -> jitter = true
  :: else -> skip             /* it stays enabled: no delay */
  fi
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
  bool jitter;                /* an enabling update came; the delay runs */
  bool held;                  /* a retry-after for key-release runs */
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
       feature_on = false; jitter = false; held = false
     };
     g2h!HELLO,conns;
     recv(m);
     if
     :: m == CHALON || m == CHALOFF -> feature_on = (m == CHALON); g2h!EVIDENCE,conns
     :: m == UNKNOWN -> saw_permanent(); g2h!ERR_P,conns; go_dormant(); goto closed
     :: m == ERR_P -> saw_permanent(); go_dormant(); goto closed   /* P1: no reply */
     :: m == ERR_A || m == ERR_B || m == CLOSE -> goto closed
     :: else -> g2h!ERR_P,conns; go_dormant(); goto closed   /* unexpected */
     fi;
     recv(m);                    /* AwaitResult */
     if
     :: m == RESULT -> attested = true
     :: m == ERR_P -> saw_permanent(); go_dormant(); goto closed
     :: m == ERR_A || m == ERR_B || m == CLOSE -> goto closed
     :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
     fi;
     /* Established: use the session a little. */
     do
     :: feature_on ->
        assert(attested);                      /* P5 */
        assert(feature_on);                    /* P4 */
        assert(!gh_off);                       /* P6 */
        assert(!gh_wait);                      /* P7: the delay */
        assert(!gh_held);                      /* P7: the retry-after */
        g2h!KEYREQ,conns;
        do
        :: recv(m);
           if
           :: m == KEYREL -> break
           :: m == ERR_A -> feature_on = false; held = true; break  /* refused */
           :: m == FEATOFF -> feature_on = false; jitter = false   /* answer follows */
           :: m == FEATON -> reenable()
           :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
           fi
        od
     :: h2g?[m,eval(conns)] -> recv(m);
        if
        :: m == FEATOFF -> feature_on = false; jitter = false   /* kill */
        :: m == FEATON -> reenable()
        :: else -> g2h!ERR_P,conns; go_dormant(); goto closed
        fi
     /* Time passes: the delay U[0,10 s] elapses, but the feature is used
      * no earlier than the end of a running retry-after (§12.3). */
     :: atomic { jitter && !held -> jitter = false; gh_wait = false; feature_on = true }
     :: atomic { held -> held = false; gh_held = false }   /* retry-after over */
     :: g2h!GOODBYE,conns; break
     od;
closed:
     atomic { m = 0; attested = false; feature_on = false; jitter = false; held = false;
              gh_off = false; gh_wait = false; gh_held = false }
next:
     skip
  od;
  guest_done = true
}
