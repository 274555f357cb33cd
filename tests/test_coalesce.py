"""Coalescing's bookkeeping (consumer/coalesce.py): which deliveries one call may settle."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.coalesce import Coalescer, coalesce_key, newest
from consumer.contract import BillingEvent, Event, ResourceEvent

KEYS = ("a", "b", "c")
# One step of a hostile schedule: a delivery arrives for a key; the leader of a key starts
# its call; a key's call ends; a waiting delivery is cancelled.
STEP = st.one_of(
    st.tuples(st.just("arrive"), st.sampled_from(KEYS)),
    st.tuples(st.just("start"), st.sampled_from(KEYS)),
    st.tuples(st.just("finish"), st.sampled_from(KEYS)),
    st.tuples(st.just("withdraw"), st.integers(0, 1000)),
)


class Model:
    """Drives a Coalescer as the handler does and records what each call settled."""

    def __init__(self) -> None:
        self.coalescer: Coalescer[int] = Coalescer()
        self.clock = 0
        self.arrived: dict[int, tuple[str, int]] = {}  # member → (key, time it arrived)
        self.leader: dict[str, int] = {}  # key → member that leads its next call
        self.calling: dict[str, tuple[int, list[int]]] = {}  # key → (start time, batch)
        self.settled: dict[int, int] = {}  # member → start time of the call that settled it
        self.withdrawn: set[int] = set()
        self.waiting: set[int] = set()

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def arrive(self, key: str) -> None:
        member = len(self.arrived)
        self.arrived[member] = (key, self.tick())
        self.waiting.add(member)
        if self.coalescer.arrive(key, member):
            assert key not in self.leader, "two leaders for one key"
            self.leader[key] = member

    def start(self, key: str) -> None:
        if key not in self.leader or key in self.calling:
            return
        del self.leader[key]
        started = self.tick()
        batch = self.coalescer.start(key)
        assert batch, "a call that settles nobody"
        self.calling[key] = (started, batch)

    def finish(self, key: str) -> None:
        if key not in self.calling:
            return
        started, batch = self.calling.pop(key)
        for member in batch:
            assert member not in self.settled, "a delivery settled twice"
            self.settled[member] = started
            self.waiting.discard(member)
        self.promote(key, self.coalescer.finish(key))

    def withdraw(self, pick: int) -> None:
        candidates = sorted(self.waiting - {m for _, b in self.calling.values() for m in b})
        if not candidates:
            return
        member = candidates[pick % len(candidates)]
        key = self.arrived[member][0]
        self.waiting.discard(member)
        self.withdrawn.add(member)
        if self.leader.get(key) == member:
            del self.leader[key]
        self.promote(key, self.coalescer.withdraw(key, member))

    def promote(self, key: str, leader: int | None) -> None:
        if leader is not None:
            assert key not in self.leader, "two leaders for one key"
            self.leader[key] = leader


@settings(max_examples=400, deadline=None)
@given(st.lists(STEP, max_size=150))
def test_each_delivery_is_settled_once_by_a_call_that_started_after_it(
    steps: list[tuple[str, object]],
) -> None:
    """Whatever the interleaving of arrivals, calls and cancellations: at most one call per
    key is in flight; a call settles only deliveries of its key that arrived before it started;
    once every leader has called, every delivery that did not withdraw was settled exactly
    once, and nothing is left behind in the coalescer."""
    model = Model()
    for step in steps:
        getattr(model, step[0])(step[1])
        assert len(model.calling) <= len(KEYS)
    for _ in range(len(model.arrived) + 2):  # let every leader call, to the end
        for key in KEYS:
            model.finish(key)
            model.start(key)
    for member, started in model.settled.items():
        key, arrived = model.arrived[member]
        assert arrived < started
    assert set(model.settled) | model.withdrawn == set(model.arrived)
    assert not set(model.settled) & model.withdrawn
    assert model.coalescer.keys == 0
    assert model.coalescer.keys_waiting() == 0


def test_a_delivery_arriving_during_a_call_waits_for_the_next() -> None:
    """Trailing edge: what arrives while the key's call is in flight is not settled by it; the
    first of those leads the next call, which settles all of them."""
    coalescer: Coalescer[str] = Coalescer()
    assert coalescer.arrive("k", "m1")
    assert coalescer.start("k") == ["m1"]
    assert not coalescer.arrive("k", "m2")
    assert not coalescer.arrive("k", "m3")
    assert coalescer.keys_waiting() == 1
    assert coalescer.finish("k") == "m2"
    assert coalescer.start("k") == ["m2", "m3"]
    assert coalescer.finish("k") is None
    assert coalescer.keys == 0


def _resource(**fields: object) -> Event:
    values: dict[str, object] = {
        "id": "e",
        "type": "resource.renamed",
        "occurred_at": datetime(2026, 1, 1, tzinfo=UTC),
        "installation_id": "icfg",
        "resource_id": "r1",
        **fields,
    }
    return ResourceEvent.model_validate(values, strict=False)


def test_keys_separate_installations_resources_and_billing() -> None:
    """Resource events key on (installation, resource); every billing event of an installation
    shares one key (Vercel's installation.updated), whatever its verb."""
    assert coalesce_key(_resource()) == coalesce_key(_resource(type="resource.status.changed"))
    assert coalesce_key(_resource()) != coalesce_key(_resource(resource_id="r2"))
    assert coalesce_key(_resource()) != coalesce_key(_resource(installation_id="other"))
    moment = datetime(2026, 1, 1, tzinfo=UTC)
    billing = [
        BillingEvent(id="b", type=t, occurred_at=moment, installation_id="icfg")
        for t in ("billing.plan.changed", "billing.cancelled")
    ]
    assert coalesce_key(billing[0]) == coalesce_key(billing[1])
    assert coalesce_key(billing[0]) != coalesce_key(_resource())


def test_the_newest_event_by_occurred_at_gives_the_payload() -> None:
    """The combined call carries the latest occurred_at's payload, the last received on a tie,
    whatever order they were received in."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    late = _resource(product_id="late", occurred_at=base + timedelta(seconds=5))
    early = _resource(product_id="early", occurred_at=base)
    tie = _resource(product_id="tie", occurred_at=base + timedelta(seconds=5))
    assert newest([early, late]) is late
    assert newest([late, early]) is late
    assert newest([late, early, tie]) is tie
