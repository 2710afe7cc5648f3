"""Unit tests of the coordinator's pure state, with a hand-stepped clock (no sleeps, no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest

from coordinator.registry import Registry

GiB = 1 << 30
MiB = 1 << 20


class FakeClock:
    """Monotonic and wall time in one, advanced only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reg(clock: FakeClock) -> Registry:
    return Registry(dead_after=3.0, clock=clock, wall=clock)


def register(reg: Registry, name: str, capacity: int = GiB) -> list[dict]:
    return reg.register(
        name=name,
        address=f"10.0.0.{len(reg.blades) + 1}:7000",
        capacity_bytes=capacity,
        unit_size=MiB,
        slab_sizes=[MiB, 4 * MiB],
        mode="dram",
        pid=100 + len(reg.blades),
    )


def heartbeat(reg: Registry, name: str, used: int = 0, capacity: int = GiB) -> tuple[bool, list]:
    return reg.heartbeat(
        name=name,
        used_bytes=used,
        capacity_bytes=capacity,
        slabs_total=capacity // MiB,
        slabs_used=used // MiB,
        host_mem_percent=40.0,
        host_mem_available=8 * GiB,
    )


def kinds(events: list[dict]) -> list[tuple[str, str]]:
    return [(e["kind"], e["blade"]) for e in events]


def test_register_heartbeat_status(reg: Registry, clock: FakeClock) -> None:
    assert register(reg, "b") == []
    assert register(reg, "a") == []
    clock.advance(0.5)
    known, _ = heartbeat(reg, "a", used=GiB // 4)
    assert known
    clock.advance(0.25)
    st = reg.status()
    assert [b["name"] for b in st] == ["a", "b"]
    assert st[0]["used_bytes"] == GiB // 4 and st[0]["alive"] is True
    assert st[0]["last_heartbeat_age_s"] == pytest.approx(0.25)
    assert st[1]["last_heartbeat_age_s"] == pytest.approx(0.75)


def test_unknown_heartbeat_is_not_known(reg: Registry) -> None:
    known, events = heartbeat(reg, "ghost")
    assert known is False and events == []
    assert reg.status() == []


def test_dead_after_silence_emitted_once(reg: Registry, clock: FakeClock) -> None:
    register(reg, "a")
    register(reg, "b")
    clock.advance(2.0)
    heartbeat(reg, "b")
    clock.advance(1.5)  # a silent 3.5 s, b 1.5 s
    assert kinds(reg.tick()) == [("blade_dead", "a")]
    assert kinds(reg.tick()) == []  # once only
    clock.advance(10)
    assert kinds(reg.tick()) == [("blade_dead", "b")]
    assert [b["alive"] for b in reg.status()] == [False, False]


def test_reregister_dead_blade_emits_alive(reg: Registry, clock: FakeClock) -> None:
    register(reg, "a")
    assert register(reg, "a") == []  # re-register while alive: no event
    clock.advance(4)
    reg.tick()
    events = register(reg, "a")
    assert kinds(events) == [("blade_alive", "a")]
    assert reg.status()[0]["alive"] is True


def test_heartbeat_from_dead_blade_revives_it(reg: Registry, clock: FakeClock) -> None:
    register(reg, "a")
    clock.advance(4)
    reg.tick()
    known, events = heartbeat(reg, "a")
    assert known and ("blade_alive", "a") in kinds(events)


def test_events_since_and_cursor(reg: Registry, clock: FakeClock) -> None:
    register(reg, "a")
    register(reg, "b")
    clock.advance(4)
    reg.tick()
    events, nxt = reg.events_since(0)
    assert [e["seq"] for e in events] == [1, 2] and nxt == 2
    assert events[0]["time"] == clock.now
    assert reg.events_since(2) == ([], 2)
    events, nxt = reg.events_since(1)
    assert [e["seq"] for e in events] == [2] and nxt == 2
    # A cursor from before a coordinator restart (larger than ours) sees everything.
    events, nxt = reg.events_since(99)
    assert len(events) == 2 and nxt == 2


def test_hint_burst_spreads_then_decays_on_heartbeat(reg: Registry) -> None:
    for n in ("a", "b", "c"):
        register(reg, n)
    picks = Counter(reg.hint(1, 10 * MiB)[0][0] for _ in range(30))
    assert picks == {"a": 10, "b": 10, "c": 10}
    assert reg.hints_total == 30
    # Blade a reports it actually used little: its pending charge goes, it is least loaded.
    heartbeat(reg, "a", used=MiB)
    heartbeat(reg, "b", used=50 * MiB)
    heartbeat(reg, "c", used=20 * MiB)
    assert [n for n, _ in reg.hint(3, MiB)] == ["a", "c", "b"]


def test_hint_distinct_alive_room_exclude(reg: Registry, clock: FakeClock) -> None:
    register(reg, "a")
    register(reg, "b")
    register(reg, "small", capacity=64 * MiB)
    register(reg, "dead")
    clock.advance(2)
    for n in ("a", "b"):
        heartbeat(reg, n)
    heartbeat(reg, "small", capacity=64 * MiB)
    clock.advance(2)
    reg.tick()  # "dead" has been silent 4 s
    names = [n for n, _ in reg.hint(5, 128 * MiB)]
    assert sorted(names) == ["a", "b"]  # not dead, not too small, no duplicates
    # b now carries 128M pending, small nothing: small is the less loaded one.
    assert [n for n, _ in reg.hint(5, MiB, exclude=["a"])] == ["small", "b"]
    assert reg.hint(2, 2 * GiB) == []
    assert reg.hint(0, MiB) == []


def test_hint_room_counts_pending(reg: Registry) -> None:
    register(reg, "a", capacity=100 * MiB)
    assert len(reg.hint(1, 60 * MiB)) == 1
    assert reg.hint(1, 60 * MiB) == []  # 60 of 100 already promised


def test_shed_advice(reg: Registry, clock: FakeClock) -> None:
    for n in ("hot", "cool", "mid"):
        register(reg, n)
    heartbeat(reg, "cool", used=GiB // 10)
    heartbeat(reg, "mid", used=GiB * 7 // 10)
    _, events = heartbeat(reg, "hot", used=GiB * 95 // 100)
    shed = [e for e in events if e["kind"] == "shed"]
    assert len(shed) == 1
    e = shed[0]
    assert e["blade"] == "hot" and e["target"] == "cool"
    # Down to the watermarks' midpoint (0.725): 0.95 - 0.725 = 0.225 of 1 GiB, in whole units.
    assert 0.22 * GiB <= e["bytes"] <= 0.23 * GiB and e["bytes"] % MiB == 0
    # Cooldown: no second advice within 10 s, one again after.
    clock.advance(5)
    for n, u in (("cool", GiB // 10), ("mid", GiB * 7 // 10)):
        heartbeat(reg, n, used=u)
    _, events = heartbeat(reg, "hot", used=GiB * 95 // 100)
    assert [e for e in events if e["kind"] == "shed"] == []
    clock.advance(5.5)
    for n, u in (("cool", GiB // 10), ("mid", GiB * 7 // 10)):
        heartbeat(reg, n, used=u)
    _, events = heartbeat(reg, "hot", used=GiB * 95 // 100)
    assert kinds([e for e in events if e["kind"] == "shed"]) == [("shed", "hot")]
    assert reg.event_counts["shed"] == 2


def test_no_shed_without_cool_or_when_cool_dead(reg: Registry, clock: FakeClock) -> None:
    register(reg, "hot")
    register(reg, "warm")
    heartbeat(reg, "warm", used=GiB * 7 // 10)
    _, events = heartbeat(reg, "hot", used=GiB * 9 // 10)
    assert not [e for e in events if e["kind"] == "shed"]  # warm is above the low watermark
    register(reg, "cool")  # registers, then never heartbeats
    clock.advance(2)
    heartbeat(reg, "warm", used=GiB * 7 // 10)
    heartbeat(reg, "hot", used=GiB * 9 // 10)
    clock.advance(2)
    _, events = heartbeat(reg, "warm", used=GiB * 7 // 10)
    assert kinds(events) == [("blade_dead", "cool")]
    _, events = heartbeat(reg, "hot", used=GiB * 9 // 10)
    assert not [e for e in events if e["kind"] == "shed"]


def test_shed_amount_capped_by_target_room(reg: Registry) -> None:
    register(reg, "hot", capacity=10 * GiB)
    register(reg, "cool", capacity=GiB)
    heartbeat(reg, "cool", used=GiB // 2, capacity=GiB)
    _, events = heartbeat(reg, "hot", used=10 * GiB * 95 // 100, capacity=10 * GiB)
    (e,) = [e for e in events if e["kind"] == "shed"]
    # cool may only rise from 0.5 to 0.725 of 1 GiB.
    assert e["bytes"] <= int(0.725 * GiB) - GiB // 2 + MiB


def test_dead_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Registry(dead_after=0)
