"""runtime._hmac (native/hmac.c) against the pure-Python reference in runtime.trusted.capability.

The C module computes the same HMAC-SHA256 faster; nothing else. Each function is compared with
the reference (and with Python's hmac) over random inputs, and key rings and supervisors that use
it are compared, decision by decision, with ones that use the reference, on random tokens and
requests, forged and tampered ones included.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.bench import authz
from runtime.errors import WardenError
from runtime.trusted import capability as cap
from runtime.trusted import supervisor as sup
from runtime.trusted.capability import KeyRing, Token
from tests.unit.test_bench_authz import SETTINGS, append_raw, blobs, caveat, fresh_ring, verdict

native = pytest.importorskip("runtime._hmac", reason="runtime._hmac is not built (make setup builds it)")


@contextmanager
def reference_macs() -> Iterator[None]:
    """Inside: the trusted core computes every MAC with the pure-Python reference."""
    saved = cap.hmac_sha256, cap.hmac_chain, sup.hmac_sha256
    cap.hmac_sha256, cap.hmac_chain, sup.hmac_sha256 = cap.hmac_sha256_py, cap.hmac_chain_py, cap.hmac_sha256_py
    try:
        yield
    finally:
        cap.hmac_sha256, cap.hmac_chain, sup.hmac_sha256 = saved


def test_the_core_uses_the_native_module_when_it_is_built():
    assert cap.hmac_sha256 is native.hmac_sha256 and cap.hmac_chain is native.hmac_chain
    assert sup.hmac_sha256 is native.hmac_sha256


@SETTINGS
@given(key=st.binary(max_size=200), msg=st.binary(max_size=600))
def test_hmac_sha256_is_the_reference(key, msg):
    want = hmac.new(key, msg, hashlib.sha256).digest()
    assert native.hmac_sha256(key, msg) == cap.hmac_sha256_py(key, msg) == want
    assert native.hmac_sha256(bytearray(key), memoryview(msg)) == want


@pytest.mark.parametrize("key_len", [0, 1, 31, 32, 63, 64, 65, 128, 1000])
@pytest.mark.parametrize("msg_len", [0, 1, 55, 56, 63, 64, 65, 119, 120, 1 << 16])
def test_hmac_sha256_at_block_boundaries(key_len, msg_len):
    key, msg = os.urandom(key_len), os.urandom(msg_len)
    assert native.hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


@SETTINGS
@given(tag=st.binary(max_size=80), chain=st.lists(st.binary(max_size=150), max_size=10))
def test_hmac_chain_is_the_reference(tag, chain):
    assert native.hmac_chain(tag, tuple(chain)) == cap.hmac_chain_py(tag, tuple(chain))


@pytest.mark.parametrize("args", [(), (b"k",), (b"k", b"m", b"x"), ("k", b"m"), (b"k", None)])
def test_hmac_sha256_refuses_what_is_not_two_byte_strings(args):
    with pytest.raises(TypeError):
        native.hmac_sha256(*args)


@pytest.mark.parametrize("args", [(b"k", [b"a"]), (b"k", (b"a", "b")), ("k", (b"a",)), (b"k",)])
def test_hmac_chain_refuses_what_is_not_a_tag_and_a_tuple_of_byte_strings(args):
    with pytest.raises(TypeError):
        native.hmac_chain(*args)


@SETTINGS
@given(first=st.lists(caveat, max_size=4), suffix=st.lists(blobs, max_size=3), delegate=st.booleans(),
       forge=st.sampled_from(["none", "tag", "drop", "flip"]), at=st.integers(0, 10_000))
def test_a_ring_on_the_native_macs_decides_like_a_ring_on_the_reference(first, suffix, delegate, forge, at):
    kr = KeyRing.generate()
    token = kr.mint(holder="a", caveats=first)
    if delegate:
        token = kr.bind(token, "b")
    for blob in suffix:
        token = append_raw(token, blob)
    if forge == "tag":
        token = Token(token.kid, token.token_id, token.caveats, bytes(32), token.version)
    elif forge == "drop" and token.caveats:
        token = Token(token.kid, token.token_id, token.caveats[:-1], token.tag, token.version)
    data = bytearray(token.encode())
    if forge == "flip":
        data[at % len(data)] ^= 1 << (at % 8)
    with reference_macs():
        want = verdict(fresh_ring(kr), bytes(data))
    assert verdict(fresh_ring(kr), bytes(data)) == want


def decisions(requests: list[bytes], secrets: dict[str, Any], request_key: bytes) -> list[Any]:
    """What a fresh supervisor over these keys decides for each request: (tool, args) or the error code."""
    bench = authz._Bench()
    bench.keyring = KeyRing.from_secret_dict(secrets)
    bench.supervisor.keyring = bench.keyring
    bench.supervisor.agents[authz.AGENT] = sup.AgentEntry(authz.AGENT, request_key)
    out = []
    for req in requests:
        try:
            ok = bench.supervisor.authorize(req)
            out.append((ok.tool, ok.args, ok.vt.tags))
        except WardenError as exc:
            out.append(exc.code)
    return out


def test_a_supervisor_on_the_native_macs_decides_like_one_on_the_reference():
    rng = random.Random(15)
    bench = authz._Bench()
    requests = []
    for i in range(300):
        token = bench.mint(rng.choice((1, 4, 16))) if i % 3 else bench.keyring.mint(holder=authz.AGENT)
        req = bytearray(bench.request(token.encode()))
        if i % 4 == 1:  # a bit flipped anywhere: the body, the token in it, or the MAC
            at = rng.randrange(len(req) * 8)
            req[at // 8] ^= 1 << (at % 8)
        elif i % 4 == 2:
            req = bytearray(authz.encode_call(agent=authz.AGENT, token=token.encode(), tool=authz.TOOL,
                                              args=authz.args_for(authz.TOOL, i), request_key=os.urandom(32)))
        requests.append(bytes(req))
    secrets = bench.keyring.to_secret_dict()
    with reference_macs():
        want = decisions(requests, secrets, bench.request_key)
    got = decisions(requests, secrets, bench.request_key)
    assert got == want
    assert sum(not isinstance(d, tuple) for d in got) >= 100  # the tampered ones are denied, by both
