"""The agent's side of the control plane: hold a Sync stream open, apply signed bundles, keep the last good.

A bundle is applied only when its signature verifies with a configured key, it is for this agent's
service, and its policy validates and compiles with its keys loaded; then it is written to the state
directory (msgpack, atomically) and the version is reported. Anything else is refused, reported, and
the running policy stays. Without the control plane, the agent starts from the last good bundle on disk.
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
from agent.controlplane.server import SYNC_METHOD
from agent.errors import ConfigErrors
from agent.ratelimit.shared import SharedState, Unavailable

log = logging.getLogger("agent.controlplane")

STATE_FILE = "last-good.msgpack"


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
        """Keep a stream open until `stop`; reconnect with backoff (0.2 s doubling to 10 s)."""
        backoff = 0.2
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self._session(stop)
            except (grpc.aio.AioRpcError, OSError) as e:
                code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
                if self.connected or backoff == 0.2:
                    log.warning("control plane %s unreachable (%s); enforcing %r", self.address, code, self.version)
            finally:
                self.connected = False
            if time.monotonic() - started > 10:
                backoff = 0.2  # it had been up for a while: start the backoff over
            with contextlib.suppress(TimeoutError):
                # Jittered, so the agents of a restarted control plane do not all come back at once.
                await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.5, 1.0))  # noqa: S311
            backoff = min(backoff * 2, 10.0)

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

        async with grpc.aio.insecure_channel(self.address) as channel:
            call = channel.stream_stream(
                SYNC_METHOD,
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.ControlMessage.FromString,
            )(requests())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    if stopping in done:
                        read.cancel()
                        call.cancel()
                        return
                    msg = read.result()
                    if msg is grpc.aio.EOF:
                        return
                    if not self.connected:
                        self.connected = True
                        log.info("connected to the control plane %s as %s", self.address, self.agent_id)
                    await self._handle(msg, outbox)
            finally:
                stopping.cancel()

    async def _handle(self, msg: pb.ControlMessage, outbox: asyncio.Queue[pb.AgentMessage]) -> None:
        kind = msg.WhichOneof("kind")
        error = ""
        if kind == "bundle":
            error = await self._apply_bundle(msg.bundle) or ""
        elif kind == "revocations":
            error = self._apply_revocations(msg.revocations) or ""
        status = pb.Status(version=self.version, error=error, revocations_seq=self.revocations_seq)
        outbox.put_nowait(pb.AgentMessage(status=status))

    def status(self) -> dict[str, object]:
        return {
            "control_plane": {
                "address": self.address,
                "connected": self.connected,
                "version": self.version or None,
                "revocations_sequence": self.revocations_seq,
                "last_error": self.last_error,
            }
        }


def _signed(d: dict[str, Any]) -> pb.SignedBundle:
    return pb.SignedBundle(payload=bytes(d.get("payload", b"")), signature=bytes(d.get("signature", b"")))


def _compile(bundle: PolicyBundle, base_dir: Path) -> Policy:
    # Files a policy names (keys, secrets) resolve against the agent's state directory.
    policy = load_policy_text(bundle.policy_yaml, f"<bundle {bundle.version}>", base_dir)
    if policy.version != bundle.version:
        raise BundleError(f"bundle says {bundle.version}, its policy is {policy.version}")
    return policy
