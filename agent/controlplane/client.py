"""The agent's side of the control plane: hold a Sync stream open, apply signed bundles, keep the last good.

A bundle is applied only when its signature verifies with a configured key, it is for this agent's
service, and its policy validates and compiles with its keys loaded; then it is written to the state
directory (msgpack, atomically) and the version is reported. Anything else is refused, reported, and
the running policy stays. Without the control plane, the agent starts from the last good bundle on disk.
Every Status also carries the requests refused since the last one (agent.controlplane.denials), and while there
are any a Status goes out every `report_every_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.config import Policy, load_policy_text
from agent.controlplane._proto.authz.controlplane.v1 import policy_sync_pb2 as pb
from agent.controlplane.bundle import (
    BundleError,
    PolicyBundle,
    Revocations,
    parse_policy,
    parse_revocations,
    verified_payload,
)
from agent.controlplane.denials import REPORT_EVERY_S, DenialTally
from agent.controlplane.server import SYNC_METHOD
from agent.controlplane.tls import CLIENT_POLL_S, ClientTlsFiles, cert_summary, check_client_files
from agent.errors import ConfigErrors
from agent.ratelimit.shared import SharedState, Unavailable

log = logging.getLogger("agent.controlplane")

STATE_FILE = "last-good.msgpack"
# The channel's own connection dies with it: from the global pool it would go on reconnecting (and being refused)
# between our attempts, outside the backoff.
_TLS_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]


class PolicyClient:
    def __init__(
        self,
        address: str,
        service: str,
        state_dir: Path,
        keys: list[Ed25519PublicKey],
        install: Callable[[Policy, str], Awaitable[str | None]],
        revoke: Callable[[Revocations], None],
        shared: Callable[[], SharedState | None] = lambda: None,
        tls: ClientTlsFiles | None = None,
        denials: DenialTally | None = None,
        report_every_s: float = REPORT_EVERY_S,
    ) -> None:
        self.address = address
        self.service = service
        self.state_dir = state_dir
        self.keys = keys
        self._install = install
        self._revoke = revoke
        self._shared = shared  # the policy's shared_state (Redis), which also carries revocation lists
        self.agent_id = f"{socket.gethostname()}:{os.getpid()}:{int(time.time())}"
        self.version = ""
        self.revocations_seq = 0
        self.connected = False
        self.last_error: str | None = None
        self._saved: dict[str, Any] = {}
        self._outbox: asyncio.Queue[pb.AgentMessage] | None = None
        self._sharing: set[asyncio.Task[None]] = set()
        # TLS: the files as last loaded (raises ValueError at start when they do not load together)
        self.tls = tls
        self._tls_stamps = tls.stamps() if tls is not None else ()
        self._tls_pems = check_client_files(tls.ca, tls.cert, tls.key) if tls is not None else None
        self.tls_error: str | None = None  # new files that did not load: the previous ones stay in use
        self.connection_error: str | None = None  # why the stream is not up (a handshake failure, PERMISSION_DENIED)
        self._rotated = asyncio.Event()
        self.denials = denials  # None: no denial counts in the reports
        self.report_every_s = report_every_s
        self._status_error = ""  # the error of the last Status for a bundle, repeated by the periodic reports

    # -- last good on disk --------------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path().with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb(self._saved, use_bin_type=True))
        os.replace(tmp, self._state_path())  # atomic: a crash leaves the old file or the new one

    async def load_last_good(self) -> bool:
        """Apply the bundle and revocations saved by an earlier run (signatures checked again)."""
        try:
            saved = msgpack.unpackb(self._state_path().read_bytes(), raw=False)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, msgpack.UnpackException) as e:
            log.error("the last good bundle in %s cannot be read: %s", self.state_dir, e)
            return False
        if not isinstance(saved, dict):
            return False
        ok = False
        if isinstance(saved.get("bundle"), dict):
            ok = await self._apply_bundle(_signed(saved["bundle"]), from_disk=True) is None
        if isinstance(saved.get("revocations"), dict):
            self._apply_revocations(_signed(saved["revocations"]), from_disk=True)
        return ok

    # -- applying -----------------------------------------------------------------------------------

    async def _apply_bundle(self, signed: pb.SignedBundle, from_disk: bool = False) -> str | None:
        try:
            bundle = parse_policy(verified_payload(signed, self.keys), self.service)
            policy = await asyncio.to_thread(_compile, bundle, self.state_dir)
        except (BundleError, ConfigErrors) as e:
            self.last_error = str(e)
            log.error("policy bundle refused (still enforcing %r): %s", self.version or None, e)
            return self.last_error
        refused = await self._install(policy, f"bundle {bundle.version} (sequence {bundle.sequence})")
        if refused is not None:
            self.last_error = refused
            return refused
        self.version = bundle.version
        self.last_error = None
        if not from_disk:
            self._saved["bundle"] = {"payload": bytes(signed.payload), "signature": bytes(signed.signature)}
            await asyncio.to_thread(self._write_state)
        log.info("enforcing %s from the control plane%s", bundle.version, " (last good, from disk)" * from_disk)
        return None

    def _apply_revocations(self, signed: pb.SignedBundle, from_disk: bool = False, share: bool = True) -> str | None:
        try:
            revocations = parse_revocations(verified_payload(signed, self.keys))
        except BundleError as e:
            log.error("revocation list refused: %s", e)
            return str(e)
        if revocations.sequence <= self.revocations_seq and self.revocations_seq:
            return None  # not newer than the list in force
        self._revoke(revocations)
        self.revocations_seq = revocations.sequence
        if not from_disk:
            self._saved["revocations"] = {"payload": bytes(signed.payload), "signature": bytes(signed.signature)}
            self._write_state()
        shared = self._shared()
        if share and shared is not None:
            blob = bytes(signed.SerializeToString())
            task = asyncio.get_running_loop().create_task(self._share(shared, revocations.sequence, blob))
            self._sharing.add(task)
            task.add_done_callback(self._sharing.discard)
        return None

    async def _share(self, shared: SharedState, sequence: int, blob: bytes) -> None:
        with contextlib.suppress(Unavailable):
            await shared.put_revocations(sequence, blob)

    async def _from_shared(self) -> None:
        """A newer signed list another replica put in Redis (verified like one from the stream)."""
        shared = self._shared()
        if shared is None:
            return
        try:
            blob = await shared.get_revocations()
        except Unavailable:
            return
        if blob is None:
            return
        signed = pb.SignedBundle()
        try:
            signed.ParseFromString(blob)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: a corrupt entry is ignored
            log.error("the revocation list in shared state is malformed; ignored")
            return
        before = self.revocations_seq
        self._apply_revocations(signed, share=False)
        if self.revocations_seq != before:
            log.info("revocations %d taken from shared state", self.revocations_seq)

    async def watch_shared(self, stop: asyncio.Event) -> None:
        """Follow the revocation lists other replicas share through Redis (when shared_state is set)."""
        while not stop.is_set():
            shared = self._shared()
            if shared is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                continue
            await shared.watch_revocations(self._from_shared, stop)

    # -- the stream ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a stream open until `stop`; reconnect with backoff (0.2 s doubling to 10 s), at once with new TLS
        files. Each cause of failure is logged once, not at every attempt, and shown in /readyz."""
        backoff = 0.2
        logged: str | None = None
        while not stop.is_set():
            started = time.monotonic()
            self._rotated.clear()
            try:
                await self._session(stop)
            except (grpc.aio.AioRpcError, OSError) as e:
                cause = _cause(e)
                self.connection_error = cause
                if cause != logged:
                    log.warning("control plane %s: %s; enforcing %r", self.address, cause, self.version or None)
                    logged = cause
            finally:
                if self.connected:
                    logged = None  # it was up: the next failure is news again
                self.connected = False
            if self._rotated.is_set() and not stop.is_set():
                backoff = 0.2
                continue  # new certificate files: reconnect with them now
            if time.monotonic() - started > 10:
                backoff = 0.2  # it had been up for a while: start the backoff over
            # Jittered, so the agents of a restarted control plane do not all come back at once; new TLS files
            # end the wait (a refused agent whose certificate was just fixed need not sit out its backoff).
            wake = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._rotated.wait())]
            await asyncio.wait(wake, timeout=backoff * random.uniform(0.5, 1.0), return_when=asyncio.FIRST_COMPLETED)  # noqa: S311
            for w in wake:
                w.cancel()
            backoff = 0.2 if self._rotated.is_set() else min(backoff * 2, 10.0)

    async def watch_tls(self, stop: asyncio.Event) -> None:
        """Look at the TLS files every CLIENT_POLL_S; when they change and load together, reconnect with them."""
        tls = self.tls
        if tls is None:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CLIENT_POLL_S)
            stamps = tls.stamps()
            if stamps == self._tls_stamps:
                continue
            self._tls_stamps = stamps
            try:
                pems = check_client_files(tls.ca, tls.cert, tls.key)
            except ValueError as e:
                error = f"{e}; the previous files stay in use"
                if error != self.tls_error:
                    log.error("control-plane TLS files refused: %s", error)
                self.tls_error = error
                continue
            self.tls_error = None
            if pems == self._tls_pems:
                continue
            self._tls_pems = pems
            log.info("control-plane TLS files changed: reconnecting with certificate %s",
                     cert_summary(pems[1])["fingerprint"])  # fmt: skip
            self._rotated.set()

    def _channel(self) -> grpc.aio.Channel:
        if self._tls_pems is None:
            return grpc.aio.insecure_channel(self.address)
        ca, cert, key = self._tls_pems
        # The control plane's certificate is checked against the host in --control-plane (a name or an IP SAN).
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return grpc.aio.secure_channel(self.address, creds, options=_TLS_CHANNEL_OPTIONS)

    async def _session(self, stop: asyncio.Event) -> None:
        outbox: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self._outbox = outbox
        hello = pb.Hello(
            service=self.service, agent_id=self.agent_id, version=self.version, revocations_seq=self.revocations_seq
        )
        outbox.put_nowait(pb.AgentMessage(hello=hello))

        async def requests() -> Any:
            while True:
                yield await outbox.get()

        async with self._channel() as channel:
            call = channel.stream_stream(
                SYNC_METHOD,
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.ControlMessage.FromString,
            )(requests())
            stopping = asyncio.ensure_future(stop.wait())
            rotated = asyncio.ensure_future(self._rotated.wait())
            reporting = asyncio.ensure_future(self._report_denials(outbox))
            try:
                while True:
                    read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({read, stopping, rotated}, return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:
                        read.cancel()
                        call.cancel()
                        return
                    msg = read.result()
                    if msg is grpc.aio.EOF:
                        return
                    if not self.connected:
                        self.connected = True
                        self.connection_error = None
                        log.info("connected to the control plane %s as %s", self.address, self.agent_id)
                    await self._handle(msg, outbox)
            finally:
                stopping.cancel()
                rotated.cancel()
                reporting.cancel()

    async def _handle(self, msg: pb.ControlMessage, outbox: asyncio.Queue[pb.AgentMessage]) -> None:
        kind = msg.WhichOneof("kind")
        error = ""
        if kind == "bundle":
            error = await self._apply_bundle(msg.bundle) or ""
        elif kind == "revocations":
            error = self._apply_revocations(msg.revocations) or ""
        self._status_error = error
        outbox.put_nowait(pb.AgentMessage(status=self._status()))

    def _status(self) -> pb.Status:
        """A Status as of now, with the denials since the last one (they count as reported from here on)."""
        denials = self.denials.take() if self.denials is not None else []
        return pb.Status(
            version=self.version,
            error=self._status_error,
            revocations_seq=self.revocations_seq,
            denials=[pb.DenialCount(route=r, reason=why, count=n) for r, why, n in denials],
        )

    async def _report_denials(self, outbox: asyncio.Queue[pb.AgentMessage]) -> None:
        """Every `report_every_s` while the stream is open: a Status when there are denials to report."""
        if self.denials is None:
            return
        while True:
            await asyncio.sleep(self.report_every_s)
            if self.denials.pending():
                outbox.put_nowait(pb.AgentMessage(status=self._status()))

    def status(self) -> dict[str, object]:
        return {
            "control_plane": {
                "address": self.address,
                "connected": self.connected,
                "version": self.version or None,
                "revocations_sequence": self.revocations_seq,
                "last_error": self.last_error,
                "connection_error": None if self.connected else self.connection_error,
                "tls": self._tls_status(),
            }
        }

    def _tls_status(self) -> dict[str, object] | None:
        if self.tls is None or self._tls_pems is None:
            return None
        return {"certificate": cert_summary(self._tls_pems[1]), "error": self.tls_error}


def _cause(e: grpc.aio.AioRpcError | OSError) -> str:
    """One line per cause of a failed stream: a refusal says why, a handshake failure names OpenSSL's reason."""
    if not isinstance(e, grpc.aio.AioRpcError):
        return type(e).__name__
    details = (e.details() or "").replace("\n", " ")
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        # "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9300: Ssl handshake failed ..."
        details = details.rpartition("last error: ")[2] or details
        if "Socket closed" in details or "Connection reset" in details:
            # With TLS 1.3 a refused client certificate looks like this to the client: one cause, logged once.
            details = "the connection was closed (a refused client certificate? the control plane's /status says)"
    return f"{e.code().name}: {details[:300]}"


def _signed(d: dict[str, Any]) -> pb.SignedBundle:
    return pb.SignedBundle(payload=bytes(d.get("payload", b"")), signature=bytes(d.get("signature", b"")))


def _compile(bundle: PolicyBundle, base_dir: Path) -> Policy:
    # Files a policy names (keys, secrets) resolve against the agent's state directory.
    policy = load_policy_text(bundle.policy_yaml, f"<bundle {bundle.version}>", base_dir)
    if policy.version != bundle.version:
        raise BundleError(f"bundle says {bundle.version}, its policy is {policy.version}")
    return policy
