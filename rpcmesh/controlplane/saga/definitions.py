"""The saga definitions a coordinator knows: versions stored in ``sagadef-<name>`` streams.

Each registered version is one ``DefinitionRegistered`` event whose id carries a
hash of its content, so the same version registered at once through two nodes
is stored once and different content under one number conflicts. On a shared
(PostgreSQL) store, versions registered through other nodes are read on demand
(:meth:`DefinitionBook.sync`) or taken in from the log (:meth:`DefinitionBook.observe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence

from rpcmesh.controlplane.eventstore.model import NewEvent, StoredEvent, WrongExpectedVersion
from rpcmesh.controlplane.eventstore.storage import EventStorage
from rpcmesh.controlplane.saga import machine
from rpcmesh.controlplane.saga.definition import validate_definition
from rpcmesh.controlplane.saga.records import DEFINITION_REGISTERED, DEFINITION_STREAM_PREFIX
from rpcmesh.errors import AlreadyExistsError, NotFoundError, invalid_argument
from rpcmesh.v1 import saga_pb2 as pb

__all__ = ["DefinitionBook"]


class DefinitionBook:
    """Every version of every saga definition, as stored in the EventStore."""

    def __init__(self, storage: EventStorage) -> None:
        self.storage = storage
        self.shared = False
        """Several coordinators share the store: other nodes may have registered versions."""
        self._versions: dict[str, list[pb.SagaDefinition]] = {}
        self._lock = asyncio.Lock()
        # id() of every stored definition version (kept alive in _versions) -> its encoded
        # form for SagaStarted: a registered definition is validated and serialized once.
        self._encoded: dict[int, str] = {}

    def load(self, name: str, events: Sequence[StoredEvent]) -> None:
        """Take the versions of one definition read from its stream at startup."""
        self._versions[name] = [self._keep(pb.SagaDefinition.FromString(e.data)) for e in events]

    def encoded(self, definition: pb.SagaDefinition) -> str | None:
        """The encoded form of a stored version (None: the definition was given inline)."""
        return self._encoded.get(id(definition))

    async def register(self, definition: pb.SagaDefinition) -> pb.SagaDefinition:
        """Store a new version (or return the identical one already stored)."""
        validate_definition(definition)
        try:
            return await self._register(definition)
        except WrongExpectedVersion:
            # Shared store: another node registered a version of this name at the same moment.
            return await self._register(definition)

    async def _register(self, definition: pb.SagaDefinition) -> pb.SagaDefinition:
        if self.shared:
            await self.fetch(definition.name)
        async with self._lock:
            versions = self._versions.get(definition.name, [])
            if definition.version and definition.version <= len(versions):
                existing = versions[definition.version - 1]
                if existing == definition:
                    return existing
                raise AlreadyExistsError(
                    f"definition.version: {definition.name} v{definition.version} exists with other content"
                )
            if definition.version and definition.version != len(versions) + 1:
                raise invalid_argument("definition.version", f"next version is {len(versions) + 1} (or 0)")
            stored = pb.SagaDefinition()
            stored.CopyFrom(definition)
            stored.version = len(versions) + 1
            data = stored.SerializeToString(deterministic=True)
            event = NewEvent(
                # The content in the id: the same version registered twice at once (another node)
                # is stored once, another content under that number conflicts instead.
                event_id=f"v{stored.version}-{hashlib.sha256(data).hexdigest()[:16]}",
                event_type=DEFINITION_REGISTERED,
                data=data,
                content_type="application/x-protobuf; messageType=rpcmesh.v1.SagaDefinition",
            )
            await self.storage.append(DEFINITION_STREAM_PREFIX + stored.name, len(versions) - 1, [event])
            self._versions[stored.name] = [*versions, self._keep(stored)]
            return stored

    def get(self, name: str, version: int = 0, field: str = "name") -> pb.SagaDefinition:
        """One version (0: latest); NOT_FOUND if absent."""
        versions = self._versions.get(name)
        if not versions:
            raise NotFoundError(f"{field}: no saga definition named {name!r}")
        if version == 0:
            return versions[-1]
        if not 1 <= version <= len(versions):
            raise NotFoundError(f"{name!r} has no version {version} (latest is {len(versions)})")
        return versions[version - 1]

    def _keep(self, definition: pb.SagaDefinition) -> pb.SagaDefinition:
        """Note a stored (valid) definition version and its encoded form; returns it."""
        self._encoded[id(definition)] = machine.b64(definition.SerializeToString())
        return definition

    async def sync(self, name: str, version: int) -> None:
        """On a shared store, read a definition registered through another node that this one lacks.

        A newer version of a name this node knows arrives with the log (within its poll interval).
        """
        if self.shared:
            with contextlib.suppress(NotFoundError):
                self.get(name, version)
                return
            await self.fetch(name)

    def latest(self) -> list[pb.SagaDefinition]:
        """Latest version of every definition, by name."""
        return [self._versions[name][-1] for name in sorted(self._versions)]

    async def fetch(self, name: str) -> None:
        """Read versions of a definition registered through other nodes from a shared store."""
        if self.shared:
            events, _ = await self.storage.read_stream(
                DEFINITION_STREAM_PREFIX + name,
                len(self._versions.get(name, [])),
                backwards=False,
                limit=1000,
            )
            for event in events:
                await self.observe(event)

    async def observe(self, event: StoredEvent) -> None:
        """Take in a definition version registered through another node."""
        stored = pb.SagaDefinition.FromString(event.data)
        async with self._lock:
            versions = self._versions.get(stored.name, [])
            if stored.version == len(versions) + 1:
                self._versions[stored.name] = [*versions, self._keep(stored)]
