"""The process-level half of `make bench-peers`: Keylime's verifier and
registrar (7.14.3 from PyPI, unmodified, sqlite, no IMA, no measured boot)
attesting AGENTS pull-mode agents, each backed by its own swtpm vTPM.

    target/peers/venv/bin/python scripts/peers/keylime_process.py WORK_DIR [AGENTS] [SECONDS]

The agents are NOT rust-keylime (not on crates.io, and GitHub is not
reachable from the build machines): each is a minimal agent in this process
that answers Keylime's agent API from a real swtpm through tpm2-tools:

- start-up as the Keylime agent does it: an RSA EK (tpm2_createek) and an
  AK (tpm2_createak: ECC P-256, ECDSA-SHA256, the key type vkx uses), both
  made persistent; an RSA-2048 key pair of the agent (Keylime's NK, the key
  the verifier encrypts V to) whose PEM's SHA-256 is extended into PCR 16
  (Keylime's data PCR, which the verifier checks); PCRs 0 and 7 extended
  with the same events vkx's quotes see;
- registration with the registrar (POST /v2.6/agents/ID with the EK and AK
  TPM2B_PUBLIC), TPM2_ActivateCredential on the challenge
  (tpm2_activatecredential under a PolicySecret(endorsement) session), and
  the HMAC-SHA384 auth tag back (PUT .../activate);
- GET /v2.6/quotes/integrity: tpm2_quote with the AK over the PCRs of the
  mask, the nonce as qualifying data; the answer in the agent's JSON form
  (quote "r<attest>:<sig>:<pcrs>", hash/enc/sign algorithms, the NK PEM when
  partial=0);
- POST /v2.6/keys/vkey: accepted (the V half of Keylime's bootstrap key).

Then this script adds each agent to the verifier as the tenant would (POST
/v2.6/agents/ID over mTLS with the verifier's generated client certificate;
the AK as the agent registered it; tpm_policy: PCRs 0 and 7 at their values,
mask with 16 for the data PCR), with quote_interval = 0 so the verifier
re-attests every agent as fast as it can: saturation.

Figures over SECONDS (default 30, after a 10 s warm-up), 3 repeats, median:
verifier CPU per attestation (user+system of every verifier process, the
parent and its workers, from /proc/PID/stat, divided by the attestations
the agents served), attestations per second, and the per-agent attestation
cycle (p50, p99): the time from one quote request of the verifier to the
next one to the same agent, i.e. quote, transfer, verification and the
verifier's bookkeeping. The agents, swtpm and tpm2-tools share the machine
and are not counted in the verifier's CPU.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

API = "2.6"
AK_HANDLE = "0x81010002"
EK_HANDLE = "0x81010001"
PCR0_EVENT = "11" * 32  # as tests/examples/peer_quotes.rs
PCR7_EVENT = "77" * 32
WARMUP_S = 10
REPEATS = 3
START_TIMEOUT_S = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, **kw):
    p = subprocess.run(args, capture_output=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.decode(errors='replace')}")
    return p.stdout


# ---------------------------------------------------------------- configs


def write_configs(work, ports):
    kdir = os.path.join(work, "keylime")
    os.makedirs(kdir, exist_ok=True)
    verifier = f"""[verifier]
version = 2.6
uuid = default
ip = 127.0.0.1
port = {ports['verifier']}
registrar_ip = 127.0.0.1
registrar_port = {ports['registrar_tls']}
enable_agent_mtls = False
tls_dir = generate
server_key = default
server_key_password =
server_cert = default
cert_subject_alternative_names =
trusted_client_ca = default
client_key = default
client_key_password =
client_cert = default
trusted_server_ca = default
authorization_provider = simple
database_url = sqlite:///{kdir}/cv_data.sqlite
database_pool_sz_ovfl = 5,10
auto_migrate_db = True
num_workers = 0
exponential_backoff = True
retry_interval = 2
max_retries = 5
quote_interval = 0
max_upload_size = 104857600
request_timeout = 60.0
measured_boot_policy_name = accept-all
measured_boot_imports = []
measured_boot_evaluate = once
severity_labels = ["info", "notice", "warning", "error", "critical", "alert", "emergency"]
severity_policy = [{{"event_id": ".*", "severity_label": "emergency"}}]
ignore_tomtou_errors = False
durable_attestation_import =
persistent_store_url =
transparency_log_url =
time_stamp_authority_url =
time_stamp_authority_certs_path =
persistent_store_format = json
persistent_store_encoding =
transparency_log_sign_algo = sha256
signed_attributes =
require_allow_list_signatures = False
mode = pull
challenge_lifetime = 1800
verification_timeout = 0
session_create_rate_limit_per_ip = 50
session_create_rate_limit_window_ip = 60
session_create_rate_limit_per_agent = 15
session_create_rate_limit_window_agent = 60
session_lifetime = 180
extend_token_on_attestation = True
shutdown_drain_timeout = 5
nonce_lifetime = 60
auto_recover_attestation_failures = False

[revocations]
enabled_revocation_notifications = []
zmq_ip = 127.0.0.1
zmq_port = {free_port()}
webhook_url =
"""
    registrar = f"""[registrar]
version = 2.6
ip = 127.0.0.1
port = {ports['registrar']}
tls_port = {ports['registrar_tls']}
tls_dir = default
server_key = default
server_key_password =
server_cert = default
cert_subject_alternative_names =
trusted_client_ca = default
authorization_provider = simple
database_url = sqlite:///{kdir}/reg_data.sqlite
database_pool_sz_ovfl = 5,10
auto_migrate_db = True
durable_attestation_import =
persistent_store_url =
transparency_log_url =
time_stamp_authority_url =
time_stamp_authority_certs_path =
persistent_store_format = json
persistent_store_encoding =
transparency_log_sign_algo = sha256
signed_attributes =
tpm_identity = default
malformed_cert_action = warn
"""
    # The verifier generates its CA and certificates (tls_dir = generate).
    ca = """[ca]
version = 2.6
password = default
cert_country = US
cert_ca_name = Keylime Certificate Authority
cert_state = MA
cert_locality = Lexington
cert_organization = MITLL
cert_org_unit = 53
cert_ca_lifetime = 3650
cert_lifetime = 365
cert_bits = 2048
cert_crl_dist = http://localhost:38080/crl
"""
    # The verifier's default level: INFO, to stderr (a file per process).
    logging_conf = """[loggers]
keys = root,keylime

[handlers]
keys = consoleHandler

[formatters]
keys = formatter

[formatter_formatter]
format = %(asctime)s.%(msecs)03d - %(name)s - %(levelname)s - %(message)s
datefmt = %Y-%m-%d %H:%M:%S

[logger_root]
level = INFO
handlers = consoleHandler

[handler_consoleHandler]
class = StreamHandler
level = INFO
formatter = formatter
args = (sys.stdout,)

[logger_keylime]
level = INFO
qualname = keylime
handlers =
"""
    paths = {}
    for name, text in (("verifier", verifier), ("registrar", registrar), ("ca", ca), ("logging", logging_conf)):
        paths[name] = os.path.join(work, f"{name}.conf")
        with open(paths[name], "w") as f:
            f.write(text)
    env = dict(os.environ)
    env.update(
        KEYLIME_DIR=kdir,
        KEYLIME_VERIFIER_CONFIG=paths["verifier"],
        KEYLIME_REGISTRAR_CONFIG=paths["registrar"],
        KEYLIME_CA_CONFIG=paths["ca"],
        KEYLIME_LOGGING_CONFIG=paths["logging"],
    )
    return env, kdir


# ---------------------------------------------------------------- agent


class Agent:
    """One agent: its swtpm, its keys, its HTTP server, its counters."""

    def __init__(self, work, index, registrar_port):
        self.id = str(uuid.UUID(int=index + 1))
        self.dir = os.path.join(work, f"agent-{index}")
        os.makedirs(self.dir, exist_ok=True)
        self.tpm_port = free_port()
        self.swtpm = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={self.tpm_port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.tpm_port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={self.dir}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.tcti = f"swtpm:host=127.0.0.1,port={self.tpm_port}"
        self.registrar_port = registrar_port
        self.lock = threading.Lock()  # one TPM command sequence at a time
        self.requests = []  # monotonic times of the quote requests
        self.port = free_port()

    def tpm(self, *args):
        deadline = time.monotonic() + 10
        while True:
            try:
                return run(list(args) + ["-T", self.tcti])
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def f(self, name):
        return os.path.join(self.dir, name)

    def provision(self):
        self.tpm("tpm2_createek", "-c", EK_HANDLE, "-G", "rsa", "-u", self.f("ek.pub"))
        self.tpm(
            "tpm2_createak",
            "-C",
            EK_HANDLE,
            "-c",
            self.f("ak.ctx"),
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            self.f("ak.pub"),
            "-n",
            self.f("ak.name"),
        )
        self.tpm("tpm2_evictcontrol", "-C", "o", "-c", self.f("ak.ctx"), AK_HANDLE)
        self.tpm("tpm2_flushcontext", "-t")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pubkey = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        self.tpm("tpm2_pcrextend", f"16:sha256={hashlib.sha256(self.pubkey.encode()).hexdigest()}")
        self.tpm("tpm2_pcrextend", f"0:sha256={PCR0_EVENT}")
        self.tpm("tpm2_pcrextend", f"7:sha256={PCR7_EVENT}")
        out = self.tpm("tpm2_pcrread", "sha256:0,7", "-o", self.f("pcrs.bin"))
        data = open(self.f("pcrs.bin"), "rb").read()
        self.pcrs = {"0": data[:32].hex(), "7": data[32:64].hex()}
        del out
        with open(self.f("ek.pub"), "rb") as f:
            self.ek_tpm = base64.b64encode(f.read()).decode()
        with open(self.f("ak.pub"), "rb") as f:
            self.ak_tpm = base64.b64encode(f.read()).decode()

    def register(self):
        base = f"http://127.0.0.1:{self.registrar_port}/v{API}/agents/{self.id}"
        body = {"ek_tpm": self.ek_tpm, "aik_tpm": self.ak_tpm, "ip": "127.0.0.1", "port": self.port}
        blob = http_json("POST", base, body)["results"]["blob"]
        with open(self.f("cred.blob"), "wb") as f:
            f.write(base64.b64decode(blob))
        sess = self.f("session.ctx")
        self.tpm("tpm2_startauthsession", "--policy-session", "-S", sess)
        try:
            self.tpm("tpm2_policysecret", "-S", sess, "-c", "e")
            self.tpm(
                "tpm2_activatecredential",
                "-c",
                AK_HANDLE,
                "-C",
                EK_HANDLE,
                "-i",
                self.f("cred.blob"),
                "-o",
                self.f("secret.bin"),
                "-P",
                f"session:{sess}",
            )
        finally:
            self.tpm("tpm2_flushcontext", sess)
        secret = open(self.f("secret.bin"), "rb").read()
        key = base64.b64encode(secret)
        tag = hmac.new(key, self.id.encode(), hashlib.sha384).hexdigest()
        http_json("PUT", base + "/activate", {"auth_tag": tag})

    def quote(self, nonce, mask, partial):
        pcrs = [i for i in range(24) if mask >> i & 1]
        with self.lock:
            self.requests.append(time.monotonic())
            self.tpm(
                "tpm2_quote",
                "-c",
                AK_HANDLE,
                "-l",
                "sha256:" + ",".join(map(str, pcrs)),
                "-q",
                nonce.encode().hex(),
                "-m",
                self.f("q.msg"),
                "-s",
                self.f("q.sig"),
                "-o",
                self.f("q.pcrs"),
                "-g",
                "sha256",
            )
            parts = [base64.b64encode(open(self.f(n), "rb").read()).decode() for n in ("q.msg", "q.sig", "q.pcrs")]
        results = {
            "quote": "r" + ":".join(parts),
            "hash_alg": "sha256",
            "enc_alg": "rsa",
            "sign_alg": "ecdsa",
            "boottime": 0,
        }
        if not partial:
            results["pubkey"] = self.pubkey
        return results

    def serve(self):
        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_):
                pass

            def answer(self, code, results):
                body = json.dumps({"code": code, "status": "Success" if code == 200 else "Error", "results": results})
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                u = urlparse(self.path)
                if u.path.endswith("/quotes/integrity"):
                    q = parse_qs(u.query)
                    try:
                        r = agent.quote(q["nonce"][0], int(q["mask"][0], 16), q.get("partial", ["1"])[0] == "1")
                    except Exception as e:  # noqa: BLE001 (the verifier sees a 500)
                        print(f"agent {agent.id}: quote failed: {e}", file=sys.stderr)
                        self.answer(500, {})
                        return
                    self.answer(200, r)
                elif u.path.endswith("/version"):
                    self.answer(200, {"supported_version": API})
                else:
                    self.answer(404, {})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(n)
                self.answer(200 if self.path.endswith("/keys/vkey") else 404, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if hasattr(self, "server"):
            self.server.shutdown()
        self.swtpm.terminate()
        self.swtpm.wait()


# ---------------------------------------------------------------- HTTP


def http_json(method, url, body=None, context=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, context=context, timeout=30) as r:
        return json.loads(r.read())


def wait_port(port, proc, name):
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on {port}")


def mtls_context(kdir):
    ca = os.path.join(kdir, "cv_ca")
    ctx = ssl.create_default_context(cafile=os.path.join(ca, "cacert.crt"))
    ctx.load_cert_chain(os.path.join(ca, "client-cert.crt"), os.path.join(ca, "client-private.pem"))
    ctx.check_hostname = False
    return ctx


# ---------------------------------------------------------------- CPU


def tree_cpu_s(root):
    """user+system seconds of `root` and every live descendant."""
    children = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append((int(p), fields))
    total = 0
    stack = [root]
    try:
        fields = open(f"/proc/{root}/stat").read()
        fields = fields[fields.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    except OSError:
        pass
    while stack:
        for pid, f in children.get(stack.pop(), []):
            total += int(f[11]) + int(f[12])
            stack.append(pid)
    return total / CLK_TCK


def pct(v, p):
    s = sorted(v)
    return s[min(len(s) - 1, int(len(s) * p))]


# ---------------------------------------------------------------- main


def main():
    work = os.path.abspath(sys.argv[1])
    n_agents = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 30
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ports = {"verifier": free_port(), "registrar": free_port(), "registrar_tls": free_port()}
    env, kdir = write_configs(work, ports)
    venv_bin = os.path.dirname(sys.executable)
    procs = []
    agents = []
    try:
        vlog = open(os.path.join(work, "verifier.log"), "w")
        verifier = subprocess.Popen([os.path.join(venv_bin, "keylime_verifier")], env=env, stdout=vlog, stderr=vlog)
        procs.append(verifier)
        wait_port(ports["verifier"], verifier, "keylime_verifier")
        rlog = open(os.path.join(work, "registrar.log"), "w")
        registrar = subprocess.Popen(
            [os.path.join(venv_bin, "keylime_registrar")], env=env, stdout=rlog, stderr=rlog
        )
        procs.append(registrar)
        wait_port(ports["registrar"], registrar, "keylime_registrar")

        for i in range(n_agents):
            a = Agent(work, i, ports["registrar"])
            agents.append(a)
            a.provision()
            a.serve()
            a.register()
        print(f"{n_agents} agents registered with the Keylime registrar (activate-credential done)")

        ctx = mtls_context(kdir)
        for a in agents:
            mask = (1 << 0) | (1 << 7) | (1 << 16)
            policy = {"0": [a.pcrs["0"]], "7": [a.pcrs["7"]], "mask": hex(mask)}
            body = {
                "v": base64.b64encode(os.urandom(32)).decode(),
                "cloudagent_ip": "127.0.0.1",
                "cloudagent_port": a.port,
                "tpm_policy": json.dumps(policy),
                "runtime_policy": "",
                "runtime_policy_name": "",
                "runtime_policy_key": "",
                "mb_policy": "",
                "mb_policy_name": "",
                "ima_sign_verification_keys": "",
                "metadata": "{}",
                "revocation_key": "",
                "accept_tpm_hash_algs": ["sha256"],
                "accept_tpm_encryption_algs": ["rsa", "ecc"],
                "accept_tpm_signing_algs": ["ecdsa"],
                "ak_tpm": a.ak_tpm,
                "mtls_cert": "disabled",
                "supported_version": API,
            }
            http_json("POST", f"https://127.0.0.1:{ports['verifier']}/v{API}/agents/{a.id}", body, ctx)
        print(f"{n_agents} agents added to the Keylime verifier (quote_interval = 0); warming up {WARMUP_S} s")
        time.sleep(WARMUP_S)

        runs = []
        for r in range(REPEATS):
            marks = [len(a.requests) for a in agents]
            cpu0 = tree_cpu_s(verifier.pid)
            t0 = time.monotonic()
            time.sleep(seconds)
            cpu1 = tree_cpu_s(verifier.pid)
            t1 = time.monotonic()
            done = sum(len(a.requests) - m for a, m in zip(agents, marks))
            cycles = []
            for a, m in zip(agents, marks):
                reqs = a.requests[m:]
                cycles += [(b - a_) * 1e3 for a_, b in zip(reqs, reqs[1:])]
            run_ = {
                "attestations": done,
                "per_s": done / (t1 - t0),
                "verifier_cpu_ms_per_attestation": (cpu1 - cpu0) * 1e3 / max(done, 1),
                "verifier_cpu_share": (cpu1 - cpu0) / (t1 - t0),
                "cycle_p50_ms": pct(cycles, 0.5) if cycles else float("nan"),
                "cycle_p99_ms": pct(cycles, 0.99) if cycles else float("nan"),
            }
            runs.append(run_)
            print(
                f"  run {r + 1}: {done} attestations in {t1 - t0:.1f} s = {run_['per_s']:.1f}/s; verifier CPU "
                f"{run_['verifier_cpu_ms_per_attestation']:.2f} ms per attestation ({run_['verifier_cpu_share'] * 100:.0f} % of one core); "
                f"cycle p50 {run_['cycle_p50_ms']:.1f} ms, p99 {run_['cycle_p99_ms']:.1f} ms"
            )

        # Every agent must still be attesting (state 'Get Quote', 3 / 'Provide V', 4).
        states = {}
        for a in agents:
            st = http_json("GET", f"https://127.0.0.1:{ports['verifier']}/v{API}/agents/{a.id}", None, ctx)
            states[a.id] = st["results"].get("operational_state")
        bad = {k: v for k, v in states.items() if v not in (3, 4, "Get Quote", "Provide V")}

        def med(key):
            return sorted(r[key] for r in runs)[len(runs) // 2]

        summary = {k: med(k) for k in runs[0]}
        summary["runs"] = runs
        summary["agents"] = n_agents
        summary["seconds"] = seconds
        summary["states"] = states
        with open(os.path.join(work, "keylime_process.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"Keylime verifier, {n_agents} agents, median of {REPEATS} x {seconds:.0f} s: "
            f"{summary['verifier_cpu_ms_per_attestation']:.2f} ms verifier CPU per attestation, "
            f"{summary['per_s']:.1f} attestations/s, cycle p50 {summary['cycle_p50_ms']:.1f} ms, "
            f"p99 {summary['cycle_p99_ms']:.1f} ms"
        )
        if bad:
            print(f"agents not attesting at the end: {bad}", file=sys.stderr)
            sys.exit(1)
    finally:
        # The verifier first: it would poll agents whose swtpm is gone.
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for a in agents:
            a.stop()


if __name__ == "__main__":
    main()
