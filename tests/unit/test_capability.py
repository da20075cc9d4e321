"""Capability tokens: the chain cannot be edited, holders cannot be forged, and attenuation
only ever narrows. Every denial is checked for its typed error and its stable code.

Pure and in-process: no Ray, no clock (``now`` is passed in), each test in milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from typing import Any, Iterable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import ErrorCode, PolicyDenied, TokenRejected
from runtime.trusted.capability import (
    MAX_CAVEATS,
    MAX_TOKEN_BYTES,
    Arg,
    Audience,
    CallBudget,
    CostBudget,
    Effects,
    Expires,
    Holder,
    KeyRing,
    MaxDepth,
    NotBefore,
    Token,
    Tools,
    VerifiedToken,
    encode_caveat,
    host_pattern,
    url_allowed,
    url_origin,
)
from tests.unit.caveat_walk import CallContext, evaluate
from runtime.trusted.ledger import RevocationList

NOW = 1_000.0
JOB = "job-1"

# Codes a damaged token may be refused with; anything else (or success) is a failure.
TAMPER_CODES = {ErrorCode.BAD_TOKEN, ErrorCode.WRONG_HOLDER, ErrorCode.DEPTH_EXCEEDED}

FOUR_CAVEATS = (
    Tools(("fs.read", "fs.write")),
    Effects(("read", "write")),
    Arg("fs.read", "path", "path_under", "/data"),
    Expires(NOW + 3600.0),
)


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def kr() -> KeyRing:
    return KeyRing.generate()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def chain(tag: bytes, blob: bytes) -> bytes:
    """The next tag of a chain, computed the way any holder of a token can."""
    return hmac.new(tag, blob, hashlib.sha256).digest()


def append_raw(token: Token, blob: bytes) -> Token:
    """Append an arbitrary caveat blob with a correctly chained tag (what an attacker can do)."""
    return Token(token.kid, token.token_id, token.caveats + (blob,), chain(token.tag, blob), token.version)


def with_blobs(token: Token, blobs: Iterable[bytes]) -> Token:
    """The same tag over a different caveat list (what editing a token amounts to)."""
    return Token(token.kid, token.token_id, tuple(blobs), token.tag, token.version)


def call(tool: str = "fs.read", effect: str = "read", args: dict[str, Any] | None = None, *,
         agent: str = "a", now: float = NOW, job: str = JOB) -> CallContext:
    return CallContext(agent, tool, effect, {} if args is None else args, now, job)


def verified(kr: KeyRing, caveats: Iterable[Any] = (), holder: str = "a") -> VerifiedToken:
    return kr.verify(kr.mint(holder=holder, caveats=list(caveats)).encode())


def rejection(kr: KeyRing, data: Any) -> ErrorCode | None:
    """None if ``data`` verifies, else the TokenRejected code. Any other exception propagates."""
    try:
        kr.verify(data)
    except TokenRejected as exc:
        return exc.code
    return None


def denial(vt: VerifiedToken, ctx: CallContext) -> ErrorCode | None:
    """None if the call is allowed, else the denial code. Any other exception propagates."""
    try:
        evaluate(vt, ctx)
    except (TokenRejected, PolicyDenied) as exc:
        return exc.code
    return None


def assert_rejected(kr: KeyRing, data: Any, code: ErrorCode = ErrorCode.BAD_TOKEN) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        kr.verify(data)
    assert info.value.code is code, info.value.reason
    return info.value


def assert_denied(vt: VerifiedToken, ctx: CallContext, exc_type: type[Exception] = PolicyDenied,
                  code: ErrorCode = ErrorCode.POLICY_DENIED) -> None:
    with pytest.raises(exc_type) as info:
        evaluate(vt, ctx)
    assert type(info.value) is exc_type
    assert info.value.code is code, info.value.reason


def assert_allowed(vt: VerifiedToken, ctx: CallContext) -> None:
    assert evaluate(vt, ctx) is None


# ------------------------------------------------------------------------ 1. round trip


def test_round_trip_gives_holder_depth_and_caveats(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    vt = kr.verify(token.encode())
    assert vt.holder == "a"
    assert vt.depth == 0
    assert vt.max_depth is None
    assert isinstance(vt.caveats[0], Holder) and vt.caveats[0].agent == "a"
    assert vt.caveats[1:] == FOUR_CAVEATS
    assert vt.token_id == token.token_id and len(vt.token_id) == 16
    assert len(vt.tags) == len(vt.caveats) and vt.tags[-1] == token.tag
    assert vt.chain_ids() == (token.token_id, *vt.tags)


def test_round_trip_accepts_token_bytes_and_bytearray_alike(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    raw = token.encode()
    assert Token.decode(raw) == token
    for form in (token, raw, bytearray(raw)):
        vt = kr.verify(form)
        assert (vt.holder, vt.depth, vt.caveats[1:]) == ("a", 0, FOUR_CAVEATS)


def test_round_trip_keeps_every_caveat_type(kr):
    caveats = (
        Tools(("t",)), Effects(("execute",)), Arg("t", "n", "range", (0, None)),
        Arg("t", "s", "regex", "[a-z]+"), Arg("t", "u", "url_host", ("example.com",)),
        Arg("t", "m", "one_of", ("x", 1)), Arg("t", "b", "max_bytes", 10), Arg("t", "e", "exact", "v"),
        Expires(5.0), NotBefore(1.0), CallBudget(3), CostBudget(2.5), MaxDepth(2), Audience(JOB),
    )
    vt = verified(kr, caveats)
    assert vt.caveats[1:] == caveats
    assert vt.max_depth == 2


def test_budgets_are_keyed_by_the_tag_after_the_budget_caveat(kr):
    vt = verified(kr, [Tools(("t",)), CallBudget(3), CostBudget(2.5)])
    assert vt.budgets == ((vt.tags[2], "calls", 3.0), (vt.tags[3], "cost", 2.5))


def test_a_root_token_with_no_caveats_verifies_and_allows_anything(kr):
    vt = verified(kr)
    assert_allowed(vt, call("anything", "delete", {"x": 1}))


# ---------------------------------------------------------------------- 2. tampering


def test_flipping_any_bit_of_any_byte_is_rejected(kr):
    raw = kr.mint(holder="a", caveats=FOUR_CAVEATS).encode()
    outcomes = {}
    for offset in range(len(raw)):
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[offset] ^= 1 << bit
            outcomes[(offset, bit)] = rejection(kr, bytes(damaged))
    accepted = [k for k, code in outcomes.items() if code is None]
    odd = {k: code for k, code in outcomes.items() if code is not None and code not in TAMPER_CODES}
    assert accepted == [] and odd == {}
    assert rejection(kr, raw) is None  # the undamaged token still verifies afterwards


@pytest.mark.parametrize("index", range(1, 1 + len(FOUR_CAVEATS)))
def test_removing_a_caveat_is_rejected(kr, index):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    blobs = list(token.caveats)
    del blobs[index]
    assert_rejected(kr, with_blobs(token, blobs).encode(), ErrorCode.BAD_TOKEN)


def test_removing_the_holder_caveat_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    assert rejection(kr, with_blobs(token, token.caveats[1:]).encode()) in TAMPER_CODES


def test_removing_the_last_caveat_and_rechaining_from_the_final_tag_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    # The attacker knows only the final tag; chaining the kept prefix onto it cannot match.
    forged = Token(token.kid, token.token_id, token.caveats[:-1], chain(token.tag, token.caveats[-2]))
    assert_rejected(kr, forged.encode(), ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("i,j", [(1, 2), (2, 4), (1, 4), (3, 4)])
def test_reordering_caveats_is_rejected(kr, i, j):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    blobs = list(token.caveats)
    blobs[i], blobs[j] = blobs[j], blobs[i]
    assert_rejected(kr, with_blobs(token, blobs).encode(), ErrorCode.BAD_TOKEN)


def test_moving_the_holder_caveat_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    blobs = list(token.caveats[1:]) + [token.caveats[0]]
    assert rejection(kr, with_blobs(token, blobs).encode()) in TAMPER_CODES - {ErrorCode.DEPTH_EXCEEDED}


def test_truncating_at_every_length_is_rejected(kr):
    raw = kr.mint(holder="a", caveats=FOUR_CAVEATS).encode()
    codes = [rejection(kr, raw[:n]) for n in range(len(raw))]
    assert codes == [ErrorCode.BAD_TOKEN] * len(raw)


def test_trailing_bytes_are_rejected(kr):
    raw = kr.mint(holder="a", caveats=FOUR_CAVEATS).encode()
    assert_rejected(kr, raw + b"\x00", ErrorCode.BAD_TOKEN)


def test_token_minted_by_another_key_ring_is_rejected(kr):
    other = KeyRing.generate()
    assert_rejected(kr, other.mint(holder="a", caveats=FOUR_CAVEATS).encode(), ErrorCode.BAD_TOKEN)


def test_token_under_the_same_key_id_but_another_key_is_rejected(kr):
    impostor = KeyRing({kr.current_kid: b"k" * 32}, kr.current_kid, b"h" * 32)
    token = impostor.mint(holder="a", caveats=FOUR_CAVEATS)
    # The first holder seal is checked before the final tag, so this surfaces as WRONG_HOLDER.
    assert rejection(kr, token.encode()) in {ErrorCode.BAD_TOKEN, ErrorCode.WRONG_HOLDER}


def test_unknown_key_id_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    renamed = Token("no-such-kid", token.token_id, token.caveats, token.tag, token.version)
    assert_rejected(kr, renamed.encode(), ErrorCode.BAD_TOKEN)


def test_unknown_caveat_type_with_a_valid_chain_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    forged = append_raw(token, pack(["frobnicate", 1]))
    exc = assert_rejected(kr, forged.encode(), ErrorCode.BAD_TOKEN)
    assert "frobnicate" in exc.reason


@pytest.mark.parametrize("blob", [
    pack(["effects", ["fly"]]),                      # unknown effect
    pack(["tools", "fs.read"]),                      # not a list
    pack(["arg", "t", "x", "glob", "*"]),            # unknown check
    pack(["arg", "t", "x", "range", [True, 5]]),     # bool bound
    pack(["arg", "t", "x", "regex", "("]),           # does not compile
    pack(["arg", "t", "x", "max_bytes", -1]),        # negative
    pack(["exp", "tomorrow"]),
    pack(["calls", 1.5]),
    pack(["depth", -1]),
    pack(["aud"]),
    pack(["holder", "b"]),                           # no seal
    pack({"tools": ["t"]}),                          # not a list
    pack([]),
    b"\xc1",                                         # never-used msgpack byte
], ids=lambda b: b.hex()[:24])
def test_malformed_caveat_with_a_valid_chain_is_rejected(kr, blob):
    token = kr.mint(holder="a")
    assert_rejected(kr, append_raw(token, blob).encode(), ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("version", [0, 2, -1, "1", None])
def test_wrong_version_is_rejected(kr, version):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    assert_rejected(kr, Token(token.kid, token.token_id, token.caveats, token.tag, version).encode(),
                    ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_values_equal_to_one_but_not_the_int_one_are_rejected(kr, version):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    data = Token(token.kid, token.token_id, token.caveats, token.tag, version).encode()
    assert rejection(kr, data) in TAMPER_CODES


def test_oversize_bytes_are_rejected(kr):
    assert_rejected(kr, b"\x90" + b"\x00" * MAX_TOKEN_BYTES, ErrorCode.BAD_TOKEN)


def test_oversize_but_validly_chained_token_is_rejected(kr):
    token = kr.mint(holder="a", caveats=[Arg("t", "x", "exact", "v" * MAX_TOKEN_BYTES)])
    assert len(token.encode()) > MAX_TOKEN_BYTES
    assert_rejected(kr, token, ErrorCode.BAD_TOKEN)


def test_at_most_max_caveats_blobs_are_accepted(kr):
    root = kr.mint(holder="a")  # the holder caveat is blob number one
    full = root.attenuate(*[Tools((f"t{i}",)) for i in range(MAX_CAVEATS - 1)])
    assert len(kr.verify(full).caveats) == MAX_CAVEATS
    assert_rejected(kr, full.attenuate(Tools(("t",))), ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("data", [None, 123, 1.5, "a token", ["x"], {"k": b"v"}, object()],
                         ids=lambda d: type(d).__name__)
def test_non_bytes_input_is_rejected(kr, data):
    assert_rejected(kr, data, ErrorCode.BAD_TOKEN)


def test_memoryview_of_a_valid_token_is_rejected_as_non_bytes(kr):
    raw = kr.mint(holder="a").encode()
    assert_rejected(kr, memoryview(raw), ErrorCode.BAD_TOKEN)


@pytest.mark.parametrize("shape", [
    [1, "kid", b"id", [], b"tag"],        # no holder caveat, and an unknown kid
    [1, "kid", b"id", []],                # four fields
    [1, 2, b"id", [], b"tag"],            # kid not a string
    [1, "kid", "id", [], b"tag"],         # token id not bytes
    [1, "kid", b"id", [b"x"], "tag"],     # tag not bytes
    [1, "kid", b"id", b"x", b"tag"],      # caveats not a list
    [1, "kid", b"id", ["x"], b"tag"],     # caveat not bytes
    [1, "kid", b"id", [b"x"] * (MAX_CAVEATS + 1), b"tag"],
    "abcde",
    {"a": 1},
])
def test_wrongly_shaped_msgpack_is_rejected(kr, shape):
    assert_rejected(kr, pack(shape), ErrorCode.BAD_TOKEN)


def header_tag(kr: KeyRing, token: Token) -> bytes:
    """tag_0, which only the key ring can compute (the tests read the key material)."""
    key = kr.to_secret_dict()["root"][token.kid]
    return hmac.new(key, pack([token.version, token.kid, token.token_id]), hashlib.sha256).digest()


def test_validly_chained_token_with_no_holder_is_rejected(kr):
    root = kr.mint(holder="a")
    bare = Token(root.kid, root.token_id, (), header_tag(kr, root))
    exc = assert_rejected(kr, bare.encode(), ErrorCode.BAD_TOKEN)
    assert "no holder" in exc.reason
    assert_rejected(kr, bare.attenuate(Tools(("t",))).encode(), ErrorCode.BAD_TOKEN)


def test_header_tag_helper_matches_the_key_ring(kr):
    root = kr.mint(holder="a")
    bare = Token(root.kid, root.token_id, (), header_tag(kr, root))
    assert kr.bind(bare, "a") == root


def test_rejection_reasons_do_not_contain_the_token(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    forged = append_raw(token, pack(["frobnicate", 1]))
    exc = assert_rejected(kr, forged.encode(), ErrorCode.BAD_TOKEN)
    for secret in (forged.tag, token.tag):
        assert secret.hex() not in str(exc) and repr(secret) not in str(exc)
    assert exc.public() == "BAD_TOKEN"


# -------------------------------------------------------------------- 3. forged holder


def test_attenuating_with_a_holder_caveat_raises_type_error(kr):
    token = kr.mint(holder="a")
    with pytest.raises(TypeError):
        token.attenuate(Holder("b"))
    with pytest.raises(TypeError):
        token.attenuate(Tools(("t",)), Holder("b", b"\x00" * 32))


def test_hand_appended_holder_with_a_bogus_seal_is_rejected(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    for seal in (b"", b"\x00" * 32, token.tag):
        forged = append_raw(token, pack(["holder", "b", seal]))
        assert_rejected(kr, forged.encode(), ErrorCode.WRONG_HOLDER)


def test_holder_caveat_copied_onto_a_different_token_is_rejected(kr):
    donor = kr.bind(kr.mint(holder="a", caveats=[Tools(("fs.read",))]), "b")
    sealed_for_b = donor.caveats[-1]
    assert kr.verify(donor).holder == "b"
    victim = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    assert_rejected(kr, append_raw(victim, sealed_for_b).encode(), ErrorCode.WRONG_HOLDER)


def test_holder_caveat_cannot_be_moved_after_further_attenuation_of_its_own_parent(kr):
    parent = kr.mint(holder="a", caveats=[Tools(("fs.read",))])
    sealed_for_b = kr.bind(parent, "b").caveats[-1]
    widened_prefix = parent.attenuate(Effects(("read",)))
    assert_rejected(kr, append_raw(widened_prefix, sealed_for_b).encode(), ErrorCode.WRONG_HOLDER)


def test_holder_caveat_sealed_under_another_key_ring_is_rejected(kr):
    token = kr.mint(holder="a")
    foreign = KeyRing.generate()
    # A seal computed with another ring's holder key over this token's own tag.
    seal_key = foreign.to_secret_dict()["holder"]
    seal = hmac.new(seal_key, b"warden-holder\x00" + token.tag + b"b", hashlib.sha256).digest()
    assert_rejected(kr, append_raw(token, pack(["holder", "b", seal])).encode(), ErrorCode.WRONG_HOLDER)


def test_evaluate_with_another_agent_is_wrong_holder(kr):
    vt = verified(kr, FOUR_CAVEATS)
    assert_allowed(vt, call(args={"path": "/data/x"}))
    assert_denied(vt, call(args={"path": "/data/x"}, agent="b"), TokenRejected, ErrorCode.WRONG_HOLDER)


def test_bound_token_is_only_usable_by_the_new_holder(kr):
    child = kr.verify(kr.bind(kr.mint(holder="a", caveats=FOUR_CAVEATS), "b"))
    assert_allowed(child, call(args={"path": "/data/x"}, agent="b"))
    assert_denied(child, call(args={"path": "/data/x"}, agent="a"), TokenRejected, ErrorCode.WRONG_HOLDER)


# ---------------------------------------------------------------- 4. delegation depth


def test_bind_gives_depth_one_and_the_new_holder(kr):
    vt = kr.verify(kr.bind(kr.mint(holder="a", caveats=FOUR_CAVEATS), "b"))
    assert (vt.holder, vt.depth) == ("b", 1)
    assert vt.caveats[1:5] == FOUR_CAVEATS


def test_bind_keeps_every_parent_caveat_in_force(kr):
    vt = kr.verify(kr.bind(kr.mint(holder="a", caveats=FOUR_CAVEATS), "b"))
    assert_denied(vt, call("shell.run", "execute", agent="b"))
    assert_denied(vt, call(args={"path": "/etc/passwd"}, agent="b"))


def test_max_depth_zero_forbids_any_delegation(kr):
    root = kr.mint(holder="a", caveats=[MaxDepth(0)])
    assert kr.verify(root).max_depth == 0
    assert_rejected(kr, kr.bind(root, "b"), ErrorCode.DEPTH_EXCEEDED)


def test_max_depth_one_allows_one_bind_and_not_two(kr):
    root = kr.mint(holder="a", caveats=[MaxDepth(1)])
    once = kr.bind(root, "b")
    vt = kr.verify(once)
    assert (vt.holder, vt.depth, vt.max_depth) == ("b", 1, 1)
    assert_rejected(kr, kr.bind(once, "c"), ErrorCode.DEPTH_EXCEEDED)


def test_max_depth_is_relative_to_where_it_stands(kr):
    first = kr.bind(kr.mint(holder="a"), "b").attenuate(MaxDepth(1))
    assert kr.verify(first).max_depth == 2
    second = kr.bind(first, "c")
    assert (kr.verify(second).holder, kr.verify(second).depth) == ("c", 2)
    assert_rejected(kr, kr.bind(second, "d"), ErrorCode.DEPTH_EXCEEDED)


def test_max_depth_caveats_combine_by_minimum(kr):
    root = kr.mint(holder="a", caveats=[MaxDepth(3)])
    narrowed = kr.bind(root, "b").attenuate(MaxDepth(0))
    assert kr.verify(narrowed).max_depth == 1
    assert_rejected(kr, kr.bind(narrowed, "c"), ErrorCode.DEPTH_EXCEEDED)
    # A later, looser MaxDepth cannot lift an earlier limit.
    loosened = kr.bind(root.attenuate(MaxDepth(1)), "b").attenuate(MaxDepth(5))
    assert kr.verify(loosened).max_depth == 1
    assert_rejected(kr, kr.bind(loosened, "c"), ErrorCode.DEPTH_EXCEEDED)


def test_rebinding_to_the_same_agent_still_counts_as_a_delegation(kr):
    root = kr.mint(holder="a", caveats=[MaxDepth(0)])
    assert_rejected(kr, kr.bind(root, "a"), ErrorCode.DEPTH_EXCEEDED)


# ------------------------------------------------------------ 5. expiry / not-before


def test_exactly_at_expiry_is_allowed_and_just_after_is_expired(kr):
    vt = verified(kr, [Expires(NOW)])
    vt.check_time(NOW)
    assert_allowed(vt, call(now=NOW))
    later = math.nextafter(NOW, math.inf)
    with pytest.raises(TokenRejected) as info:
        vt.check_time(later)
    assert info.value.code is ErrorCode.TOKEN_EXPIRED
    assert_denied(vt, call(now=later), TokenRejected, ErrorCode.TOKEN_EXPIRED)


def test_before_not_before_is_not_yet_valid_and_at_it_is_allowed(kr):
    vt = verified(kr, [NotBefore(NOW)])
    assert_allowed(vt, call(now=NOW))
    earlier = math.nextafter(NOW, -math.inf)
    with pytest.raises(TokenRejected) as info:
        vt.check_time(earlier)
    assert info.value.code is ErrorCode.TOKEN_NOT_YET_VALID
    assert_denied(vt, call(now=earlier), TokenRejected, ErrorCode.TOKEN_NOT_YET_VALID)


@pytest.mark.parametrize("order", [(NOW + 10, NOW + 100), (NOW + 100, NOW + 10)])
def test_the_earlier_of_two_expiries_wins(kr, order):
    vt = verified(kr, [Expires(order[0]), Expires(order[1])])
    assert_allowed(vt, call(now=NOW + 10))
    assert_denied(vt, call(now=NOW + 50), TokenRejected, ErrorCode.TOKEN_EXPIRED)


def test_attenuated_expiry_cannot_extend_the_parent_expiry(kr):
    parent = kr.mint(holder="a", caveats=[Expires(NOW)])
    vt = kr.verify(parent.attenuate(Expires(NOW + 1e9)))
    assert_denied(vt, call(now=NOW + 1), TokenRejected, ErrorCode.TOKEN_EXPIRED)


def test_time_window_outside_both_ends(kr):
    vt = verified(kr, [NotBefore(NOW), Expires(NOW + 10)])
    assert_denied(vt, call(now=NOW - 1), TokenRejected, ErrorCode.TOKEN_NOT_YET_VALID)
    assert_allowed(vt, call(now=NOW + 5))
    assert_denied(vt, call(now=NOW + 11), TokenRejected, ErrorCode.TOKEN_EXPIRED)


def test_expired_token_still_verifies_but_cannot_be_used(kr):
    vt = verified(kr, [Expires(0.0)])
    assert vt.holder == "a"
    assert_denied(vt, call(now=NOW), TokenRejected, ErrorCode.TOKEN_EXPIRED)


# --------------------------------------------------------------- 6. revocation cascade


def assert_revoked(revs: RevocationList, vt: VerifiedToken) -> None:
    with pytest.raises(TokenRejected) as info:
        revs.check(vt.chain_ids(), vt.holder)
    assert info.value.code is ErrorCode.TOKEN_REVOKED


def assert_not_revoked(revs: RevocationList, vt: VerifiedToken) -> None:
    assert revs.check(vt.chain_ids(), vt.holder) is None


@pytest.fixture
def family(kr) -> dict[str, VerifiedToken]:
    """grandparent -> parent (bound to b) -> child (attenuated); sibling derived from grandparent."""
    grandparent = kr.mint(holder="a", caveats=[Tools(("fs.read", "fs.write"))])
    parent = kr.bind(grandparent, "b").attenuate(Effects(("read",)))
    child = parent.attenuate(Arg("fs.read", "path", "path_under", "/data"))
    sibling = grandparent.attenuate(Effects(("write",)))
    return {name: kr.verify(t) for name, t in
            {"grandparent": grandparent, "parent": parent, "child": child, "sibling": sibling}.items()}


def test_nothing_revoked_passes(family):
    revs = RevocationList()
    for vt in family.values():
        assert_not_revoked(revs, vt)


def test_revoking_the_root_token_id_revokes_every_descendant(family):
    revs = RevocationList()
    revs.revoke(family["grandparent"].token_id)
    for vt in family.values():
        assert_revoked(revs, vt)


def test_revoking_the_parent_last_tag_revokes_parent_and_child_only(family):
    revs = RevocationList()
    revs.revoke(family["parent"].tags[-1])
    assert_revoked(revs, family["child"])
    assert_revoked(revs, family["parent"])  # its own last tag names the parent itself
    assert_not_revoked(revs, family["grandparent"])
    assert_not_revoked(revs, family["sibling"])


def test_revoking_the_child_first_own_tag_revokes_the_child_but_not_the_parent(family):
    parent, child = family["parent"], family["child"]
    assert child.tags[: len(parent.tags)] == parent.tags
    revs = RevocationList()
    revs.revoke(child.tags[len(parent.tags)])
    assert_revoked(revs, child)
    for name in ("parent", "grandparent", "sibling"):
        assert_not_revoked(revs, family[name])


def test_revoking_an_unrelated_token_revokes_nothing(kr, family):
    revs = RevocationList()
    other = verified(kr)
    revs.revoke(other.token_id)
    revs.revoke(other.tags[-1])
    for vt in family.values():
        assert_not_revoked(revs, vt)


def test_revoke_agent_kills_every_token_of_that_holder(kr, family):
    revs = RevocationList()
    revs.revoke_agent("b")
    assert_revoked(revs, family["parent"])
    assert_revoked(revs, family["child"])
    assert_revoked(revs, verified(kr, holder="b"))
    assert_not_revoked(revs, family["grandparent"])
    assert_not_revoked(revs, family["sibling"])


# -------------------------------------------------- 7. argument checks and other caveats


def arg_token(kr: KeyRing, check: str, param: Any, *, tool: str = "t", arg: str = "x") -> VerifiedToken:
    return verified(kr, [Arg(tool, arg, check, param)])


def allowed_value(vt: VerifiedToken, value: Any, *, tool: str = "t", arg: str = "x") -> bool:
    code = denial(vt, call(tool, "read", {arg: value}))
    assert code in (None, ErrorCode.POLICY_DENIED), code
    return code is None


PATHS_UNDER_DATA = ["/data", "/data/x", "/data/x/y.txt", "/data/..x"]
# Under /data once normalised, but not the spelling a tool gets: a raw parameter (no PATH) is denied.
NON_CANONICAL_PATHS = ["/data//x", "/data/./x", "//data/x", "/data/x/..", "///data/x/", "/data/x/"]
PATHS_NOT_UNDER_DATA = [
    "/database", "/data/../etc/passwd", "/data/x/../../etc", "data/x", "/data\x00/x", "/dat", "",
    "/", "/etc/data", "./data/x", "../data/x", "/data/" + "x" * 5000, None, 1, b"/data/x", ["/data/x"],
]


@pytest.mark.parametrize("value", PATHS_UNDER_DATA)
def test_path_under_allows(kr, value):
    assert allowed_value(arg_token(kr, "path_under", "/data"), value)


@pytest.mark.parametrize("value", NON_CANONICAL_PATHS)
def test_path_under_denies_a_path_not_in_canonical_form(kr, value):
    assert_denied(arg_token(kr, "path_under", "/data"), call("t", args={"x": value}))


@pytest.mark.parametrize("value", PATHS_NOT_UNDER_DATA, ids=lambda v: repr(v)[:40])
def test_path_under_denies(kr, value):
    assert_denied(arg_token(kr, "path_under", "/data"), call("t", args={"x": value}))


@pytest.mark.parametrize("root", ["/data/", "//data", "/data/."])
def test_path_under_canonicalises_the_root_too(kr, root):
    vt = arg_token(kr, "path_under", root)
    assert allowed_value(vt, "/data/x")
    assert not allowed_value(vt, "/database")


def test_path_under_root_slash_allows_any_absolute_path(kr):
    vt = arg_token(kr, "path_under", "/")
    assert allowed_value(vt, "/etc/passwd")
    assert not allowed_value(vt, "etc/passwd")


URL_HOSTS = ("example.com", "*.good.org")
URLS_ALLOWED = ["https://example.com/x", "https://EXAMPLE.com./x", "http://a.good.org", "http://a.b.good.org/p",
                "https://user@example.com/", "https://example.com:8443/x", "HTTPS://example.com"]
URLS_DENIED = [
    "https://example.com@evil.com/", "https://evil.com/?x=example.com", "https://example.com.evil.com",
    "ftp://example.com", "https://good.org", "https://evil.com\\@example.com", "https://example.com /x",
    "https://example.com/\nx", "https://exa mple.com", "javascript:alert(1)", "https://evil.com#@example.com",
    "https://.good.org", "https://evilgood.org", "https://example.com:99999/", "http://[::1",
    "http://[not-an-ip]/", "https:example.com", "http:///example.com", "//example.com/x",
    "https://exa\u200bmple.com", "https://\U0001d41e\U0001d431.good.org/", "https://example.com\t/",
    "", None, 7, b"https://example.com/",
]


@pytest.mark.parametrize("value", URLS_ALLOWED)
def test_url_host_allows(kr, value):
    assert allowed_value(arg_token(kr, "url_host", URL_HOSTS), value)


@pytest.mark.parametrize("value", URLS_DENIED, ids=repr)
def test_url_host_denies(kr, value):
    assert_denied(arg_token(kr, "url_host", URL_HOSTS), call("t", args={"x": value}))


# url_host entries with a scheme pin the scheme and the port (the scheme's default when none is written);
# bare entries keep meaning "this host, any http(s) scheme, any port".
ORIGIN_CASES = [
    (("https://api.example.com",), "https://api.example.com/x", True),
    (("https://api.example.com",), "https://api.example.com:443/x", True),
    (("https://api.example.com",), "HTTPS://API.example.com./x", True),
    (("https://api.example.com",), "http://api.example.com/x", False),
    (("https://api.example.com",), "http://api.example.com:443/x", False),
    (("https://api.example.com",), "https://api.example.com:8443/x", False),
    (("https://api.example.com:8443",), "https://api.example.com:8443/", True),
    (("https://api.example.com:8443",), "https://api.example.com/", False),
    (("http://api.example.com",), "http://api.example.com:80/", True),
    (("http://api.example.com",), "http://api.example.com:8080/", False),
    (("https://*.example.org",), "https://a.b.example.org/", True),
    (("https://*.example.org",), "https://example.org/", False),
    (("https://*.example.org",), "http://a.example.org/", False),
    (("https://[::1]:8443",), "https://[0:0::1]:8443/", True),
    (("https://[::1]:8443",), "https://[::1]/", False),
    (("example.com",), "http://example.com:8080/", True),
    (("example.com",), "https://example.com/", True),
    (("::1",), "http://[::1]:1/", True),
    (("127.0.0.1",), "http://127.1/", False),  # not the same spelling, and not a plain host at all
    (("*.cafe",), "http://..cafe/x", False),
    (("*.cafe",), "http://.cafe/x", False),
    (("*.cafe",), "http://a..cafe/x", False),
    (("*.example",), "https://.example/", False),
    (("*.example",), "https://example/", False),
    (("*.example",), "https://a.example/", True),
]


@pytest.mark.parametrize("allowed,url,ok", ORIGIN_CASES)
def test_url_host_entries_pin_scheme_and_port(kr, allowed, url, ok):
    assert allowed_value(arg_token(kr, "url_host", allowed), url) is ok


@pytest.mark.parametrize("url", ["http://..cafe/x", "http://.example/", "http://a..b/", "http://127.1/",
                                 "http://0x7f.0.0.1/", "http://2130706433/", "http://[fe80::1%25eth0]/",
                                 "http://1.2.3.04/", "http://a.b../"])
def test_hosts_a_resolver_could_read_otherwise_are_refused(url):
    with pytest.raises(PolicyDenied):
        url_origin(url)


def test_url_origin_canonicalises_host_and_port():
    assert url_origin("HTTPS://API.Example.COM./p?q") == ("https", "api.example.com", 443)
    assert url_origin("http://[0:0::ffff:7f00:1]:8080") == ("http", "::ffff:7f00:1", 8080)
    assert url_origin("http://10.0.0.1/") == ("http", "10.0.0.1", 80)


def test_a_wildcard_never_matches_an_empty_label_even_when_asked_directly():
    assert not url_allowed(("https", ".example", 443), ("*.example",))
    assert not url_allowed(("https", "example", 443), ("*.example",))
    assert url_allowed(("https", "a.example", 443), ("*.example",))


@pytest.mark.parametrize("entry", ["*", "*.", "..cafe", "*.*.example", "*.10.0.0.1", "*.[::1]", "https://*.[::1]",
                                   "example.com:8080", "ftp://example.com", "https://example.com/path",
                                   "https://u@example.com", "https://example.com:99999", "https://", "127.1",
                                   "https://[not-v6]", "fe80::1%eth0"])
def test_malformed_url_host_entries_are_refused(kr, entry):
    with pytest.raises(ValueError):
        host_pattern(entry)
    bad = append_raw(kr.mint(holder="a", caveats=[]), pack(["arg", "t", "x", "url_host", [entry]]))
    assert rejection(kr, bad.encode()) is ErrorCode.BAD_TOKEN  # a holder cannot append one either


def test_url_host_entries_must_be_strings(kr):
    bad = append_raw(kr.mint(holder="a", caveats=[]), pack(["arg", "t", "x", "url_host", [7]]))
    assert rejection(kr, bad.encode()) is ErrorCode.BAD_TOKEN


@pytest.mark.parametrize("value,ok", [("abc", True), ("abc1", False), ("1abc", False), ("abc\n", False),
                                      ("", False), ("ABC", False), (1, False), (None, False)])
def test_regex_must_match_the_whole_value(kr, value, ok):
    assert allowed_value(arg_token(kr, "regex", "[a-z]+"), value) is ok


def test_regex_anchors_do_not_allow_a_trailing_newline(kr):
    assert not allowed_value(arg_token(kr, "regex", "^[a-z]+$"), "abc\n")


@pytest.mark.parametrize("pattern,value,ok", [
    (".*", "a\nb", True), ("rm .*", "rm -rf /\nx", True), ("[^\n]*", "a\nb", False), ("(?-s:.*)", "a\nb", False),
    ("abc", "ABC", False), ("(?i)abc", "ABC", True), ("é+", "ééé", True), ("..", "é€", True),
])
def test_regex_semantics_dot_matches_newline_case_sensitive_unicode(kr, pattern, value, ok):
    """The documented semantics: full match, '.' matches any character (newline too), case-sensitive,
    one character per Unicode code point; inline flags may change that."""
    assert allowed_value(arg_token(kr, "regex", pattern), value) is ok


def test_regex_values_are_capped_at_64_kib_of_utf8():
    kr = KeyRing.generate()
    vt = arg_token(kr, "regex", ".*")
    assert allowed_value(vt, "a" * 65536)
    assert not allowed_value(vt, "a" * 65537)
    assert allowed_value(vt, "é" * 32768)  # 2 bytes each: exactly 64 KiB
    assert not allowed_value(vt, "é" * 32769)
    assert not allowed_value(vt, "\ud800")  # a lone surrogate is no UTF-8: cannot be judged, denied


@pytest.mark.parametrize("param,value,ok", [
    ((0, 10), 0, True), ((0, 10), 10, True), ((0, 10), 5.5, True),
    ((0, 10), -1, False), ((0, 10), 10.000001, False), ((0, 10), 11, False),
    ((0, 10), True, False), ((0, 10), False, False), ((0, 10), "5", False), ((0, 10), None, False),
    ((0, 10), math.nan, False), ((0, 10), math.inf, False),
    ((None, 10), -1e18, True), ((None, 10), 11, False),
    ((0, None), 10**18, True), ((0, None), math.inf, True), ((0, None), -1, False),
    ((None, None), -5, True), ((None, None), True, False), ((None, None), math.nan, False),
])
def test_range(kr, param, value, ok):
    assert allowed_value(arg_token(kr, "range", param), value) is ok


@pytest.mark.parametrize("param,value,ok", [
    (1, 1, True), (1, True, False), (1, 1.0, True), (1, "1", False), (1, 1.5, False), (2**53 + 1, 2.0**53, False),
    (True, True, True), (True, 1, False), (1.0, 1.0, True), (1.0, 1, True), (1.0, True, False), (0, False, False),
    (math.nan, math.nan, False),
    ("a", "a", True), ("a", b"a", False), (None, None, True), (None, False, False),
    ([1, 2], [1, 2], True), ([1, 2], [True, 2], False), ([1, 2], [1.0, 2], True), ([1, 2], [2, 1], False),
    ({"k": 1}, {"k": 1}, True), ({"k": 1}, {"k": True}, False),
])
def test_exact_compares_numbers_by_value_and_nothing_else_across_types(kr, param, value, ok):
    assert allowed_value(arg_token(kr, "exact", param), value) is ok


@pytest.mark.parametrize("value,ok", [(1, True), ("a", True), (True, False), (1.0, True), ("b", False),
                                      ([1], False), (None, False)])
def test_one_of_is_type_strict(kr, value, ok):
    assert allowed_value(arg_token(kr, "one_of", (1, "a")), value) is ok


@pytest.mark.parametrize("value,limit,ok", [
    ("ab", 2, True), ("é", 2, True), ("éa", 2, False), ("abc", 2, False), ("", 0, True),
    (b"abc", 3, True), (b"abcd", 3, False), (bytearray(b"abc"), 3, True),
    ([1, 2], len(pack([1, 2])), True), ([1, 2, 3], len(pack([1, 2])), False),
    ({"k": "v"}, len(pack({"k": "v"})), True), (12345678, 1, False),
])
def test_max_bytes_counts_utf8_bytes_and_packed_size(kr, value, limit, ok):
    assert allowed_value(arg_token(kr, "max_bytes", limit), value) is ok


def test_tools_caveat_allows_listed_tools_only(kr):
    vt = verified(kr, [Tools(("fs.read", "fs.write"))])
    assert_allowed(vt, call("fs.read"))
    assert_allowed(vt, call("fs.write", "write"))
    assert_denied(vt, call("shell.run", "execute"))
    assert_denied(vt, call(""))


def test_two_tools_caveats_intersect(kr):
    vt = verified(kr, [Tools(("fs.read", "fs.write")), Tools(("fs.write", "http.get"))])
    assert_allowed(vt, call("fs.write", "write"))
    assert_denied(vt, call("fs.read"))
    assert_denied(vt, call("http.get"))


def test_effects_caveat_allows_listed_effects_only(kr):
    vt = verified(kr, [Effects(("read",))])
    assert_allowed(vt, call("fs.read", "read"))
    for effect in ("write", "delete", "execute", "fly"):
        assert_denied(vt, call("fs.write", effect))


def test_empty_tools_and_effects_deny_everything(kr):
    assert_denied(verified(kr, [Tools(())]), call())
    assert_denied(verified(kr, [Effects(())]), call())


def test_wildcard_arg_applies_to_any_tool_that_has_the_arg(kr):
    vt = verified(kr, [Arg("*", "path", "path_under", "/data")])
    for tool in ("fs.read", "fs.write", "anything"):
        assert_allowed(vt, call(tool, args={"path": "/data/x"}))
        assert_denied(vt, call(tool, args={"path": "/etc/passwd"}))


def test_wildcard_arg_is_skipped_when_the_arg_is_absent(kr):
    vt = verified(kr, [Arg("*", "path", "path_under", "/data")])
    assert_allowed(vt, call("http.get", args={"url": "https://example.com"}))


def test_tool_specific_arg_missing_is_denied(kr):
    vt = verified(kr, [Arg("fs.read", "path", "path_under", "/data")])
    assert_denied(vt, call("fs.read", args={}))
    assert_denied(vt, call("fs.read", args={"other": "/data/x"}))


def test_tool_specific_arg_does_not_apply_to_other_tools(kr):
    vt = verified(kr, [Arg("fs.read", "path", "path_under", "/data")])
    assert_allowed(vt, call("fs.write", "write", {"path": "/etc/passwd"}))


def test_two_arg_constraints_on_one_arg_must_both_hold(kr):
    vt = verified(kr, [Arg("t", "x", "path_under", "/data"), Arg("t", "x", "regex", r"/data/[a-z]+")])
    assert allowed_value(vt, "/data/abc")
    assert not allowed_value(vt, "/data/ab1")
    assert not allowed_value(vt, "/etc/abc")


def test_audience_mismatch_is_wrong_audience(kr):
    vt = verified(kr, [Audience(JOB)])
    assert_allowed(vt, call(job=JOB))
    assert_denied(vt, call(job="job-2"), TokenRejected, ErrorCode.WRONG_AUDIENCE)


def test_budgets_do_not_affect_evaluate(kr):
    vt = verified(kr, [CallBudget(0), CostBudget(0.0)])
    assert_allowed(vt, call())


def test_policy_denials_carry_the_tool_name(kr):
    vt = verified(kr, [Tools(("fs.read",))])
    with pytest.raises(PolicyDenied) as info:
        evaluate(vt, call("shell.run", "execute"))
    assert info.value.tool == "shell.run"
    assert info.value.public() == "POLICY_DENIED on tool 'shell.run'"


# --------------------------------------------------------- 8. property: only narrowing


KR = KeyRing.generate()  # one ring for the property tests (function fixtures do not mix with @given)

TOOL_UNIVERSE = ("fs.read", "fs.write", "http.get", "shell.run")
EFFECT_UNIVERSE = ("read", "write", "delete", "execute")
ARG_UNIVERSE = ("path", "url", "n", "flag", "text")
AGENTS = ("a", "b")
JOBS = ("job-1", "job-2")
TIMES = (0.0, 49.9, 50.0, 100.0, 100.1, 150.0, 250.0)

PATH_POOL = ["/data", "/data/x", "/data//x", "/data/../etc/passwd", "/database", "//data/x", "data/x",
             "/tmp/y", "/", "", "/data\x00/x"]
URL_POOL = ["https://example.com/x", "https://EXAMPLE.com./x", "http://a.good.org", "https://good.org",
            "https://example.com@evil.com/", "ftp://example.com", "http://[::1", "javascript:alert(1)",
            "https://evil.com/?x=example.com"]
NUMBER_POOL = [-1, 0, 1, 5, 10, 11, 2**40, 0.5, 1.0, 10.0, math.nan, math.inf, -math.inf]
OTHER_POOL = [True, False, None, "", "abc", "abc1", "ééé", b"xyz", [1, 2], [True, 2], {"k": 1}]
VALUE_POOL = PATH_POOL + URL_POOL + NUMBER_POOL + OTHER_POOL

values = st.sampled_from(VALUE_POOL)
finite = st.sampled_from([-1, 0, 1, 5, 10, 0.5, 10.5, 2**40])


def subsets(universe: tuple[str, ...]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(universe), unique=True).map(tuple)


arg_params = st.one_of(
    st.tuples(st.just("exact"), values),
    st.tuples(st.just("one_of"), st.lists(values, max_size=4).map(tuple)),
    st.tuples(st.just("range"), st.tuples(st.none() | finite, st.none() | finite)),
    st.tuples(st.just("regex"), st.sampled_from(["[a-z]+", "abc.*", ".*", "/data/.*", "[0-9]*", "https://.*"])),
    st.tuples(st.just("path_under"), st.sampled_from(["/", "/data", "/data/x", "/tmp", "/data/"])),
    st.tuples(st.just("url_host"), subsets(("example.com", "*.good.org", "good.org", "evil.com"))),
    st.tuples(st.just("max_bytes"), st.integers(0, 20)),
)

arg_caveats = st.builds(
    lambda tool, arg, check_param: Arg(tool, arg, *check_param),
    st.sampled_from(TOOL_UNIVERSE + ("*",)), st.sampled_from(ARG_UNIVERSE), arg_params,
)

caveats = st.one_of(
    subsets(TOOL_UNIVERSE).map(Tools),
    subsets(EFFECT_UNIVERSE).map(Effects),
    arg_caveats,
    arg_caveats,
    st.sampled_from(TIMES).map(Expires),
    st.sampled_from(TIMES).map(NotBefore),
    st.sampled_from(JOBS).map(Audience),
    st.integers(1, 3).map(MaxDepth),
    st.integers(0, 3).map(CallBudget),
    st.sampled_from([0.0, 1.5]).map(CostBudget),
)
caveat_lists = st.lists(caveats, max_size=5)

calls = st.builds(
    CallContext,
    agent=st.sampled_from(AGENTS),
    tool=st.sampled_from(TOOL_UNIVERSE),
    effect=st.sampled_from(EFFECT_UNIVERSE),
    args=st.dictionaries(st.sampled_from(ARG_UNIVERSE), values, max_size=len(ARG_UNIVERSE)),
    now=st.sampled_from(TIMES),
    job=st.sampled_from(JOBS),
)


@st.composite
def parent_tokens(draw) -> Token:
    """A root token with random caveats, sometimes delegated to "b" and narrowed again."""
    token = KR.mint(holder="a", caveats=draw(caveat_lists))
    if draw(st.booleans()):
        token = KR.bind(token, "b").attenuate(*draw(caveat_lists))
    return token


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(parent=parent_tokens(), extra=caveat_lists, ctx=calls)
def test_attenuation_never_allows_a_call_the_parent_denied(parent, extra, ctx):
    parent_vt = KR.verify(parent.encode())
    child_vt = KR.verify(parent.attenuate(*extra).encode())
    assert child_vt.holder == parent_vt.holder and child_vt.depth == parent_vt.depth
    if denial(parent_vt, ctx) is not None:
        assert denial(child_vt, ctx) is not None


@PROPERTY_SETTINGS
@given(parent=parent_tokens(), steps=st.lists(caveat_lists, min_size=1, max_size=4), ctx=calls)
def test_child_allowed_implies_every_ancestor_allowed(parent, steps, ctx):
    chain_of_tokens = [parent]
    for extra in steps:
        chain_of_tokens.append(chain_of_tokens[-1].attenuate(*extra))
    outcomes = [denial(KR.verify(t.encode()), ctx) for t in chain_of_tokens]
    for ancestor, descendant in zip(outcomes, outcomes[1:]):
        if descendant is None:
            assert ancestor is None


@PROPERTY_SETTINGS
@given(parent=parent_tokens(), extra=caveat_lists, ctx=calls)
def test_a_delegate_is_never_allowed_what_the_delegator_was_denied(parent, extra, ctx):
    parent_vt = KR.verify(parent)
    child = KR.bind(parent, "c").attenuate(*extra)
    code = rejection(KR, child)
    if code is not None:  # a MaxDepth on the way forbids this delegation outright
        assert code is ErrorCode.DEPTH_EXCEEDED
        return
    child_vt = KR.verify(child)
    as_child = CallContext("c", ctx.tool, ctx.effect, ctx.args, ctx.now, ctx.job)
    as_parent = CallContext(parent_vt.holder, ctx.tool, ctx.effect, ctx.args, ctx.now, ctx.job)
    if denial(parent_vt, as_parent) is not None:
        assert denial(child_vt, as_child) is not None


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
CAVEAT_KINDS = ("tools", "effects", "arg", "exp", "nbf", "calls", "cost", "depth", "aud", "holder", "frobnicate")
caveat_like_blobs = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from(CAVEAT_KINDS), st.lists(msgpack_values, max_size=4)).map(
        lambda kv: pack([kv[0], *kv[1]])),
    st.tuples(st.just("arg"), st.sampled_from(TOOL_UNIVERSE), st.sampled_from(ARG_UNIVERSE),
              st.sampled_from(("exact", "one_of", "range", "regex", "path_under", "url_host", "max_bytes", "x")),
              msgpack_values).map(lambda a: pack(list(a))),
    caveats.map(encode_caveat),
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_verify_rejects_arbitrary_bytes_with_token_rejected(data):
    with pytest.raises(TokenRejected):
        KR.verify(data)


@settings(max_examples=300, deadline=None)
@given(
    version=st.one_of(st.just(1), msgpack_values),
    kid=st.one_of(st.just(KR.current_kid), msgpack_values),
    token_id=st.one_of(st.binary(max_size=20), msgpack_values),
    blobs=st.one_of(st.lists(caveat_like_blobs, max_size=6), msgpack_values),
    tag=st.one_of(st.binary(min_size=32, max_size=32), msgpack_values),
)
def test_verify_rejects_arbitrary_msgpack_shaped_tokens_with_token_rejected(version, kid, token_id, blobs, tag):
    with pytest.raises(TokenRejected):
        KR.verify(pack([version, kid, token_id, blobs, tag]))


@settings(max_examples=300, deadline=None)
@given(blobs=st.lists(caveat_like_blobs, min_size=1, max_size=6))
def test_appending_arbitrary_chained_blobs_never_changes_the_holder(blobs):
    token = KR.mint(holder="a", caveats=[Tools(("fs.read",))])
    for blob in blobs:
        token = append_raw(token, blob)
    code = rejection(KR, token.encode())
    if code is None:
        vt = KR.verify(token.encode())
        assert (vt.holder, vt.depth) == ("a", 0)
        assert isinstance(vt.caveats[1], Tools) and vt.caveats[1].names == ("fs.read",)
    else:
        assert code in TAMPER_CODES


# ------------------------------------------------------------------- 9. key rotation


def test_rotate_keeps_old_tokens_valid_and_mints_under_the_new_key(kr):
    old_kid = kr.current_kid
    old = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    kr.add_key(new_kid := secrets.token_hex(4), secrets.token_bytes(32))
    assert new_kid != old_kid and kr.current_kid == new_kid
    assert kr.verify(old).holder == "a"
    new = kr.mint(holder="a")
    assert new.kid == new_kid and kr.verify(new).holder == "a"
    bound_old = kr.bind(old, "b")
    assert bound_old.kid == old_kid and kr.verify(bound_old).holder == "b"


def test_retired_key_tokens_are_rejected(kr):
    old_kid = kr.current_kid
    old = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    kr.add_key(secrets.token_hex(4), secrets.token_bytes(32))
    new = kr.mint(holder="a")
    kr.retire(old_kid)
    assert_rejected(kr, old.encode(), ErrorCode.BAD_TOKEN)
    assert_rejected(kr, kr.bind(old, "b").encode(), ErrorCode.BAD_TOKEN)
    assert kr.verify(new).holder == "a"


def test_verify_cache_does_not_let_a_retired_key_token_through(kr):
    old_kid = kr.current_kid
    old = kr.mint(holder="a", caveats=FOUR_CAVEATS).encode()
    first = kr.verify(old)
    assert kr.verify(old) is first  # served from the cache
    kr.add_key(secrets.token_hex(4), secrets.token_bytes(32))
    kr.retire(old_kid)
    assert_rejected(kr, old, ErrorCode.BAD_TOKEN)
    assert_rejected(kr, bytearray(old), ErrorCode.BAD_TOKEN)


def test_retiring_the_current_key_is_refused(kr):
    with pytest.raises(ValueError):
        kr.retire(kr.current_kid)
    assert kr.verify(kr.mint(holder="a")).holder == "a"


def test_secret_dict_round_trip_verifies_the_same_tokens(kr):
    token = kr.mint(holder="a", caveats=FOUR_CAVEATS)
    clone = KeyRing.from_secret_dict(kr.to_secret_dict())
    assert clone.verify(token).caveats == kr.verify(token).caveats
    assert clone.verify(kr.bind(token, "b")).holder == "b"


def test_cache_eviction_keeps_verification_correct():
    ring = KeyRing.generate()
    ring_small = KeyRing(ring.to_secret_dict()["root"], ring.current_kid, ring.to_secret_dict()["holder"],
                         cache_size=2)
    tokens = [ring.mint(holder=f"agent-{i}").encode() for i in range(5)]
    for _ in range(2):
        assert [ring_small.verify(t).holder for t in tokens] == [f"agent-{i}" for i in range(5)]


# ------------------------------------------------ regex caveats are attacker-chosen input


@pytest.mark.parametrize("pattern", ["x" * 513, "(a)\\1", "a(?=b)", "(?<!a)b", ".{0,1000}", "[", 7, None])
def test_holder_appended_regex_that_re2_refuses_or_that_is_too_big_makes_the_token_invalid(kr, pattern):
    """Any holder can append a regex caveat offline: what RE2 cannot run in linear time, or too big a program."""
    token = kr.mint(holder="a", caveats=[])
    bomb = append_raw(token, pack(["arg", "t", "x", "regex", pattern]))
    assert rejection(kr, bomb.encode()) is ErrorCode.BAD_TOKEN


@pytest.mark.parametrize("pattern,value,ok", [
    ("(a+)+", "a" * 5000, True), ("(a+)+b", "a" * 60_000, False), ("(a|a)*b", "a" * 60_000, False),
    (r"\w+\d+", "a" * 60_000, False), (".*a.*b", "a" * 60_000, False), ("(a*)*b", "a" * 60_000 + "b", True),
    ("((a|b)+)+$", "ab" * 20_000, True), ("(?:x{2,})+", "x" * 30_001, True),
])
def test_backtracking_bombs_are_judged_in_linear_time(kr, pattern, value, ok):
    """Shapes that stall a backtracking engine (nested or overlapping repeats) run on RE2, and decide right."""
    assert allowed_value(arg_token(kr, "regex", pattern), value) is ok


@pytest.mark.parametrize("pattern", ["[a-z]+", "(a|b)*c", "((a)+)?", r"[a-z]{1,5}\.txt", "(foo|bar)-[0-9]+"])
def test_ordinary_regexes_are_accepted(kr, pattern):
    assert rejection(kr, kr.mint(holder="a", caveats=[Arg("t", "x", "regex", pattern)]).encode()) is None


@pytest.mark.parametrize("url", ["https://..good.org/", "https://a..good.org/", "https://-x.good.org/",
                                 "https://a%2e.good.org/", "https://a.good.org:99999/"])
def test_url_hosts_that_are_not_plain_names_are_denied(kr, url):
    vt = arg_token(kr, "url_host", ("*.good.org",))
    assert not allowed_value(vt, url)
