"""One adapter per authorization library, each deciding the same request its own way.

The request: agent ``agent-a`` calls ``fs.read`` with ``path`` and ``mode``. Its grant: that
one tool, ``path`` under ``/workspace/docs``, ``mode`` one of ``{"r"}``, an expiry an hour
ahead, and bound to the agent. The delegated case is the same grant attenuated by its holder
with ``path`` under ``/workspace/docs/public`` (same holder: every library here can express
that). An adapter has two sides:

* ``request(case)``: what the client does before the call reaches the decision point (mint or
  attenuate nothing: tokens are made once in ``__init__``; sign or MAC the request, fresh
  nonce). Never timed.
* ``decide(request) -> bool``: what the deciding process does per call, from wire bytes to a
  decision, with the library's public API. Timed. Anything the library raises is a denial.

``forge(case)`` builds the request an agent that does not hold the holder's key can build
(``None`` when the adapter has no holder to forge), and ``revoke()`` revokes the grant the way
the library offers (``False`` when it has no way). ``runtime.bench.peers`` uses them to probe,
not to assume, what each decision covers.

Paths are canonicalised (``posixpath.normpath``) inside ``decide`` by adapters whose library
compares strings (Biscuit, macaroons, AGT): the denied case is a ``..`` escape, and a user of
those libraries has to do that themselves. Tenuo's ``Subpath`` and Warden's ``path_under``
canonicalise on their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from datetime import datetime, timedelta, timezone
from importlib import metadata
from typing import Any

from ..errors import WardenError
from ..protocol import encode_call
from ..testing import MemoryAudit
from ..trusted.capability import Arg, Expires, KeyRing, Tools
from ..trusted.ledger import AgentQuota
from ..trusted.supervisor import AgentEntry, Supervisor
from ..trusted.wire import ParamSpec, ToolSpec

JOB = "peers-bench"
AGENT = "agent-a"
TOOL = "fs.read"
ROOT = "/workspace/docs"
NARROW = "/workspace/docs/public"
MODES = ("r",)
TTL_S = 3600.0
SPEC = ToolSpec(TOOL, "read", {"path": ParamSpec("string", format="path"), "mode": ParamSpec("string")})

# (case, token the client presents: "root" or "narrowed", arguments, the right decision)
CASES: tuple[tuple[str, str, dict[str, str], bool], ...] = (
    ("allowed", "root", {"path": "/workspace/docs/guide.md", "mode": "r"}, True),
    ("delegated", "narrowed", {"path": "/workspace/docs/public/notes.md", "mode": "r"}, True),
    ("denied", "root", {"path": "/workspace/docs/../private/key.pem", "mode": "r"}, False),
)


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def request_digest(tool: str, args: dict[str, Any], nonce: str) -> str:
    """What a holder signs (or MACs) in the peers that bind a request to a key: tool, arguments, nonce."""
    return hashlib.sha256(json.dumps([tool, args, nonce], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _under(path: Any, root: str) -> bool:
    p = posixpath.normpath(path) if isinstance(path, str) and path.startswith("/") else ""
    return p == root or p.startswith(root + "/")


class Adapter:
    """Base: ``name``, ``library`` (distribution name and version), and what the adapter does per call."""

    name = ""
    library = ""
    signature = ""  # what authenticates the grant itself
    constraints = "tool, path under a root (canonicalised), mode one of, expiry"
    quotas = "no"
    baseline = "warden.authorize.cold"  # the Warden figure doing at least the same work
    binding = ""  # how the request is tied to the holder (the probe says whether it holds)
    revocation = ""  # how a grant is revoked ("" when it cannot be)

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        raise NotImplementedError

    def decide(self, req: Any) -> bool:
        raise NotImplementedError

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> Any | None:
        return None

    def fresh(self) -> "Adapter":
        """A new adapter of the same kind, with new keys and grants (for probes that change state)."""
        return type(self)()

    def revoke(self) -> bool:
        return False

    def settle(self) -> None:
        """Untimed, after each sample (Warden releases the quota reservation here)."""


# ---------------------------------------------------------------------------------------- Warden


class _WardenBase(Adapter):
    library = "warden"
    signature = "HMAC-SHA256 chain (each caveat, sealed holder)"
    quotas = "yes (call budget reserved per decision)"
    revocation = "revocation list checked per decision (token id, chain tags, holders)"

    def __init__(self, token_cache: bool = True) -> None:
        ring = KeyRing.generate()
        secret = ring.to_secret_dict()
        self.keyring = KeyRing(secret["root"], secret["kid"], secret["holder"], cache_size=4096 if token_cache else 0)
        self.request_key = os.urandom(32)
        self.supervisor = Supervisor(job_id=JOB, keyring=self.keyring, tools={TOOL: SPEC}, audit=MemoryAudit(),
                                     dispatcher=_NoDispatch(), dispatch_key=os.urandom(32))
        self.supervisor.register_agent(AgentEntry(AGENT, self.request_key), AgentQuota())
        self.root = self.keyring.mint(holder=AGENT, caveats=[
            Tools((TOOL,)), Arg(TOOL, "path", "path_under", ROOT), Arg(TOOL, "mode", "one_of", MODES),
            Expires(time.time() + TTL_S)])
        self.narrowed = self.root.attenuate(Arg(TOOL, "path", "path_under", NARROW))
        self.tokens = {False: self.root.encode(), True: self.narrowed.encode()}

    def revoke(self) -> bool:
        self.supervisor.revoke_token(self.root.token_id)
        return True


class _NoDispatch:
    async def dispatch(self, tool: str, message: bytes, agent: str = "") -> bytes:
        raise AssertionError("authorize() must not dispatch")


class WardenAuthorize(_WardenBase):
    """``Supervisor.authorize(request bytes)``: decode, request MAC, nonce and timestamp, token
    chain, revocation, holder, canonical arguments, caveats, quota reservation."""

    def __init__(self, token_cache: bool = True) -> None:
        super().__init__(token_cache)
        self.token_cache = token_cache
        self.name = "warden.authorize" if token_cache else "warden.authorize.cold"
        self.baseline = "warden.authorize.cold"
        self.binding = "request MAC with the agent's own key; nonce and timestamp window"
        self._allowed: Any = None

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> bytes:
        return encode_call(agent=AGENT, token=self.tokens[narrowed], tool=TOOL, args=args,
                           request_key=self.request_key)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> bytes:
        return encode_call(agent=AGENT, token=self.tokens[narrowed], tool=TOOL, args=args,
                           request_key=os.urandom(32))

    def decide(self, req: bytes) -> bool:
        try:
            self._allowed = self.supervisor.authorize(req)
        except WardenError:
            return False
        return True

    def fresh(self) -> "WardenAuthorize":
        return WardenAuthorize(self.token_cache)

    def settle(self) -> None:
        if self._allowed is not None:
            self.supervisor.ledger.release(self._allowed.reservation)
            self._allowed = None


class WardenCheck(_WardenBase):
    """Token verification and caveats alone (what the token peers do): ``KeyRing.verify`` with no
    token cache, canonical arguments, ``VerifiedToken.evaluate_call``. No request MAC, no
    replay, no revocation, no quota: the holder is a name in the request."""

    name = "warden.check"
    quotas = "no"
    binding = "holder name in the request (checked against the sealed holder caveat)"
    revocation = ""

    def __init__(self) -> None:
        super().__init__(token_cache=False)

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> tuple[bytes, str, dict[str, str]]:
        return self.tokens[narrowed], AGENT, dict(args)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> tuple[bytes, str, dict[str, str]]:
        return self.tokens[narrowed], AGENT, dict(args)  # nothing to forge: the name is all there is

    def decide(self, req: tuple[bytes, str, dict[str, str]]) -> bool:
        token, agent, args = req
        try:
            vt = self.keyring.verify(token)
            vt.evaluate_call(agent, TOOL, SPEC.effect, SPEC.canonical_args(args), time.time(), JOB)
        except WardenError:
            return False
        return True

    def revoke(self) -> bool:
        return False  # revocation is the supervisor's stage, not part of this figure


class WardenCaveats(WardenCheck):
    """Caveats alone on an already verified token (what a policy engine with no tokens does):
    canonical arguments and ``VerifiedToken.evaluate_call``; no cryptography at all."""

    name = "warden.caveats"
    signature = "none per call (token verified once, ahead)"
    baseline = "warden.caveats"

    def __init__(self) -> None:
        super().__init__()
        self.verified = {n: self.keyring.verify(t) for n, t in self.tokens.items()}

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> tuple[Any, str, dict[str, str]]:
        return self.verified[narrowed], AGENT, dict(args)

    forge = request

    def decide(self, req: tuple[Any, str, dict[str, str]]) -> bool:
        vt, agent, args = req
        try:
            vt.evaluate_call(agent, TOOL, SPEC.effect, SPEC.canonical_args(args), time.time(), JOB)
        except WardenError:
            return False
        return True


# ----------------------------------------------------------------------------------------- Tenuo


class TenuoAdapter(Adapter):
    """Tenuo warrants (Ed25519), ``Authorizer.check_chain`` with the holder's proof-of-possession
    signature over tool, arguments and a timestamp; an empty signed revocation list installed."""

    name = "tenuo"
    signature = "Ed25519 (each warrant in the chain)"
    constraints = "tool, Subpath (canonicalises), OneOf, expiry"
    binding = "Ed25519 proof-of-possession over tool, arguments and a time window"
    revocation = "signed revocation list installed in the Authorizer"

    def __init__(self) -> None:
        import tenuo_core as t

        self.t = t
        self.library = f"tenuo {version('tenuo')}"
        self.issuer, self.holder = t.SigningKey.generate(), t.SigningKey.generate()
        caps = {TOOL: {"path": t.Subpath(ROOT), "mode": t.OneOf(list(MODES))}}
        root = t.Warrant.issue(self.issuer, capabilities=caps, ttl_seconds=int(TTL_S), holder=self.holder.public_key)
        narrowed = root.attenuate({TOOL: {"path": t.Subpath(NARROW), "mode": t.OneOf(list(MODES))}}, self.holder)
        self.root_id = root.id
        self.chains = {False: [root.to_bytes()], True: [root.to_bytes(), narrowed.to_bytes()]}
        self.authorizer = t.Authorizer(trusted_roots=[self.issuer.public_key])
        self.authorizer.set_revocation_list(t.SrlBuilder().version(1).build(self.issuer))

    def _request(self, narrowed: bool, args: dict[str, str], key: Any) -> tuple[list[bytes], dict[str, str], bytes]:
        chain = self.chains[narrowed]
        leaf = self.t.Warrant.from_bytes(chain[-1])
        return chain, dict(args), bytes(leaf.sign(key, TOOL, args, int(time.time())))

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, self.holder)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, self.t.SigningKey.generate())

    def decide(self, req: tuple[list[bytes], dict[str, str], bytes]) -> bool:
        chain, args, pop = req
        try:
            self.authorizer.check_chain([self.t.Warrant.from_bytes(w) for w in chain], TOOL, args, pop)
        except Exception:  # the library's denials are exceptions of several types
            return False
        return True

    def revoke(self) -> bool:
        self.authorizer.set_revocation_list(self.t.SrlBuilder().revoke(self.root_id).version(2).build(self.issuer))
        return True


# --------------------------------------------------------------------------------------- Biscuit


class BiscuitAdapter(Adapter):
    """Biscuit tokens (Ed25519 per block), Datalog checks in the authority block, the narrowed token
    an appended block; holder binding: the authority block requires a ``pop(request digest)`` fact
    signed by the holder's key (a third-party block the holder appends per request). Revocation:
    the token's revocation ids against a set the application keeps."""

    name = "biscuit"
    signature = "Ed25519 (each block, and the holder's third-party block)"
    binding = "holder-signed third-party block over the request digest (tool, arguments, nonce)"
    revocation = "the token's revocation ids against a set the application keeps"

    def __init__(self) -> None:
        import biscuit_auth as b

        self.b = b
        self.library = f"biscuit-python {version('biscuit-python')}"
        self.root_key, self.holder = b.KeyPair(), b.KeyPair()
        expires = datetime.now(timezone.utc) + timedelta(seconds=TTL_S)
        root = b.BiscuitBuilder(
            'check if tool($t), $t == {tool};\n'
            'check if path($p), $p.starts_with({prefix});\n'
            'check if mode($m), {modes}.contains($m);\n'
            'check if time($now), $now <= {expires};\n'
            'check if request($r), pop($r) trusting {holder};\n',
            {"tool": TOOL, "prefix": ROOT + "/", "modes": set(MODES), "expires": expires},
            {"holder": self.holder.public_key}).build(self.root_key.private_key)
        narrowed = root.append(b.BlockBuilder('check if path($p), $p.starts_with({prefix});',
                                              {"prefix": NARROW + "/"}))
        self.tokens = {False: root, True: narrowed}
        self.revoked: set[str] = set()
        self.root_ids = set(root.revocation_ids)

    def _request(self, narrowed: bool, args: dict[str, str], key: Any) -> tuple[bytes, dict[str, str], str]:
        token, nonce = self.tokens[narrowed], os.urandom(16).hex()
        block = self.b.BlockBuilder("pop({r});", {"r": request_digest(TOOL, args, nonce)})
        signed = token.third_party_request().create_block(key.private_key, block)
        return bytes(token.append_third_party(key.public_key, signed).to_bytes()), dict(args), nonce

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, self.holder)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, self.b.KeyPair())

    def decide(self, req: tuple[bytes, dict[str, str], str]) -> bool:
        data, args, nonce = req
        try:
            token = self.b.Biscuit.from_bytes(data, self.root_key.public_key)
            if self.revoked and not self.revoked.isdisjoint(token.revocation_ids):
                return False
            path = args["path"]
            self.b.AuthorizerBuilder(
                "tool({t}); path({p}); mode({m}); request({r}); time({now}); allow if true;",
                {"t": TOOL, "p": posixpath.normpath(path) if isinstance(path, str) else "", "m": args["mode"],
                 "r": request_digest(TOOL, args, nonce), "now": datetime.now(timezone.utc)}).build(token).authorize()
        except Exception:  # parse, signature and authorization failures are all denials
            return False
        return True

    def revoke(self) -> bool:
        self.revoked |= self.root_ids
        return True


# ------------------------------------------------------------------------------------- macaroons


class MacaroonsAdapter(Adapter):
    """pymacaroons: an HMAC-SHA256 chain of first-party caveats (string predicates checked by the
    verifier's callbacks); holder binding: a third-party caveat whose discharge only the holder
    can mint (it shares a secret with the issuer), made per request with a caveat on the request
    digest and bound to the root macaroon. Revocation: the identifier against a set the
    application keeps."""

    name = "macaroons"
    signature = "HMAC-SHA256 chain (root and bound discharge)"
    binding = "discharge minted with the holder's secret, with a caveat on the request digest"
    revocation = "the identifier against a set the application keeps"

    def __init__(self) -> None:
        from pymacaroons import Macaroon, Verifier

        self.Macaroon, self.Verifier = Macaroon, Verifier
        self.library = f"pymacaroons {version('pymacaroons')}"
        self.root_key, self.holder_secret = os.urandom(32), os.urandom(32)
        self.identifier = os.urandom(16).hex()
        root = Macaroon(location="peers-bench", identifier=self.identifier, key=self.root_key)
        root.add_first_party_caveat(f"tool = {TOOL}")
        root.add_first_party_caveat(f"path under {ROOT}")
        root.add_first_party_caveat("mode in " + ",".join(MODES))
        root.add_first_party_caveat(f"expires < {time.time() + TTL_S:.0f}")
        self.caveat_id = f"{AGENT}:{self.identifier}"
        root.add_third_party_caveat(f"holder:{AGENT}", self._caveat_key(self.holder_secret), self.caveat_id)
        narrowed = root.copy()
        narrowed.add_first_party_caveat(f"path under {NARROW}")
        self.tokens = {False: root, True: narrowed}
        self.revoked: set[str] = set()

    def _caveat_key(self, secret: bytes) -> bytes:
        return hashlib.sha256(secret + self.identifier.encode()).digest()

    def _request(self, narrowed: bool, args: dict[str, str], secret: bytes) -> tuple[str, str, dict[str, str], str]:
        root, nonce = self.tokens[narrowed], os.urandom(16).hex()
        discharge = self.Macaroon(location=f"holder:{AGENT}", identifier=self.caveat_id, key=self._caveat_key(secret))
        discharge.add_first_party_caveat("request = " + request_digest(TOOL, args, nonce))
        return root.serialize(), root.prepare_for_request(discharge).serialize(), dict(args), nonce

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, self.holder_secret)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> Any:
        return self._request(narrowed, args, os.urandom(32))

    def decide(self, req: tuple[str, str, dict[str, str], str]) -> bool:
        root_s, discharge_s, args, nonce = req
        now, digest = time.time(), request_digest(TOOL, args, nonce)

        def satisfied(predicate: str) -> bool:
            key, _, value = predicate.partition(" ")
            op, _, operand = value.partition(" ")
            if key == "tool" and op == "=":
                return operand == TOOL
            if key == "path" and op == "under":
                return _under(args.get("path"), operand)
            if key == "mode" and op == "in":
                return args.get("mode") in operand.split(",")
            if key == "expires" and op == "<":
                return now < float(operand)
            if key == "request" and op == "=":
                return operand == digest
            return False

        try:
            root = self.Macaroon.deserialize(root_s)
            if root.identifier in self.revoked:
                return False
            verifier = self.Verifier()
            verifier.satisfy_general(satisfied)
            return bool(verifier.verify(root, self.root_key, [self.Macaroon.deserialize(discharge_s)]))
        except Exception:  # bad signature, unsatisfied caveat, malformed input: denials
            return False

    def revoke(self) -> bool:
        self.revoked.add(self.identifier)
        return True


# -------------------------------------------------------------------- Agent Governance Toolkit


class AgtAdapter(Adapter):
    """The Agent Governance Toolkit's declarative policy engine (``agent_os.policies.PolicyEvaluator``,
    package agent-os-kernel): first matching rule by priority, one condition per rule, so the
    grant is deny rules for each way out of it and an allow rule; the narrowed grant is a second
    policy document with one more deny rule. No tokens: the agent id and the clock are context
    values the caller supplies, nothing binds the request to the agent."""

    name = "agt"
    signature = "none (no tokens: the policy lives in the deciding process)"
    baseline = "warden.caveats"
    binding = "agent id in the context (a claim)"
    constraints = "tool, path by regex on the canonical path, mode not_in, expiry as a context value"

    def __init__(self) -> None:
        from agent_os.policies import (PolicyAction, PolicyCondition, PolicyDefaults, PolicyDocument,
                                       PolicyEvaluator, PolicyOperator, PolicyRule)

        self.library = f"agent-os-kernel {version('agent-os-kernel')} (AGT)"
        op, deny = PolicyOperator, PolicyAction.DENY

        def rule(name: str, field: str, operator: PolicyOperator, value: Any, action: PolicyAction = deny,
                 priority: int = 100) -> PolicyRule:
            return PolicyRule(name=name, condition=PolicyCondition(field=field, operator=operator, value=value),
                              action=action, priority=priority)

        expires = time.time() + TTL_S
        grant = PolicyDocument(name="grant", defaults=PolicyDefaults(action=deny), rules=[
            rule("holder", "agent_id", op.NE, AGENT),
            rule("tool", "tool_name", op.NE, TOOL),
            rule("path", "path", op.MATCHES, rf"^(?!{ROOT}(/|$))"),
            rule("mode", "mode", op.NOT_IN, list(MODES)),
            rule("expiry", "now", op.GT, expires),
            rule("allow", "tool_name", op.EQ, TOOL, PolicyAction.ALLOW, priority=0)])
        narrowing = PolicyDocument(name="narrowed", defaults=PolicyDefaults(action=deny), rules=[
            rule("path-narrowed", "path", op.MATCHES, rf"^(?!{NARROW}(/|$))")])
        self.engines = {False: PolicyEvaluator([grant]), True: PolicyEvaluator([grant, narrowing])}

    def request(self, case: str, narrowed: bool, args: dict[str, str]) -> tuple[bool, str, dict[str, str]]:
        return narrowed, AGENT, dict(args)

    def forge(self, case: str, narrowed: bool, args: dict[str, str]) -> tuple[bool, str, dict[str, str]]:
        return narrowed, AGENT, dict(args)  # anyone can claim to be agent-a

    def decide(self, req: tuple[bool, str, dict[str, str]]) -> bool:
        narrowed, agent, args = req
        path = args.get("path")
        context = {"agent_id": agent, "tool_name": TOOL, "path": posixpath.normpath(path) if isinstance(path, str)
                   else "", "mode": args.get("mode"), "now": time.time()}
        return self.engines[narrowed].evaluate(context).allowed


PEERS: dict[str, tuple[str, type[Adapter]]] = {  # name -> (the distribution to install, adapter)
    "tenuo": ("tenuo", TenuoAdapter),
    "biscuit": ("biscuit-python", BiscuitAdapter),
    "macaroons": ("pymacaroons", MacaroonsAdapter),
    "agt": ("agent-os-kernel", AgtAdapter),
}


def warden_adapters() -> list[Adapter]:
    return [WardenAuthorize(token_cache=True), WardenAuthorize(token_cache=False), WardenCheck(), WardenCaveats()]


def peer_adapters() -> tuple[list[Adapter], dict[str, str]]:
    """The peers that import here, and why each other one was skipped."""
    found, skipped = [], {}
    for name, (dist, cls) in PEERS.items():
        try:
            found.append(cls())
        except ImportError as exc:
            skipped[name] = f"{dist} not installed ({exc.name or exc}): pip install -e '.[peers]'"
    return found, skipped
