"""The model updater: poll the registry, download, verify, warm up, swap.

Per task: GetManifest names the promoted version; if it is not the one serving, the registry's
signed promotion and the version's signed manifest are checked before anything is downloaded
(the promotion must pin that manifest, and the version must be newer than the serving one,
or a signed rollback of it). FetchModel streams the files into a staging directory (each
checked against its signed size as it arrives), the finished directory is verified file by
file, and a new Student is built from the verified bytes and probed in a worker thread. Only
then does the task swap to it, and tells the cloud (AckRollout); any failure leaves the old
version serving, and a signed version that failed to load or answer its probe is not fetched
again. One that fails verification is refused at every poll but not remembered: after a key
rotation reaches the device, or a corrupt transfer, it is accepted.
"""

import asyncio
import contextlib
import logging
import random
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import grpc

from edge.config import UpdaterConfig
from edge.errors import ArtifactError, CloudCallError
from edge.health import LoopHealth
from edge.metrics import EdgeMetrics
from edge.model_store import ModelStore
from edge.runtime import TaskRuntime
from edge.student import Student
from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE, ArtifactFile, Manifest
from tandem.signing import VerificationError
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)

# Poll outcomes (stable strings: metric label values); a cloud error gives its reason instead.
UPDATED = "updated"
UNCHANGED = "unchanged"
REJECTED = "rejected"  # unsigned, untrusted key, corrupt, truncated, a downgrade: tried again next poll
FAILED = "failed"  # verified, but did not load or answer the probe: never fetched again
KNOWN_BAD = "known_bad"
ERROR = "error"  # anything else (a full disk, a bug): logged with its traceback
# Outcomes of a poll that worked: the loop is healthy (FAILED: it refused a bad version, as it should).
WORKING = frozenset({UPDATED, UNCHANGED, FAILED, KNOWN_BAD})


class ModelSource(Protocol):
    async def get_manifest(self, task: str, timeout_s: float) -> fleet_pb2.ModelManifest: ...

    def fetch_model(self, task: str, version: str, timeout_s: float) -> AsyncIterator[fleet_pb2.ModelChunk]: ...

    async def ack_rollout(self, task: str, version: str, timeout_s: float) -> None: ...


class Updater:
    def __init__(
        self,
        cfg: UpdaterConfig,
        store: ModelStore,
        source: ModelSource,
        tasks: dict[str, TaskRuntime],
        load: Callable[[Manifest, dict[str, bytes]], Student],
        metrics: EdgeMetrics,
        health: LoopHealth,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self._cfg = cfg
        self._store = store
        self._source = source
        self._tasks = tasks
        self._load = load
        self._metrics = metrics
        self._health = health
        self._chance = chance
        self._due = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        """Polls now instead of at the next interval (`tandem edge serve` wires this to SIGHUP)."""
        self._due.set()

    async def run(self) -> None:
        """Polls every `poll_interval_s`, or at once after `wake`, until cancelled. The first
        poll comes after a random share of the interval: a fleet restarted together (a power
        cut, a rollout) does not poll the registry all at once."""
        wait_s = self._chance() * self._cfg.poll_interval_s
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for can swallow a cancellation
            # that arrives as the event is set (a SIGHUP during the daemon's stop), and stop hangs.
            with contextlib.suppress(TimeoutError):  # the interval elapsed: poll
                async with asyncio.timeout(wait_s):
                    await self._due.wait()
            self._due.clear()
            try:
                await self.poll()
            except Exception:  # e.g. a full disk: the loop must outlive one bad poll
                log.exception("model update poll failed; polling again at the next interval")
            wait_s = self._cfg.poll_interval_s

    async def poll(self) -> dict[str, str]:
        """One poll of every task; the outcome per task."""
        async with self._lock:  # a forced poll and the periodic one never interleave
            outcomes = {task: await self._update_logged(task) for task in self._tasks}
        for task, outcome in outcomes.items():
            self._metrics.updates.labels(task, outcome).inc()
        failing = {task: outcome for task, outcome in outcomes.items() if outcome not in WORKING}
        if failing:
            await self._health.failed(f"outcomes {failing}")
        else:
            await self._health.succeeded()
        return outcomes

    async def _update_logged(self, task: str) -> str:
        """One task's outcome; a failure in one task does not keep the others from updating."""
        try:
            return await self._update(task)
        except Exception:
            log.exception("model update of %s failed; the serving version stays", task)
            return ERROR

    async def _update(self, task: str) -> str:
        runtime = self._tasks[task]
        try:
            offer = await self._source.get_manifest(task, self._cfg.deadline_ms / 1000)
        except CloudCallError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:  # nothing promoted for the task yet: nothing to do
                return UNCHANGED
            log.warning("cannot poll the registry for %s: %s", task, exc)
            return exc.reason
        serving = runtime.serving.student.version
        if offer.version == serving:
            return UNCHANGED
        if offer.version in (await asyncio.to_thread(self._store.state, task)).failed:
            return KNOWN_BAD
        try:
            manifest, files = await self._download(task, offer, runtime.serving.student.manifest)
        except CloudCallError as exc:  # transient: the next poll tries again
            log.warning("download of %s version %s failed, %s keeps serving: %s", task, offer.version, serving, exc)
            return exc.reason
        except VerificationError as exc:
            log.error("%s version %s %s, %s keeps serving: %s", task, offer.version, REJECTED, serving, exc)
            return REJECTED
        try:
            student = await asyncio.to_thread(self._load_probed, manifest, files)
        except ArtifactError as exc:
            return await self._refuse(task, offer.version, exc)
        if not await runtime.swap(student, self._cfg.swap_drain_timeout_s):
            # The new version serves already; only the old one's queue is stuck (a hung model run).
            log.error("%s version %s did not answer its queue within %.0f s of the swap to %s; it finishes on "
                      "its own", task, serving, self._cfg.swap_drain_timeout_s, student.version)
            self._metrics.swap_drain_timeouts.labels(task).inc()
        self._metrics.model.remove(task, serving)
        self._metrics.model.labels(task, student.version).set(1)
        await asyncio.to_thread(self._store.promote, task, offer.version)
        log.info("%s now serves version %s (was %s)", task, student.version, serving)
        await self._ack(task, student.version)
        return UPDATED

    async def _ack(self, task: str, version: str) -> None:
        """Tells the cloud the version serves (its audit trail records the rollout). A failure is
        only logged: the swap is done, and the cloud's record is not worth a retry loop."""
        try:
            await self._source.ack_rollout(task, version, self._cfg.deadline_ms / 1000)
        except CloudCallError as exc:
            log.warning("cannot acknowledge the rollout of %s version %s to the cloud: %s", task, version, exc)

    async def _download(
        self, task: str, offer: fleet_pb2.ModelManifest, serving: Manifest
    ) -> tuple[Manifest, dict[str, bytes]]:
        """The verified version's manifest and files; the staging directory is gone either way."""
        manifest = self._store.check_offer(task, offer, serving)
        staging = await asyncio.to_thread(
            self._store.staging, task, offer.version, offer.manifest_json, offer.signature
        )
        try:
            await self._receive(task, offer.version, manifest.files, staging)
            return await asyncio.to_thread(self._store.install, task, offer.version, staging)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)

    async def _receive(self, task: str, version: str, files: dict[str, ArtifactFile], staging: Path) -> None:
        """Writes the streamed files, refusing any byte the signed manifest does not account for."""
        written: dict[str, int] = {}
        stream = self._source.fetch_model(task, version, self._cfg.fetch_timeout_s)
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                if chunk.file in (MANIFEST_FILE, SIGNATURE_FILE):
                    continue  # the signed bytes came with GetManifest
                if chunk.file not in files:
                    raise VerificationError(f"registry sent {chunk.file!r}, which the signed manifest does not list")
                at = written.get(chunk.file, 0)
                if chunk.offset != at or at + len(chunk.data) > files[chunk.file].size:
                    raise VerificationError(
                        f"{chunk.file}: chunk at offset {chunk.offset} (+{len(chunk.data)} bytes) does not fit "
                        f"after {at} bytes of a {files[chunk.file].size}-byte file"
                    )
                await asyncio.to_thread(_append, staging / chunk.file, chunk.data)
                written[chunk.file] = at + len(chunk.data)

    def _load_probed(self, manifest: Manifest, files: dict[str, bytes]) -> Student:
        student = self._load(manifest, files)
        student.probe(self._cfg.probe_texts)
        return student

    async def _refuse(self, task: str, version: str, exc: Exception) -> str:
        serving = self._tasks[task].serving.student.version
        log.error("%s version %s %s, %s keeps serving: %s", task, version, FAILED, serving, exc)
        await asyncio.to_thread(self._store.reject, task, version, f"{FAILED}: {exc}")
        return FAILED


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)
