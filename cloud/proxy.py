"""The TLS proxy in front of Serve's plaintext gRPC port: Debian's nginx terminates mTLS,
checks each device's client certificate against the fleet CA and its CRL (`cloud.pki`), and
forwards the call with the verified device id and the proxy's token as metadata
(`cloud.identity`), replacing whatever a client sent under those names.

A call without a valid certificate (none, another CA's, revoked, expired) is answered with
gRPC UNAUTHENTICATED and a message saying why; a request body over MESSAGE_MAX_BYTES with
RESOURCE_EXHAUSTED. The proxy's files live under its prefix (`ProxyOptions.prefix`):
`nginx.conf` (0600: it holds the token), `nginx.pid`, `*_temp` folders, `logs/error.log` (warn
and above) and `logs/access.log`, one line per call in the `tandem` format:

    <client addr> <connection serial> <requests on that connection> <client cert subject>
    [<time ISO 8601>] "<request line>" <HTTP status> <grpc-status from upstream or -> <seconds>

A connection serial that repeats with a growing request count is one TLS session reused.
"""

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from cloud.pki import check_ca
from tandem import envs
from tandem.contract import MESSAGE_MAX_BYTES
from tandem.fsio import atomic_write
from tandem.settings import ConfigError, Section

log = logging.getLogger(__name__)

# A gRPC message travels in the request body behind a 5-byte prefix (flag and length), so a
# message of exactly MESSAGE_MAX_BYTES, which Serve accepts, must pass the proxy too.
MAX_BODY_BYTES = MESSAGE_MAX_BYTES + 5
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CRL_POLL_S = 1.0
# What `tandem cloud proxy-config` renders for the token: a deployment substitutes the
# secret from its environment before nginx starts, so the rendered file holds no secret.
TOKEN_PLACEHOLDER = "${TANDEM_PROXY_TOKEN}"
SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,}")


class ProxyOptions(Section):
    """The nginx TLS proxy that edges connect to (not used with `insecure`)."""

    host: str = Field("127.0.0.1", description="Address the proxy listens on for edges; 0.0.0.0 for every interface.")
    port: int = Field(9443, ge=1, le=65535, description="The proxy's TLS port: the edges' cloud target.")
    ca_dir: Path = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "ca",
        description="The fleet CA's folder (`tandem ca init`): the server certificate, the CA certificate that "
        "device certificates must chain to, and the CRL, which the proxy reloads when it changes.",
    )
    prefix: Path | None = Field(
        None, description="nginx's folder: its conf, pid, temp files, logs/error.log and logs/access.log. "
        "Default: TANDEM_CACHE_DIR/proxy/<port>, so that clouds on different ports keep apart.",
    )
    nginx: Path = Field(Path("/usr/sbin/nginx"), description="The nginx binary (Debian: apt-get install nginx).")
    workers: int = Field(1, ge=1, description="nginx worker processes.")
    worker_connections: int = Field(4096, ge=64, description="Connections per worker: each edge holds one.")
    idle_timeout_s: int = Field(
        3600, ge=1, description="How long an edge's idle connection stays open: an edge keeps one TLS session "
        "for all its calls, so a new handshake is rare.",
    )
    stream_timeout_s: int = Field(
        600, ge=1, description="Longest pause between two reads or writes of one call to Serve (grpc_read_timeout, "
        "grpc_send_timeout): generous, for FetchModel's streams.",
    )

    def prefix_dir(self) -> Path:
        return self.prefix or envs.TANDEM_CACHE_DIR / "proxy" / str(self.port)


def check_ready(options: ProxyOptions) -> None:
    """Raises ConfigError, saying what to do, unless nginx and the CA's files are in place:
    for callers that have slow work to do before `running_proxy`."""
    if not options.nginx.exists():
        raise ConfigError(f"proxy.nginx: no nginx at {options.nginx} (Debian: apt-get install nginx)")
    check_ca(options.ca_dir)


def render_nginx_conf(options: ProxyOptions, upstream_port: int, token: str) -> str:
    """nginx's configuration: TLS 1.3 and HTTP/2 on `options.host:port`, forwarding gRPC to
    Serve on 127.0.0.1:`upstream_port` with `token` as the proxy token; pid, temp files and
    logs under the options' prefix, which must hold a `logs` folder. The token may be TOKEN_PLACEHOLDER, which a deployment
    substitutes from the environment before nginx starts (the nginx image's envsubst
    templates replace only variables defined in the environment, so nginx's own `$variables`
    stay)."""
    if token != TOKEN_PLACEHOLDER and not SAFE_TOKEN.fullmatch(token):
        raise ValueError("the proxy token must be URL-safe base64 or hex (it is quoted into nginx.conf)")
    # absolute(), not resolve(): the paths are the deployment's, whose symlinks may differ.
    ca = options.ca_dir.absolute()
    prefix = options.prefix_dir().absolute()
    return f"""\
# Generated by cloud/proxy.py (tandem); edit ProxyOptions instead.
worker_processes {options.workers};
# Each call holds two descriptors (the edge's connection and one to Serve).
worker_rlimit_nofile {2 * options.worker_connections + 64};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
# After a reload (a new CRL), the old workers close their connections within this: a revoked
# device whose HTTP/2 connection stays busy is cut off too, instead of at its idle timeout.
worker_shutdown_timeout 10s;
events {{ worker_connections {options.worker_connections}; }}

http {{
    # nginx creates these at start (Debian's defaults are under /var/lib/nginx).
    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    log_format tandem '$remote_addr $connection $connection_requests "$ssl_client_s_dn" [$time_iso8601] '
                      '"$request" $status $upstream_trailer_grpc_status $request_time';
    access_log {prefix}/logs/access.log tandem;

    # The device id is the certificate's subject when it is exactly CN=<id>; anything else
    # forwards no id, which the cloud refuses.
    map $ssl_client_s_dn $tandem_device {{
        "~^CN=(?<cn>[A-Za-z0-9][A-Za-z0-9._-]*)$" $cn;
        default "";
    }}

    upstream tandem_serve {{
        server 127.0.0.1:{upstream_port};
        # Connections to Serve stay open between calls: the proxy's hop adds no handshake.
        keepalive 32;
        keepalive_timeout {options.idle_timeout_s}s;
    }}

    server {{
        listen {options.host}:{options.port} ssl http2;

        ssl_protocols TLSv1.3;
        ssl_certificate {ca}/server.crt;
        ssl_certificate_key {ca}/server.key;
        ssl_client_certificate {ca}/ca.crt;
        ssl_crl {ca}/crl.pem;
        ssl_verify_client optional;
        ssl_verify_depth 1;
        # No session resumption: a resumed session skips the certificate check, so a device
        # revoked since would get back in. Edges keep one connection open instead.
        ssl_session_tickets off;
        ssl_session_cache off;

        keepalive_timeout {options.idle_timeout_s}s;
        keepalive_requests 1000000;
        client_max_body_size {MAX_BODY_BYTES};
        client_body_timeout {options.stream_timeout_s}s;
        grpc_read_timeout {options.stream_timeout_s}s;
        grpc_send_timeout {options.stream_timeout_s}s;

        # 495/496: nginx's own codes for a certificate that failed verification or is missing.
        error_page 495 496 = @unauthenticated;
        error_page 413 = @too_large;

        location / {{
            if ($ssl_client_verify != SUCCESS) {{
                return 496;
            }}
            grpc_set_header {DEVICE_METADATA} $tandem_device;
            grpc_set_header {PROXY_TOKEN_METADATA} "{token}";
            grpc_pass grpc://tandem_serve;
        }}

        # Trailers-only gRPC answers (a 204 carries no body), so the client sees the status
        # and message rather than an HTTP error.
        location @unauthenticated {{
            default_type application/grpc;
            add_header grpc-status 16 always;
            add_header grpc-message
                "no valid device certificate ($ssl_client_verify): enroll the device with `tandem ca enroll`" always;
            return 204;
        }}
        location @too_large {{
            default_type application/grpc;
            add_header grpc-status 8 always;
            add_header grpc-message
                "request body exceeds the proxy's limit of {MAX_BODY_BYTES} bytes (a message of at most {MESSAGE_MAX_BYTES})" always;
            return 204;
        }}
    }}
}}
"""


@contextlib.contextmanager
def running_proxy(options: ProxyOptions, upstream_port: int, token: str) -> Iterator[int]:
    """nginx in front of Serve's gRPC port `upstream_port` for the block, sending `token` as
    the proxy token; yields the TLS port once it accepts connections. Reloads nginx (SIGHUP)
    whenever the CA's CRL changes, so that a revocation takes effect within about CRL_POLL_S:
    the reload closes every open connection once its calls end, and edges reconnect, all but
    the revoked. Stops nginx, workers included, on exit."""
    check_ready(options)
    prefix = options.prefix_dir()
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    atomic_write(conf, render_nginx_conf(options, upstream_port, token).encode(), mode=0o600)
    (prefix / "nginx.pid").unlink(missing_ok=True)  # written anew once this nginx has bound its port
    process = subprocess.Popen(
        # SIGTERM (nginx's fast shutdown, workers included) when this process dies, however it
        # dies: nginx is in a process group of its own, which a kill of the cloud's group misses,
        # and a proxy left running would hold the port and send the next cloud the old token.
        ["setpriv", "--pdeathsig", "TERM", str(options.nginx), "-p", str(prefix), "-e",
         str(prefix / "logs" / "error.log"), "-c", str(conf), "-g", "daemon off; master_process on;"],
        stdin=subprocess.DEVNULL,
        # Its own process group, so that stopping takes the workers with it.
        process_group=0,
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_reload_on_change, args=(process, options.ca_dir / "crl.pem", stop),
                               name="proxy-crl-watch", daemon=True)
    try:
        _wait_until_accepting(process, options, prefix)
        watcher.start()
        log.info("TLS proxy (nginx pid %d) on %s:%d in front of Serve's port %d; logs in %s",
                 process.pid, options.host, options.port, upstream_port, prefix / "logs")
        yield options.port
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        _stop(process)


def _wait_until_accepting(process: subprocess.Popen[bytes], options: ProxyOptions, prefix: Path) -> None:
    """Until this nginx has bound its port (it writes its pid file after binding: another
    process that holds the port would accept connections too) and accepts a connection."""
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "[::]") else options.host
    pid_file = prefix / "nginx.pid"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with code {process.returncode} at start: "
                               f"{_tail(prefix / 'logs' / 'error.log')}")
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(process.pid):
                with socket.create_connection((host, options.port), timeout=1):
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not accept on {host}:{options.port} within {START_TIMEOUT_S:.0f} s: "
                       f"{_tail(prefix / 'logs' / 'error.log')}")


def _reload_on_change(process: subprocess.Popen[bytes], crl: Path, stop: threading.Event) -> None:
    """Sends nginx SIGHUP when `crl` is replaced or rewritten (its inode or mtime changes)."""
    seen = _stamp(crl)
    while not stop.wait(CRL_POLL_S):
        stamp = _stamp(crl)
        if stamp != seen and process.poll() is None:
            seen = stamp
            process.send_signal(signal.SIGHUP)
            log.info("CRL %s changed: reloaded the TLS proxy", crl)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (fast shutdown: open calls end, and edges retry them later); SIGKILL to the
    whole group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)  # the master waits for its workers before it exits
    except subprocess.TimeoutExpired:
        log.warning("nginx did not stop within %.0f s: killing it", STOP_TIMEOUT_S)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty error log)"
    except FileNotFoundError:
        return f"(no {path})"
