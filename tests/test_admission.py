"""The admission, renew and release scripts (shared/admission.py), on fakeredis and on real Redis.

Each test builds a `SyncAdmission` over the `store` fixture, so the same Lua runs on both backends; the
lease-expiry test waits out a real TTL and runs on real Redis only.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis

from shared.admission import LeaseRef, SyncAdmission
from shared.errors import ConcurrencyLimited, Draining, NotFound, QueueFull, RateLimited, SessionBusy
from shared.keys import Keys, rq_queue_key
from shared.settings import Settings
from tests.support import agent_keys, redis_ms, zmembers

SettingsFactory = Callable[..., Settings]
K = Keys("agent:")


@pytest.fixture(params=["fakeredis", "real"])
def store(request: pytest.FixtureRequest, redis_url: str) -> Iterator[redis.Redis]:
    """The Redis the scripts run on: an in-process fake, then the real server (flushed around each test)."""
    conn: redis.Redis
    if request.param == "fakeredis":
        conn = fakeredis.FakeRedis()
    else:
        conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture
def make_admission(make_settings: SettingsFactory, store: redis.Redis) -> Callable[..., SyncAdmission]:
    def factory(**overrides: object) -> SyncAdmission:
        return SyncAdmission(make_settings(**overrides), store)

    return factory


def ref(user: str = "alice", session_id: str | None = None, job_id: str | None = None) -> LeaseRef:
    return LeaseRef(user=user, session_id=session_id or str(uuid.uuid4()), job_id=job_id or str(uuid.uuid4()))


def test_admitted_ask_records_rate_entry_lease_session_lock_owner_and_deadline(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    r = ref()
    before = redis_ms(store)
    assert adm.admit(r) == 0
    after = redis_ms(store)

    assert agent_keys(store) == {K.rate("alice"), K.leases("alice"), K.session_lock(r.session_id),
                                 K.session_owner(r.session_id), K.deadlines()}
    assert zmembers(store, K.rate("alice")) == {r.job_id}
    lease_expiry = store.zscore(K.leases("alice"), r.job_id)
    assert lease_expiry is not None
    ttl_ms = adm.settings.queued_lease_ttl_ms
    assert before + ttl_ms <= lease_expiry <= after + ttl_ms
    assert store.get(K.session_lock(r.session_id)) == r.job_id.encode()
    assert store.get(K.session_owner(r.session_id)) == b"alice"
    deadline = store.zscore(K.deadlines(), r.deadline_member)
    assert deadline is not None
    assert before + adm.settings.queue_ttl_s * 1000 <= deadline <= after + adm.settings.queue_ttl_s * 1000


def test_position_is_the_number_of_jobs_already_queued(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    store.rpush(rq_queue_key(adm.settings.queue), "a", "b")
    assert adm.admit(ref()) == 2


def test_every_key_admission_and_renewal_write_has_a_ttl(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(concurrency_per_user=3)
    first, second = ref("alice"), ref("bob")
    adm.admit(first)
    adm.admit(second)
    adm.admit(ref("alice"))
    assert adm.renew(first) == 1
    store.delete(K.leases("bob"), K.session_lock(second.session_id))
    assert adm.renew(second) == 2
    keys = agent_keys(store)
    assert len(keys) == 11  # rate, leases for 2 users; lock, owner for 3 sessions; deadlines
    no_ttl = {key: store.pttl(key) for key in keys if store.pttl(key) <= 0}
    assert no_ttl == {}


def test_user_at_the_concurrency_cap_is_refused_naming_an_in_flight_job(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(concurrency_per_user=2)
    held = {ref().job_id for _ in range(2)}
    for job_id in held:
        adm.admit(ref(job_id=job_id))
    refused = ref()
    with pytest.raises(ConcurrencyLimited) as caught:
        adm.admit(refused)
    assert caught.value.extra["job_id"] in held
    assert caught.value.status_code == 429 and caught.value.code == "concurrency_limited"
    assert zmembers(store, K.leases("alice")) == held
    assert zmembers(store, K.rate("alice")) == held
    assert not store.exists(K.session_lock(refused.session_id), K.session_owner(refused.session_id))
    # another user is not limited by alice's cap
    adm.admit(ref("bob"))


def test_second_turn_on_a_busy_session_is_refused_naming_the_turn_in_flight(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(concurrency_per_user=5)
    first = ref()
    adm.admit(first)
    with pytest.raises(SessionBusy) as caught:
        adm.admit(ref(session_id=first.session_id))
    assert caught.value.extra["job_id"] == first.job_id
    assert caught.value.status_code == 409
    assert zmembers(store, K.rate("alice")) == {first.job_id}


def test_ask_over_rate_max_is_refused_with_retry_after_counted_from_the_oldest_entry(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(rate_max=3, rate_window_s=10, concurrency_per_user=10)
    now = redis_ms(store)
    # the oldest ask leaves the 10 s window 2.6 s from now: Retry-After rounds up to 3 (not 2, not the window)
    store.zadd(K.rate("alice"), {"old": now - 7400, "mid": now - 100, "new": now - 50})
    with pytest.raises(RateLimited) as caught:
        adm.admit(ref())
    assert caught.value.retry_after_s == 3
    assert caught.value.headers() == {"Retry-After": "3"}
    assert zmembers(store, K.rate("alice")) == {"old", "mid", "new"}
    assert not store.exists(K.leases("alice"))


def test_rate_window_rolls_entries_older_than_the_window_no_longer_count(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(rate_max=3, rate_window_s=10, concurrency_per_user=10)
    now = redis_ms(store)
    store.zadd(K.rate("alice"), {"expired": now - 10_500, "mid": now - 100, "new": now - 50})
    admitted = ref()
    adm.admit(admitted)
    assert zmembers(store, K.rate("alice")) == {"mid", "new", admitted.job_id}


def test_asks_admitted_and_released_still_count_until_the_window_passes(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(rate_max=2, rate_window_s=10)
    for _ in range(2):
        done = ref()
        adm.admit(done)
        assert adm.release(done) == 2
    with pytest.raises(RateLimited) as caught:
        adm.admit(ref())
    assert caught.value.retry_after_s == 10  # oldest entry is a few ms old: ceil(9.99 s)


def test_admission_is_refused_while_the_queue_holds_max_queued_jobs(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(max_queued=3)
    queue = rq_queue_key(adm.settings.queue)
    store.rpush(queue, *[str(uuid.uuid4()) for _ in range(3)])
    with pytest.raises(QueueFull) as caught:
        adm.admit(ref())
    assert caught.value.status_code == 503 and caught.value.retry_after_s
    assert agent_keys(store) == set()
    store.lpop(queue)
    assert adm.admit(ref()) == 2


def test_nothing_is_admitted_while_draining(make_admission: Callable[..., SyncAdmission], store: redis.Redis) -> None:
    adm = make_admission()
    store.set(K.draining(), "1")
    with pytest.raises(Draining) as caught:
        adm.admit(ref())
    assert caught.value.status_code == 503
    assert agent_keys(store) == {K.draining()}
    store.delete(K.draining())
    adm.admit(ref())


def test_session_owned_by_another_user_is_not_found_and_nothing_is_written(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    session_id = str(uuid.uuid4())
    store.set(K.session_owner(session_id), "bob")
    with pytest.raises(NotFound):
        adm.admit(ref("alice", session_id))
    assert agent_keys(store) == {K.session_owner(session_id)}
    assert store.get(K.session_owner(session_id)) == b"bob"
    adm.admit(ref("bob", session_id))


def test_first_use_of_an_unowned_session_is_claimed_by_exactly_one_of_many_racing_users(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    session_id = str(uuid.uuid4())
    users = [f"user{n}" for n in range(16)]
    outcomes: dict[str, str] = {}
    start = threading.Barrier(len(users))

    def claim(user: str) -> None:
        start.wait()
        try:
            adm.admit(ref(user, session_id))
            outcomes[user] = "admitted"
        except NotFound:
            outcomes[user] = "not_found"

    threads = [threading.Thread(target=claim, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [user for user, outcome in outcomes.items() if outcome == "admitted"]
    assert len(outcomes) == len(users) and len(winners) == 1
    owner = store.get(K.session_owner(session_id))
    assert owner == winners[0].encode()
    assert 0 < store.pttl(K.session_owner(session_id)) <= adm.settings.session_owner_ttl_s * 1000


def test_release_with_a_stale_job_id_frees_nothing(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    holder = ref()
    adm.admit(holder)
    stale = LeaseRef(user=holder.user, session_id=holder.session_id, job_id=str(uuid.uuid4()))
    assert adm.release(stale) == 0
    assert adm.release(stale, refund=True) == 0
    assert zmembers(store, K.leases("alice")) == {holder.job_id}
    assert store.get(K.session_lock(holder.session_id)) == holder.job_id.encode()
    assert zmembers(store, K.rate("alice")) == {holder.job_id}
    assert store.zscore(K.deadlines(), holder.deadline_member) is not None


def test_release_is_idempotent_and_frees_the_slot(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission(concurrency_per_user=1)
    holder = ref()
    adm.admit(holder)
    assert adm.release(holder) == 2  # lease and session lock
    assert adm.release(holder) == 0
    assert agent_keys(store) == {K.rate("alice"), K.session_owner(holder.session_id)}
    adm.admit(ref(session_id=holder.session_id))


def test_refund_takes_the_rate_entry_back(make_admission: Callable[..., SyncAdmission], store: redis.Redis) -> None:
    adm = make_admission(rate_max=1)
    refunded = ref()
    adm.admit(refunded)
    assert adm.release(refunded, refund=True) == 3  # lease, session lock, rate entry
    assert adm.release(refunded, refund=True) == 0
    assert not store.exists(K.rate("alice"), K.leases("alice"), K.session_lock(refunded.session_id))
    adm.admit(ref())  # rate_max=1: only possible because the refunded ask no longer counts


def test_renew_recreates_a_lost_lease_and_lock(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    holder = ref()
    adm.admit(holder)
    store.delete(K.leases("alice"), K.session_lock(holder.session_id))
    before = redis_ms(store)
    assert adm.renew(holder) == 2
    after = redis_ms(store)
    expiry = store.zscore(K.leases("alice"), holder.job_id)
    assert expiry is not None
    assert before + adm.settings.lease_ttl_ms <= expiry <= after + adm.settings.lease_ttl_ms
    assert store.get(K.session_lock(holder.session_id)) == holder.job_id.encode()
    assert 0 < store.pttl(K.session_lock(holder.session_id)) <= adm.settings.lease_ttl_ms
    assert store.zscore(K.deadlines(), holder.deadline_member) is None  # running now: no queue deadline
    assert adm.renew(holder) == 1


def test_renew_returns_0_when_another_job_holds_the_session(
    make_admission: Callable[..., SyncAdmission], store: redis.Redis
) -> None:
    adm = make_admission()
    lost = ref()
    adm.admit(lost)
    adm.release(lost)
    successor = ref(session_id=lost.session_id)
    adm.admit(successor)
    assert adm.renew(lost) == 0
    assert store.get(K.session_lock(lost.session_id)) == successor.job_id.encode()
    assert zmembers(store, K.leases("alice")) == {successor.job_id}


def test_crashed_holders_lease_expires_after_queue_ttl_plus_lease_ttl(
    make_settings: SettingsFactory, rconn: redis.Redis
) -> None:
    adm = SyncAdmission(make_settings(queue_ttl_s=1, lease_ttl_s=3), rconn)
    assert adm.settings.queued_lease_ttl_ms == 4000
    crashed = ref()
    adm.admit(crashed)
    admitted_at = time.monotonic()
    with pytest.raises(ConcurrencyLimited):
        adm.admit(ref())
    time.sleep(max(0.0, admitted_at + 3.0 - time.monotonic()))
    with pytest.raises(SessionBusy):
        adm.admit(ref(session_id=crashed.session_id))
    with pytest.raises(ConcurrencyLimited):
        adm.admit(ref())
    time.sleep(max(0.0, admitted_at + 4.1 - time.monotonic()))
    successor = ref(session_id=crashed.session_id)
    adm.admit(successor)
    assert zmembers(rconn, K.leases("alice")) == {successor.job_id}
    assert math.isclose(rconn.pttl(K.session_lock(crashed.session_id)), 4000, abs_tol=200)
