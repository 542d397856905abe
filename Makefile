# vkx: the two set-up commands for a fresh Debian machine (as root) are
#   make demo   and   make test
# Both install what they need first. See README.md.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# Debian packages the build and tests need: the TSS libraries tss-esapi
# links against, swtpm as every test's TPM, tpm2-tools as the independent
# cross-check, spin for the protocol model, systemd for `systemd-analyze
# verify` of the units the agents ship, strace to hold the agents' system
# calls against those units' filters, etcd (server and etcdctl) as the
# fleet store of the rollout tests, protoc for etcd-client's build.
APT_PACKAGES ?= pkg-config libtss2-dev libtss2-tcti-swtpm0 swtpm swtpm-tools tpm2-tools spin systemd \
	strace etcd-server etcd-client protobuf-compiler
# Fuzzing (README "Fuzzing the parser"): seconds per target for
# fuzz-smoke (run by `make lint`) and for the release run `make fuzz`.
FUZZ_SMOKE_SECONDS ?= 5
FUZZ_SECONDS ?= 3600
FUZZ_TARGETS ?= message_decode frame_decoder tpm_parse host_session guest_session session_pair
# Size cap of each target's committed, minimised corpus (fuzz/seeds/<target>).
FUZZ_SEEDS_MAX_KIB ?= 256
FUZZ_RUN = RUSTC_BOOTSTRAP=1 $(CARGO) fuzz

.PHONY: all test chaos drill lint demo bench bench-peers peers-venv profile package package-test vm-test deps rust-components deny-tools package-tools fuzz-tools fuzz-corpus fuzz-smoke fuzz fuzz-run fuzz-coverage fmt clean

all: test

## deps: install missing Debian packages (apt-get) and Rust components.
deps: rust-components
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

rust-components:
	@for c in rustfmt clippy; do \
	  rustup component list --installed 2>/dev/null | grep -q "^$$c" || rustup component add $$c; \
	done

## test: the whole test suite (unit, property, vector, swtpm end-to-end,
## model check).
test: deps
	$(CARGO) build --workspace --bins --locked
	$(CARGO) test --workspace --locked
	# The software vTPM of the load generator, against our verifier and tpm2_checkquote;
	# a reset the session's reader cannot see ends a real session (soft-vTPM guest).
	$(CARGO) test --locked -p vkx-e2e --features insecure-soft-tpm --test softtpm --test transport_reset --lib
	# Chaos case c, the reconnect herd: 1,024 soft-vTPM guests (reduced: guest clock 8x).
	$(CARGO) test --locked -p vkx-e2e --features insecure-soft-tpm --test chaos_cd -- c_reconnect_herd
	# Chaos case g, the kill switch flipped under live sessions (reduced: 128 soft-vTPM
	# guests, file and etcd sources), and the ring advance (64 guests).
	$(CARGO) test --locked -p vkx-e2e --features insecure-soft-tpm --test chaos_g -- --test-threads=1
	# The drills at reduced size through the real binary (tests/tests/drill.rs).
	$(CARGO) test --locked -p vkx-e2e --test drill -- --test-threads=1
	# The fuzz targets are a separate workspace: make sure they still build.
	$(CARGO) check --manifest-path fuzz/Cargo.toml --locked --quiet
	# The protocol model, and proof that it catches seeded bugs.
	bash spec/model/check.sh
	python3 scripts/check-logging.py --self-test
	python3 scripts/check-logging.py
	# The guest agent in a real VM, from the packages: boot and unlock only
	# (scripts/vm-test.sh unlock; about 1-3 min warm, about 10 min cold: README).
	$(MAKE) --no-print-directory package
	bash scripts/vm-test.sh unlock
	@echo "make test: all passed"

## chaos: the fault-injection suite at full size (tests/tests/chaos_ab.rs,
## chaos_ef.rs, chaos_cd.rs and chaos_g.rs; cases c and g need the soft vTPM feature,
## c about 8 minutes),
## then its table: each case's measured figure beside its bound. The
## table is printed even when a case fails; the target then fails too.
## `make test` runs the same suite at reduced size.
chaos: deps
	$(CARGO) build --workspace --bins --locked
	status=0; VKX_CHAOS_FULL=1 $(CARGO) test -p vkx-e2e --features insecure-soft-tpm --test chaos_ab --test chaos_ef --test chaos_cd --test chaos_g --locked -- --test-threads=1 || status=$$?; \
	$(CARGO) run --quiet --locked -p vkx-e2e --example chaos_report || status=1; \
	exit $$status

## drill: every drill scenario at full size (`vkx-host drill`): each
## prints its timeline and SLO verdict and writes its picture to
## target/drill/; the target fails if any SLO is missed.
DRILL_SCENARIOS ?= clean seed-incident etcd-loss kill-under-load live
drill: deps
	$(CARGO) build --locked -p vkx-host
	mkdir -p target/drill
	status=0; for s in $(DRILL_SCENARIOS); do \
	  $${CARGO_TARGET_DIR:-target}/debug/vkx-host drill --scenario $$s --size full --out target/drill || status=1; \
	done; exit $$status

## lint: formatting, the dependency policy (deny.toml: licences, banned
## crates, crates.io only) and clippy with warnings as errors, on everything.
lint: rust-components deny-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	# No advisories check (it fetches the advisory database). Duplicate versions
	# are warnings; without --hide-inclusion-graph cargo-deny shows who pulls a crate in.
	$(CARGO) deny --locked check --hide-inclusion-graph licenses bans sources
	$(CARGO) deny --locked --manifest-path fuzz/Cargo.toml --config deny.toml check --hide-inclusion-graph licenses bans sources
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p vkx-e2e --all-targets --features insecure-soft-tpm --locked -- -D warnings
	$(CARGO) clippy --manifest-path fuzz/Cargo.toml --locked -- -D warnings
	python3 scripts/check-logging.py --self-test
	python3 scripts/check-logging.py
	# No import circles between a crate's modules (scripts/import-cycles.py).
	python3 scripts/import-cycles.py --self-test
	python3 scripts/import-cycles.py
	# Every fuzz target, differential ones included, for FUZZ_SMOKE_SECONDS each.
	$(MAKE) fuzz-smoke

fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml

## demo: the main job end to end on this machine: swtpm as a VM's vTPM,
## provisioning, the guest's quote, the host's verdict (scripts/demo.sh).
demo: deps
	$(CARGO) build --bins --locked --quiet
	bash scripts/demo.sh

## bench: performance figures (criterion); prints the numbers.
bench: deps
	$(CARGO) bench -p vkx-common --bench codec -- --noplot
	$(CARGO) bench -p vkx-common --bench verify -- --noplot
	# The examples run the release agents; they never build them themselves.
	$(CARGO) build --release --workspace --bins --locked --quiet
	$(CARGO) run --release --quiet -p vkx-e2e --example agent_bench
	$(CARGO) run --release --quiet -p vkx-e2e --features insecure-soft-tpm --example storm
	# The kill switch's propagation to 1,000 in-process hosts (each the real rollout code with its
	# own etcd watch; then one shared file): put -> applied on all, over 50 flips.
	$(CARGO) run --release --quiet -p vkx-e2e --example rollout_propagation

## package: vkx-host_*.deb and vkx-guest_*.deb in target/debian/ (release
## binaries, units, sysusers files, /etc/vkx conffiles, examples, man pages,
## completions, a copyright naming every linked crate's licence), checked by
## lintian (errors and warnings fail). scripts/package.sh.
package: deps package-tools
	bash scripts/package.sh

## package-test: the packages installed, upgraded (to revision 2) and purged
## in a clean Debian root (mmdebstrap, cached in target/pkgroot/): users,
## disabled units, conffiles kept across the upgrade, /var/lib/vkx untouched,
## nothing left after purge. scripts/package-test.sh.
package-test: package
	bash scripts/package-test.sh

## vm-test: the guest agent in a real VM (QEMU TCG, OVMF, a systemd-stub
## UKI, swtpm vTPM, vhost-device-vsock), built from the packages: boot and
## unlock of a LUKS2 volume by vkx-guest-once with the timeline, the daemon
## (rotation, host restart), tampered boots refused, a cold and a live
## snapshot restored. Installs its tools; the image is cached in target/vm/.
## scripts/vm-test.sh, scripts/vm-image.sh.
vm-test: package
	bash scripts/vm-test.sh

# cargo-deb and lintian for `make package`, cargo-deb pinned like cargo-deny.
CARGO_DEB_VERSION := 3.8.0
package-tools:
	@dpkg -s lintian >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian; }
	@[ "$$($(CARGO) deb --version 2>/dev/null)" = "cargo-deb $(CARGO_DEB_VERSION)" ] || \
	  $(CARGO) install cargo-deb --locked --version $(CARGO_DEB_VERSION)

## bench-peers: vkx side by side with Keylime on this machine (README,
## "Side by side with Keylime"); not part of `make test`. Installs what it
## needs: swtpm and tpm2-tools (Debian, via deps), python3-venv and
## python3-gpg (Debian: Keylime imports gpg, which PyPI ships only as
## source), and a venv under target/peers/ with Keylime 7.14.3 from PyPI
## (scripts/peers/requirements.txt, pinned). Function level: the same
## recorded swtpm quotes and tampered cases through both verifiers.
## Process level: Keylime's verifier and registrar attesting PEERS_AGENTS
## minimal agents on swtpm (scripts/peers/keylime_process.py), 3 windows
## of PEERS_SECONDS; then vkx's `storm` 3 times; the table of medians.
PEERS_DIR ?= target/peers
PEERS_VENV := $(PEERS_DIR)/venv
PEERS_ITERATIONS ?= 20000
PEERS_KEYLIME_ITERATIONS ?= 5000
PEERS_AGENTS ?= 8
PEERS_SECONDS ?= 30
peers-venv: deps
	@missing=""; for p in python3-venv python3-gpg; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	# Debian's python3 (python3-gpg is built for it); the system site-packages only
	# for gpg: everything else is pinned in the venv.
	[ -x $(PEERS_VENV)/bin/python ] || /usr/bin/python3 -m venv --system-site-packages $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q -r scripts/peers/requirements.txt

bench-peers: peers-venv
	$(CARGO) build --release --workspace --bins --locked --quiet
	$(CARGO) run --release --quiet --locked -p vkx-e2e --example peer_quotes -- $(PEERS_DIR)/quotes $(PEERS_ITERATIONS)
	$(PEERS_VENV)/bin/python scripts/peers/keylime_quotes.py $(PEERS_DIR)/quotes $(PEERS_KEYLIME_ITERATIONS)
	$(PEERS_VENV)/bin/python scripts/peers/keylime_process.py $(PEERS_DIR)/process $(PEERS_AGENTS) $(PEERS_SECONDS)
	for i in 1 2 3; do \
	  $(CARGO) run --release --quiet --locked -p vkx-e2e --features insecure-soft-tpm --example storm > $(PEERS_DIR)/storm-$$i.log; \
	done
	python3 scripts/peers/summary.py $(PEERS_DIR)/process/keylime_process.json $(PEERS_DIR)/storm-1.log $(PEERS_DIR)/storm-2.log $(PEERS_DIR)/storm-3.log

## profile: perf profile of the host during storm (a) of `make bench`,
## sorted by cause (the README's breakdown); scripts/profile-storm.sh.
profile: deps
	bash scripts/profile-storm.sh

# cargo-deny for `make lint`, pinned (0.20.2 needs Rust 1.88; a different
# installed version is replaced, so every machine applies deny.toml alike).
CARGO_DENY_VERSION := 0.20.2
deny-tools:
	@[ "$$($(CARGO) deny --version 2>/dev/null)" = "cargo-deny $(CARGO_DENY_VERSION)" ] || \
	  $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION)

fuzz-tools: rust-components
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked --version 0.13.2
	@rustup component list --installed 2>/dev/null | grep -q '^llvm-tools' || rustup component add llvm-tools-preview

## fuzz-corpus: the working corpora fuzz/corpus/<target> (not committed):
## seeds generated from spec/vectors plus the committed, minimised corpora
## fuzz/seeds/<target>. Existing working corpora are kept (resumable).
fuzz-corpus:
	python3 fuzz/seed-corpus.py fuzz/corpus
	for t in $(FUZZ_TARGETS); do mkdir -p fuzz/corpus/$$t fuzz/seeds/$$t; \
	  cp -n fuzz/seeds/$$t/* fuzz/corpus/$$t/ 2>/dev/null || true; done

## fuzz-smoke: each fuzz target for FUZZ_SMOKE_SECONDS (default 5 s), from
## the working corpus and every regression input; stops at the first failure.
fuzz-smoke: fuzz-tools fuzz-corpus
	$(MAKE) fuzz-run FUZZ_RUN_SECONDS=$(FUZZ_SMOKE_SECONDS)

## fuzz: the release run, FUZZ_SECONDS (default 3,600 s = 1 CPU-hour) per
## target. Resumable: it continues from the working corpus fuzz/corpus,
## then minimises it (cargo fuzz cmin) into fuzz/seeds/<target>, capped at
## FUZZ_SEEDS_MAX_KIB. Commit fuzz/seeds afterwards.
fuzz: fuzz-tools fuzz-corpus
	$(MAKE) fuzz-run FUZZ_RUN_SECONDS=$(FUZZ_SECONDS)
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  $(FUZZ_RUN) cmin $$t corpus/$$t -- -max_len=8192 2>&1 | grep -E '^MERGE-OUTER: [0-9]+ new files' || true; \
	  python3 keep-seeds.py corpus/$$t seeds/$$t $(FUZZ_SEEDS_MAX_KIB); \
	done

fuzz-run:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  echo "== $$t ($(FUZZ_RUN_SECONDS) s)"; \
	  $(FUZZ_RUN) run $$t corpus/$$t regressions/$$t -- \
	    -max_total_time=$(FUZZ_RUN_SECONDS) -max_len=8192 -rss_limit_mb=1024 -print_final_stats=1 \
	    > ../target/fuzz-$$t.log 2>&1 || { tail -40 ../target/fuzz-$$t.log; exit 1; }; \
	  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done' ../target/fuzz-$$t.log; \
	done

## fuzz-coverage: an HTML line/region coverage report per target,
## target/fuzz-coverage/<target>/index.html, over its working corpus and
## regressions, and a table of the coverage of the files each target is
## there to exercise (fuzz/coverage-table.py). One instrumented build
## (no sanitizer: coverage needs none), shared by the six targets; the raw
## profiles are removed, the merged one stays in fuzz/coverage/<target>.
FUZZ_COVERAGE_DIR ?= target/fuzz-coverage
fuzz-coverage: fuzz-tools fuzz-corpus
	host=$$(rustc -vV | sed -n 's/^host: //p'); llvm=$$(rustc --print sysroot)/lib/rustlib/$$host/bin; \
	test -x $$llvm/llvm-cov || { echo "no llvm-cov in $$llvm (rustup component add llvm-tools-preview)"; exit 1; }; \
	for t in $(FUZZ_TARGETS); do \
	  echo "== $$t"; \
	  (cd fuzz && $(FUZZ_RUN) coverage --sanitizer none $$t corpus/$$t regressions/$$t) \
	    > target/fuzz-coverage-$$t.log 2>&1 || { tail -20 target/fuzz-coverage-$$t.log; exit 1; }; \
	  rm -rf fuzz/coverage/$$t/raw $(FUZZ_COVERAGE_DIR)/$$t; \
	  bin=fuzz/target/$$host/coverage/$$host/release/$$t; \
	  cov="$$bin -instr-profile=fuzz/coverage/$$t/coverage.profdata -ignore-filename-regex=/(\.cargo|rustc|fuzz_targets|testing)/"; \
	  $$llvm/llvm-cov show $$cov -format=html -show-line-counts-or-regions -output-dir=$(FUZZ_COVERAGE_DIR)/$$t; \
	  $$llvm/llvm-cov export $$cov -summary-only > $(FUZZ_COVERAGE_DIR)/$$t/summary.json; \
	done
	python3 fuzz/coverage-table.py $(FUZZ_COVERAGE_DIR) $(FUZZ_TARGETS)

clean:
	$(CARGO) clean
	rm -rf fuzz/target fuzz/corpus fuzz/artifacts fuzz/coverage
