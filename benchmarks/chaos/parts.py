"""The system's parts as processes the chaos run can kill and restart: an edge daemon or the
whole cloud, each from files that outlive its process; and what watches them: each edge's
metrics, the RSS of every process by role, and the processes left behind."""

import contextlib
import logging
import re
import subprocess
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tandem.subprocesses import Server, kill_server, start_server, stop_server

log = logging.getLogger(__name__)

# Serve names its actors' processes "ray::ServeReplica:<application>:<deployment>" (with a
# prefix while the replica starts).
REPLICA = re.compile(r"ServeReplica:([^:\s]+):")
ROLES = (("tandem_cli cloud serve", "cloud-server"), ("EngineCore", "vllm-engine"), ("VLLM::Worker", "vllm-worker"),
         ("ServeController", "serve-controller"), ("ProxyActor", "serve-proxy"),
         ("raylet", "raylet"), ("gcs_server", "gcs"), ("nginx", "nginx"), ("netfault", "netfault"))


class Part:
    """One restartable process: `python args...`, announcing its port."""

    def __init__(self, args: list[str], start_timeout_s: float = 120, stop_timeout_s: float = 15) -> None:
        self._args = args
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self.server: Server | None = None

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server else None

    def start(self) -> Server:
        self.server = start_server(self._args, timeout_s=self._start_timeout_s)
        return self.server

    def kill(self) -> list[psutil.Process]:
        """SIGKILL to its process group; the processes it had started, as they were."""
        if self.server is None:
            return []
        subtree = descendants(self.server.process.pid)
        kill_server(self.server.process)
        self.server = None
        return subtree

    def signal(self, sig: int) -> None:
        """Sends `sig` to the running process (not its group)."""
        if self.server is None:
            raise RuntimeError("the process is not running")
        self.server.process.send_signal(sig)

    def stop(self) -> None:
        if self.server is not None:
            stop_server(self.server, self._stop_timeout_s)
            self.server = None


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(procs: Iterable[psutil.Process]) -> list[str]:
    """The processes of `procs` still running (the same process, not a reused pid), described."""
    left = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    return left


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples by name and labels, e.g. 'tandem_edge_feedback_refused_total{kind=...}'."""
    with urllib.request.urlopen(url, timeout=2) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for key, v in samples.items()
               if key.startswith(name + "{") and all(w in key[len(name):] for w in wanted))


@dataclass
class RssSampler:
    """Samples the RSS of every process under this one (and of `extra` pids, such as
    processes orphaned by a kill) every `interval_s`, summed by role; remembers every process
    it saw, so that what outlives the run can be found. Processes already running when it is
    made, before the run starts anything, are not the run's (in a test session: an earlier
    test's multiprocessing helper)."""

    roles: Callable[[], dict[int, str]]  # pid -> role, for the parts' own processes
    interval_s: float = 0.5
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    seen: dict[tuple[int, float], psutil.Process] = field(default_factory=dict)
    _before: set[tuple[int, float]] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._before = {key for key, _ in _children()}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        named = self.roles()
        by_role: dict[str, int] = defaultdict(int)
        for key, proc in _children():
            if key in self._before:
                continue
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                self.seen.setdefault(key, proc)
                by_role[named.get(proc.pid) or role(proc)] += proc.memory_info().rss
        self.samples.append((time.monotonic(), dict(by_role)))

    def left_behind(self) -> list[str]:
        """Every process seen during the run that is still running."""
        return alive(self.seen.values())

    def ratio(self, steady: tuple[float, float], peak: tuple[float, float]) -> dict[str, float]:
        """Per role: the highest RSS within `peak` over the mean within `steady` (monotonic
        windows), for the roles present in both."""
        base: dict[str, list[int]] = defaultdict(list)
        top: dict[str, int] = defaultdict(int)
        for t, by_role in self.samples:
            for name, rss in by_role.items():
                if steady[0] <= t <= steady[1]:
                    base[name].append(rss)
                if peak[0] <= t <= peak[1]:
                    top[name] = max(top[name], rss)
        return {name: top[name] / (sum(v) / len(v)) for name, v in base.items() if v and top.get(name)}

    def peaks_mb(self) -> dict[str, float]:
        peaks: dict[str, int] = defaultdict(int)
        for _, by_role in self.samples:
            for name, rss in by_role.items():
                peaks[name] = max(peaks[name], rss)
        return {name: rss / 2**20 for name, rss in sorted(peaks.items())}


def _children() -> list[tuple[tuple[int, float], psutil.Process]]:
    """Every process under this one, keyed by pid and start time (a pid may be reused)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            found.append(((proc.pid, proc.create_time()), proc))
    return found


def role(proc: psutil.Process) -> str:
    """A process's part of the system, from its command line."""
    cmdline = " ".join(proc.cmdline())
    if match := REPLICA.search(cmdline):
        return f"replica:{match.group(1)}"
    for needle, name in ROLES:
        if needle in cmdline:
            return name
    return proc.name()


def fill_disk(directory: Path) -> Path:
    """Writes a file in `directory` until its filesystem is full; the file, to delete later."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 64):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


@contextlib.contextmanager
def small_disk(directory: Path, size_mb: int) -> Iterator[bool]:
    """A tmpfs of `size_mb` mounted on `directory` for the block (needs root); yields whether
    it was mounted (if not, `directory` is a plain folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)],
                           capture_output=True, text=True)
    if mount.returncode:
        log.warning("cannot mount a tmpfs on %s (%s): the full-disk fault is skipped", directory, mount.stderr.strip())
    try:
        yield mount.returncode == 0
    finally:
        if mount.returncode == 0:
            subprocess.run(["umount", "--lazy", str(directory)], check=True)
