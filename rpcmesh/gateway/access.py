"""Who may call what through the gateway: a decision per caller identity and target (pure).

The gateway forwards under its own identity, so without a check here any caller
it authenticates could reach any service (the caller even picks it, with
``x-rpcmesh-service``). The target is resolved first (route table, header or
convention); then the caller needs a grant for ``<registered service>/<Method>``
(``Method``: the last part of the full gRPC method).

Grants use the control-plane policy format (:mod:`rpcmesh.security.policy`): an
identity's ``calls`` globs (``service`` or ``service/Method``; they default to its
``services``, which default to its own name) decide, and ``admins`` may call
everything. With authentication on and no policy the gateway refuses every call
(PERMISSION_DENIED naming the identity and the target), unless
``allow_any_identity`` says, explicitly, that every authenticated identity may
call everything. With authentication off (development) nobody is identified and
nothing is checked: the plaintext warning says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from rpcmesh.security.identity import Identity
from rpcmesh.security.policy import Access, Action, Policy

__all__ = ["GatewayAccess"]


@dataclass(frozen=True, kw_only=True)
class GatewayAccess:
    """The gateway's authorization settings, with the policy already read."""

    authentication: bool = False
    """Whether the gateway authenticates callers (tokens or client certificates)."""

    policy: Policy | None = None
    """Who may call which ``service/Method``; None: see :attr:`allow_any_identity`."""

    allow_any_identity: bool = False
    """With authentication on and no policy, let every authenticated identity call everything."""

    def __post_init__(self) -> None:
        if self.policy is not None and self.allow_any_identity:
            raise ValueError("allow_any_identity: give it or an access policy, not both")

    @classmethod
    def refuse_all(cls) -> GatewayAccess:
        """Authentication on, no grants: every call is refused."""
        return cls(authentication=True)

    def denial(self, identity: Identity | None, service: str, method: str) -> str | None:
        """None when ``identity`` may call ``service/method``, else why not (for PERMISSION_DENIED).

        Args:
            identity: The authenticated caller (None or the anonymous identity when
                authentication is off).
            service: The registered service name the call resolved to.
            method: The method name (the last part of ``/package.Service/Method``).
        """
        if not self.authentication or self.allow_any_identity:
            return None
        target = f"{service}/{method}"
        if identity is None:
            return f"the caller may not call {target!r} through the gateway: it is not identified"
        if self.policy is None:
            return (
                f"identity {identity.name!r} may not call {target!r} through the gateway: no access "
                "policy is configured (rpcmesh gateway --access-policy FILE, or --allow-any-identity)"
            )
        reason = self.policy.check(identity.name, [Access(Action.CALL, target)])
        if reason is None:
            return None
        return f"{reason} through the gateway"
