"""The in-memory materialized view of the registry: what Resolve, ListServices and snapshots read.

Built from the store at start, then advanced by applying committed events in
revision order. Pure data structure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Iterable, Mapping, Sequence

from rpcmesh.controlplane.registry.model import DELETE, Event
from rpcmesh.errors import invalid_argument
from rpcmesh.v1 import registry_pb2

PASSING = registry_pb2.HEALTH_STATE_PASSING


class RegistryView:
    """Instances by service and id, at one revision."""

    def __init__(self, instances: Iterable[registry_pb2.Instance] = (), revision: int = 0) -> None:
        self.revision = revision
        self._services: dict[str, dict[str, registry_pb2.Instance]] = {}
        self._names: list[str] = []
        for instance in instances:
            self._put(instance)

    def __len__(self) -> int:
        return sum(len(instances) for instances in self._services.values())

    def _put(self, instance: registry_pb2.Instance) -> None:
        service = self._services.get(instance.service)
        if service is None:
            service = self._services[instance.service] = {}
            bisect.insort(self._names, instance.service)
        service[instance.instance_id] = instance

    def _delete(self, instance: registry_pb2.Instance) -> None:
        service = self._services.get(instance.service)
        if service is None:
            return
        service.pop(instance.instance_id, None)
        if not service:
            del self._services[instance.service]
            index = bisect.bisect_left(self._names, instance.service)
            if index < len(self._names) and self._names[index] == instance.service:
                del self._names[index]

    def apply(self, event: Event) -> bool:
        """Apply one committed event; False (and nothing changes) if its revision is not newer."""
        if event.revision <= self.revision:
            return False
        if event.type == DELETE:
            self._delete(event.instance)
        else:
            self._put(event.instance)
        self.revision = event.revision
        return True

    def get(self, service: str, instance_id: str) -> registry_pb2.Instance | None:
        """One instance, or None."""
        return self._services.get(service, {}).get(instance_id)

    def instances(self, service: str = "") -> list[registry_pb2.Instance]:
        """Every instance of one service, or of all services when empty (ordered by service, id)."""
        if service:
            found = self._services.get(service, {})
            return [found[key] for key in sorted(found)]
        return [instance for name in self._names for instance in self.instances(name)]

    def resolve(
        self,
        service: str,
        *,
        tags: Sequence[str] = (),
        zone: str = "",
        version: str = "",
        metadata: Mapping[str, str] | None = None,
        include_unhealthy: bool = False,
    ) -> list[registry_pb2.Instance]:
        """Instances of ``service`` that match every filter, ordered by instance id."""
        wanted_tags = set(tags)
        wanted_metadata = dict(metadata or {})
        found = self._services.get(service, {})
        matches: list[registry_pb2.Instance] = []
        for key in sorted(found):
            instance = found[key]
            if not include_unhealthy and instance.health != PASSING:
                continue
            if zone and instance.zone != zone:
                continue
            if version and instance.version != version:
                continue
            if wanted_tags and not wanted_tags.issubset(instance.tags):
                continue
            if wanted_metadata and any(instance.metadata.get(k) != v for k, v in wanted_metadata.items()):
                continue
            matches.append(instance)
        return matches

    def list_services(self, page_size: int, page_token: str) -> tuple[list[registry_pb2.ServiceSummary], str]:
        """One page of services in name order, and the token of the next page ("" at the end)."""
        after = decode_page_token(page_token)
        start = bisect.bisect_right(self._names, after) if after else 0
        names = self._names[start : start + page_size]
        summaries = []
        for name in names:
            instances = self._services[name].values()
            passing = sum(1 for instance in instances if instance.health == PASSING)
            summaries.append(
                registry_pb2.ServiceSummary(name=name, instance_count=len(instances), passing_count=passing)
            )
        more = start + page_size < len(self._names)
        return summaries, encode_page_token(names[-1]) if more and names else ""


def encode_page_token(last_name: str) -> str:
    """An opaque token meaning 'services after last_name'."""
    return base64.urlsafe_b64encode(f"svc:{last_name}".encode()).decode()


def decode_page_token(token: str, field: str = "page_token") -> str:
    """The service name a page token continues after ("" for the first page)."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_argument(field, "not a token returned by ListServices") from None
    if not text.startswith("svc:"):
        raise invalid_argument(field, "not a token returned by ListServices")
    return text[4:]
