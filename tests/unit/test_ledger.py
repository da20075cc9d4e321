"""Quota ledger, nonce window and revocation list: limits hold, denials charge nothing, state persists."""

import msgpack
import pytest

from runtime.errors import ErrorCode, QuotaExceeded, TokenRejected
from runtime.testing import FakeClock
from runtime.trusted.ledger import AgentQuota, NonceWindow, QuotaLedger, RevocationList

KEY_A = b"budget-key-of-a"
KEY_B = b"budget-key-of-b"


def roundtrip(snap):
    """What a persisted snapshot looks like after it has been written and read back."""
    return msgpack.unpackb(msgpack.packb(snap, use_bin_type=True), raw=False)


@pytest.fixture
def clock():
    return FakeClock()


def ledger_with(clock, agent="a", **quota):
    ledger = QuotaLedger(clock=clock)
    ledger.configure(agent, AgentQuota(**quota))
    return ledger


def quota_error(fn, code):
    with pytest.raises(QuotaExceeded) as info:
        fn()
    assert info.value.code is code
    return info.value


# ------------------------------------------------------------------- token bucket


def test_burst_then_rate_limited_with_retry_after(clock):
    ledger = ledger_with(clock, rate_per_s=2.0, burst=3)
    for _ in range(3):
        ledger.settle(ledger.reserve("a", (), 1.0))
    exc = quota_error(lambda: ledger.reserve("a", (), 1.0, "t"), ErrorCode.RATE_LIMITED)
    assert exc.retry_after_s == pytest.approx((1.0 - 0.0) / 2.0)
    assert exc.retryable
    assert exc.tool == "t"


def test_retry_after_accounts_for_partial_refill(clock):
    ledger = ledger_with(clock, rate_per_s=4.0, burst=1)
    ledger.settle(ledger.reserve("a", (), 1.0))
    clock.advance(0.1)  # 0.4 tokens back
    exc = quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)
    assert exc.retry_after_s == pytest.approx((1.0 - 0.4) / 4.0, abs=1e-3)


def test_bucket_refills_after_clock_advance(clock):
    ledger = ledger_with(clock, rate_per_s=1.0, burst=2)
    ledger.settle(ledger.reserve("a", (), 1.0))
    ledger.settle(ledger.reserve("a", (), 1.0))
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)
    clock.advance(1.0)
    ledger.settle(ledger.reserve("a", (), 1.0))
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)


def test_bucket_never_refills_beyond_burst(clock):
    ledger = ledger_with(clock, rate_per_s=10.0, burst=2)
    clock.advance(3600)
    ledger.settle(ledger.reserve("a", (), 1.0))
    ledger.settle(ledger.reserve("a", (), 1.0))
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)


def test_no_rate_means_unlimited_calls(clock):
    ledger = ledger_with(clock, rate_per_s=None, burst=1)
    for _ in range(100):
        ledger.settle(ledger.reserve("a", (), 1.0))


# -------------------------------------------------------------------- concurrency


def test_concurrency_limit_then_settle_frees_a_slot(clock):
    ledger = ledger_with(clock, max_concurrent=2)
    first = ledger.reserve("a", (), 1.0)
    ledger.reserve("a", (), 1.0)
    assert ledger.inflight("a") == 2
    exc = quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.CONCURRENCY_LIMIT)
    assert exc.retryable
    ledger.settle(first)
    assert ledger.inflight("a") == 1
    ledger.reserve("a", (), 1.0)
    assert ledger.inflight("a") == 2


def test_settle_and_release_are_idempotent(clock):
    ledger = ledger_with(clock, max_concurrent=2)
    res = ledger.reserve("a", ((KEY_A, "calls", 5.0),), 1.0)
    ledger.settle(res)
    ledger.settle(res)
    ledger.release(res)
    assert ledger.inflight("a") == 0
    assert ledger.used(KEY_A) == 1.0


# ------------------------------------------------------------------------ budgets


def test_call_budget_exhausted(clock):
    ledger = ledger_with(clock)
    budgets = ((KEY_A, "calls", 2.0),)
    ledger.settle(ledger.reserve("a", budgets, 5.0))
    ledger.settle(ledger.reserve("a", budgets, 5.0))
    assert ledger.used(KEY_A) == 2.0
    exc = quota_error(lambda: ledger.reserve("a", budgets, 5.0), ErrorCode.BUDGET_EXHAUSTED)
    assert not exc.retryable
    assert exc.retry_after_s is None


def test_cost_budget_exhausted(clock):
    ledger = ledger_with(clock)
    budgets = ((KEY_A, "cost", 10.0),)
    ledger.settle(ledger.reserve("a", budgets, 4.0))
    ledger.settle(ledger.reserve("a", budgets, 4.0))
    assert ledger.used(KEY_A) == 8.0
    quota_error(lambda: ledger.reserve("a", budgets, 4.0), ErrorCode.BUDGET_EXHAUSTED)
    ledger.settle(ledger.reserve("a", budgets, 2.0))  # exactly at the limit is still allowed
    assert ledger.used(KEY_A) == 10.0


def test_denied_reserve_commits_nothing(clock):
    ledger = ledger_with(clock, rate_per_s=1.0, burst=5, max_concurrent=5)
    ledger.reserve("a", ((KEY_B, "calls", 1.0),), 1.0)  # KEY_B now full
    before_inflight = ledger.inflight("a")
    before_bucket = ledger.snapshot()["buckets"]["a"]
    # KEY_A passes its check, KEY_B fails: KEY_A must not be charged either.
    budgets = ((KEY_A, "calls", 10.0), (KEY_B, "calls", 1.0))
    quota_error(lambda: ledger.reserve("a", budgets, 1.0), ErrorCode.BUDGET_EXHAUSTED)
    assert ledger.used(KEY_A) == 0.0
    assert ledger.used(KEY_B) == 1.0
    assert ledger.inflight("a") == before_inflight
    assert ledger.snapshot()["buckets"]["a"] == before_bucket


def test_rate_denial_commits_nothing(clock):
    ledger = ledger_with(clock, rate_per_s=1.0, burst=1)
    ledger.settle(ledger.reserve("a", ((KEY_A, "calls", 10.0),), 1.0))
    quota_error(lambda: ledger.reserve("a", ((KEY_A, "calls", 10.0),), 1.0), ErrorCode.RATE_LIMITED)
    assert ledger.used(KEY_A) == 1.0
    assert ledger.inflight("a") == 0


def test_release_refunds_everything(clock):
    ledger = ledger_with(clock, rate_per_s=1.0, burst=5, max_concurrent=3)
    budgets = ((KEY_A, "calls", 3.0), (KEY_B, "cost", 10.0))
    res = ledger.reserve("a", budgets, 4.0)
    assert (ledger.used(KEY_A), ledger.used(KEY_B), ledger.inflight("a")) == (1.0, 4.0, 1)
    ledger.release(res)
    assert (ledger.used(KEY_A), ledger.used(KEY_B), ledger.inflight("a")) == (0.0, 0.0, 0)


def test_settle_corrects_cost_to_actual(clock):
    ledger = ledger_with(clock)
    budgets = ((KEY_A, "calls", 10.0), (KEY_B, "cost", 10.0))
    res = ledger.reserve("a", budgets, 4.0)
    ledger.settle(res, actual_cost=1.5)
    assert ledger.used(KEY_B) == pytest.approx(1.5)
    assert ledger.used(KEY_A) == 1.0  # the call budget is not a cost
    res = ledger.reserve("a", budgets, 4.0)
    ledger.settle(res)  # no actual cost reported: the projection stands
    assert ledger.used(KEY_B) == pytest.approx(5.5)


def test_settle_ignores_negative_actual_cost(clock):
    ledger = ledger_with(clock)
    res = ledger.reserve("a", ((KEY_B, "cost", 10.0),), 4.0)
    ledger.settle(res, actual_cost=-100.0)
    assert ledger.used(KEY_B) == 4.0


def test_hierarchical_budget_charges_every_level(clock):
    ledger = QuotaLedger(clock=clock)
    ledger.configure("parent", AgentQuota())
    ledger.configure("child", AgentQuota())
    parent_budgets = ((KEY_A, "calls", 3.0),)
    child_budgets = ((KEY_A, "calls", 3.0), (KEY_B, "calls", 10.0))  # the delegate's chain includes the parent's
    ledger.settle(ledger.reserve("child", child_budgets, 1.0))
    assert ledger.used(KEY_A) == 1.0
    assert ledger.used(KEY_B) == 1.0
    ledger.settle(ledger.reserve("parent", parent_budgets, 1.0))
    ledger.settle(ledger.reserve("parent", parent_budgets, 1.0))
    assert ledger.used(KEY_A) == 3.0
    # The parent's budget is spent: the child is blocked although its own budget has room.
    quota_error(lambda: ledger.reserve("child", child_budgets, 1.0), ErrorCode.BUDGET_EXHAUSTED)
    assert ledger.used(KEY_B) == 1.0


def test_unknown_agent_denied(clock):
    ledger = ledger_with(clock)
    exc = quota_error(lambda: ledger.reserve("stranger", (), 1.0, "t"), ErrorCode.BUDGET_EXHAUSTED)
    assert "stranger" in exc.reason
    assert ledger.inflight("stranger") == 0


def test_snapshot_restore_round_trip(clock):
    ledger = ledger_with(clock, rate_per_s=1.0, burst=2)
    budgets = ((KEY_A, "calls", 3.0), (KEY_B, "cost", 10.0))
    ledger.settle(ledger.reserve("a", budgets, 4.0))
    ledger.settle(ledger.reserve("a", budgets, 4.0))
    snap = roundtrip(ledger.snapshot())

    restored = ledger_with(clock, rate_per_s=1.0, burst=2)
    restored.restore(snap)
    assert restored.used(KEY_A) == 2.0
    assert restored.used(KEY_B) == 8.0
    assert restored.snapshot() == ledger.snapshot()
    # The bucket was restored empty: no fresh burst after a restart.
    quota_error(lambda: restored.reserve("a", budgets, 1.0), ErrorCode.RATE_LIMITED)
    clock.advance(1.0)
    restored.settle(restored.reserve("a", budgets, 1.0))
    clock.advance(1.0)
    quota_error(lambda: restored.reserve("a", budgets, 1.0), ErrorCode.BUDGET_EXHAUSTED)  # 3 calls used


# ------------------------------------------------------------------------- nonces

NONCE = b"n" * 16


def replay_error(fn):
    with pytest.raises(TokenRejected) as info:
        fn()
    assert info.value.code is ErrorCode.REPLAY
    return info.value


def test_nonce_accepted_once(clock):
    window = NonceWindow(window_s=120, clock=clock)
    window.check("a", NONCE, clock())
    exc = replay_error(lambda: window.check("a", NONCE, clock(), "t"))
    assert exc.tool == "t"
    window.check("b", NONCE, clock())  # nonces are per agent


def test_timestamp_outside_window_is_replay(clock):
    window = NonceWindow(window_s=120, clock=clock)
    replay_error(lambda: window.check("a", b"1" * 16, clock() - 121))
    replay_error(lambda: window.check("a", b"2" * 16, clock() + 121))
    window.check("a", b"3" * 16, clock() - 120)
    window.check("a", b"4" * 16, clock() + 120)


def test_short_nonce_is_replay(clock):
    window = NonceWindow(clock=clock)
    replay_error(lambda: window.check("a", b"x" * 11, clock()))
    window.check("a", b"x" * 12, clock())


def test_pruning_does_not_reallow_a_nonce_within_its_window(clock):
    window = NonceWindow(window_s=120, clock=clock)
    t0 = clock()
    window.check("a", NONCE, t0)
    for i in range(4):  # several prunes happen while the nonce's timestamp is still acceptable
        clock.advance(30)
        window.check("a", bytes([i]) * 16, clock())
        replay_error(lambda: window.check("a", NONCE, t0))
    assert clock() - t0 == 120


def test_nonce_with_future_timestamp_stays_remembered(clock):
    window = NonceWindow(window_s=120, clock=clock)
    ts = clock() + 100
    window.check("a", NONCE, ts)
    clock.advance(200)  # |now - ts| = 100: the timestamp is still acceptable
    window.check("a", b"z" * 16, clock())  # triggers a prune
    replay_error(lambda: window.check("a", NONCE, ts))


def test_nonce_window_snapshot_restore(clock):
    window = NonceWindow(window_s=120, clock=clock)
    window.check("a", NONCE, clock())
    restored = NonceWindow(window_s=120, clock=clock)
    restored.restore(roundtrip(window.snapshot()))
    replay_error(lambda: restored.check("a", NONCE, clock()))
    restored.check("a", b"fresh-nonce-0001", clock())


# -------------------------------------------------------------------- revocations


def revoked_error(fn):
    with pytest.raises(TokenRejected) as info:
        fn()
    assert info.value.code is ErrorCode.TOKEN_REVOKED


def test_revocation_by_id_and_by_agent():
    rl = RevocationList()
    rl.check([b"id", b"tag1"], "a")
    rl.revoke(b"tag1")
    revoked_error(lambda: rl.check([b"id", b"tag1", b"tag2"], "a"))
    rl.check([b"other"], "a")
    rl.revoke_agent("b")
    revoked_error(lambda: rl.check([b"other"], "b"))


def test_revocation_list_snapshot_restore():
    rl = RevocationList()
    rl.revoke(b"token-id")
    rl.revoke_agent("rogue")
    restored = RevocationList()
    restored.restore(roundtrip(rl.snapshot()))
    revoked_error(lambda: restored.check([b"token-id"], "a"))
    revoked_error(lambda: restored.check([b"unrelated"], "rogue"))
    restored.check([b"unrelated"], "a")


# ------------------------------------------ cases mutation testing showed unpinned (make mutate)


@pytest.mark.parametrize("actual", [0.0, 0.5])
def test_settle_corrects_to_an_actual_cost_of_zero_or_below_one(clock, actual):
    ledger = ledger_with(clock)
    ledger.settle(ledger.reserve("a", ((KEY_B, "cost", 10.0),), 4.0), actual_cost=actual)
    assert ledger.used(KEY_B) == actual


def test_a_recharged_reservation_is_in_flight_and_settles_and_releases_like_a_new_one(clock):
    ledger = ledger_with(clock, max_concurrent=1)
    res = ledger.recharge("a", [(KEY_A, 1.0), (KEY_B, 4.0)], 4.0, [KEY_B])
    assert (ledger.inflight("a"), ledger.used(KEY_A), ledger.used(KEY_B)) == (1, 1.0, 4.0)
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.CONCURRENCY_LIMIT)
    ledger.settle(res, actual_cost=1.5)
    assert (ledger.inflight("a"), ledger.used(KEY_B)) == (0, 1.5)
    again = ledger.recharge("a", [(KEY_A, 1.0)], 1.0, [], charged=True)  # already in the restored totals
    assert ledger.used(KEY_A) == 1.0 and again.projected_cost == 1.0
    ledger.release(again)
    assert (ledger.inflight("a"), ledger.used(KEY_A)) == (0, 0.0)
    fresh = QuotaLedger(clock=clock)  # an agent the restarted ledger has not configured yet
    fresh.recharge("b", [], 0.0, [])
    fresh.recharge("b", [], 0.0, [])
    assert fresh.inflight("b") == 2


def test_after_a_restart_no_agent_has_a_burst_left(clock):
    ledger = ledger_with(clock, rate_per_s=2.0, burst=5)
    ledger.drain_buckets()
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)
    clock.advance(0.5)  # one token back at 2/s
    ledger.settle(ledger.reserve("a", (), 1.0))
    quota_error(lambda: ledger.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED)


def test_restoring_an_empty_snapshot_starts_empty(clock):
    ledger, window, revoked = QuotaLedger(clock=clock), NonceWindow(clock=clock), RevocationList()
    ledger.restore({})
    window.restore({})
    revoked.restore({})
    assert ledger.snapshot() == {"used": {}, "buckets": {}} and window.snapshot() == {"seen": []}
    assert revoked.snapshot() == {"ids": [], "agents": []}


def test_every_refusal_names_the_tool_and_says_why_with_values(clock):
    """The agent sees the code and tool; the audit log gets the reason with the values that decided."""
    unknown = quota_error(lambda: QuotaLedger(clock=clock).reserve("x", (), 1.0, "t"), ErrorCode.BUDGET_EXHAUSTED)
    assert unknown.tool == "t" and "'x' has no quota" in unknown.reason
    rate = ledger_with(clock, rate_per_s=2.0, burst=1)
    rate.settle(rate.reserve("a", (), 1.0))
    exc = quota_error(lambda: rate.reserve("a", (), 1.0, "t"), ErrorCode.RATE_LIMITED)
    assert exc.tool == "t" and exc.reason == "rate 2.0/s burst 1 exceeded" and exc.retry_after_s == 0.5
    clock.advance(0.123456)  # retry_after is rounded to 0.1 ms: (1 - 0.246912) / 2
    assert quota_error(lambda: rate.reserve("a", (), 1.0), ErrorCode.RATE_LIMITED).retry_after_s == 0.3765
    busy = ledger_with(clock, max_concurrent=1)
    busy.reserve("a", (), 1.0)
    exc = quota_error(lambda: busy.reserve("a", (), 1.0, "t"), ErrorCode.CONCURRENCY_LIMIT)
    assert exc.tool == "t" and exc.reason == "concurrent=1, limit=1"
    spent = ledger_with(clock)
    exc = quota_error(lambda: spent.reserve("a", ((KEY_A, "calls", 0.0),), 1.0, "t"), ErrorCode.BUDGET_EXHAUSTED)
    assert exc.tool == "t" and exc.reason == "calls=0+1, limit=0"
    window = NonceWindow(window_s=120, clock=clock)
    late = replay_error(lambda: window.check("a", NONCE, clock() - 121, "t"))
    assert late.tool == "t" and "outside window 120" in late.reason
    short = replay_error(lambda: window.check("a", b"x", clock(), "t"))
    assert short.tool == "t" and short.reason == "nonce shorter than 12 bytes"
    window.check("a", NONCE, clock())
    again = replay_error(lambda: window.check("a", NONCE, clock(), "t"))
    assert again.tool == "t" and again.reason == "nonce already used"
    revoked = RevocationList()
    revoked.revoke_agent("a")
    revoked.revoke(b"tag")
    for holder, why in (("a", "agent 'a' revoked"), ("b", "token or an ancestor revoked")):
        with pytest.raises(TokenRejected) as info:
            revoked.check([b"tag"], holder, "t")
        assert info.value.code is ErrorCode.TOKEN_REVOKED and info.value.tool == "t" and info.value.reason == why
