"""The gateway's prefix-aware router over a `PrefixIndex` fed by hand (the events' wire path is tested elsewhere)."""

from __future__ import annotations

import pytest

from dsv4.model_runtime.engine.prefix_hash import chain_hashes, chain_seed
from dsv4.protocol.config import PrefixRoutingConfig
from dsv4.services.gateway.routing import PrefixRouter
from dsv4.services.kv_events import KVEvent, PrefixIndex, WorkerLoad

pytestmark = pytest.mark.unit

FP, BS = "fp", 8
SYSTEM_A = list(range(1000, 1032))  # 4 blocks
SYSTEM_B = list(range(2000, 2032))


def _hashes(tokens: list[int]) -> tuple[str, ...]:
    return tuple(chain_hashes(chain_seed(FP, BS), tokens, BS))


def _router(max_queued_tokens: int = 1000, **holdings: tuple[str, ...]) -> PrefixRouter:
    index = PrefixIndex(forget_after_s=100)
    for worker, held in holdings.items():
        index.apply(KVEvent(worker, "snapshot", held, BS, WorkerLoad(), model=FP), now=0)
    return PrefixRouter("prefill", PrefixRoutingConfig(max_queued_tokens=max_queued_tokens), index)


def test_a_request_goes_to_the_worker_holding_its_prefix() -> None:
    router = _router(a=_hashes(SYSTEM_A)[-1:], b=_hashes(SYSTEM_B)[-1:])
    for k in range(20):
        system = SYSTEM_A if k % 2 else SYSTEM_B
        route = router.choose([*system, 5, k], now=1)
        assert (route.worker, route.reason, route.matched_tokens) == ("a" if k % 2 else "b", "prefix", 32)
        assert route.new_tokens == 2
        router.done(route)
    assert router.outstanding("a") == router.outstanding("b") == 0


def test_a_cold_burst_lands_on_one_worker_until_it_is_saturated() -> None:
    """Nobody holds the prefix: the first request goes by load, the prediction pulls the next ones after it; once the
    worker's outstanding tokens reach the bound, the next ones go elsewhere, then to the shared stream."""
    router = _router(max_queued_tokens=41, a=(), b=())
    prompts = [[*SYSTEM_A, 7, k] for k in range(6)]
    routes = [router.choose(p, now=1) for p in prompts]
    assert [(r.worker, r.reason) for r in routes[:5]] == [("a", "load")] + [("a", "prefix")] * 4
    assert router.outstanding("a") == 34 + 4 * 2
    assert routes[5].worker == "b" and routes[5].reason == "load"  # a is saturated (42 >= 41)
    router.choose([*SYSTEM_B, 1], now=1)  # b: 34 + 33 >= 41 after this one
    shared = router.choose([*SYSTEM_B, 2], now=1)
    assert shared.worker is None and shared.reason == "shared"


def test_no_live_worker_or_routing_off_means_the_shared_stream() -> None:
    assert _router().choose([1, 2, 3], now=1).reason == "shared"
    off = PrefixRouter("prefill", PrefixRoutingConfig(enabled=False), _router(a=()).index)
    assert off.choose([1, 2, 3], now=1).worker is None


def test_ties_go_to_the_least_loaded_holder_and_the_last_token_is_never_matched() -> None:
    held = _hashes(SYSTEM_A)[-1:]
    router = _router(a=held, b=held)
    first = router.choose([*SYSTEM_A, 9, 9, 9], now=1)
    second = router.choose([*SYSTEM_A, 8, 8, 8], now=1)
    assert {first.worker, second.worker} == {"a", "b"}
    whole = router.choose(SYSTEM_A, now=1)  # the prompt is exactly the held prefix: its last token is computed
    assert whole.matched_tokens == 31 and whole.new_tokens == 1 and whole.reason == "prefix"


def test_a_worker_that_left_gets_nothing() -> None:
    router = _router(a=_hashes(SYSTEM_A)[-1:], b=())
    router.index.apply(KVEvent("a", "left", (), BS, model=FP), now=2)
    assert router.choose([*SYSTEM_A, 1], now=3).worker == "b"


def test_a_new_prefix_goes_to_the_worker_holding_fewer_prefixes() -> None:
    router = _router(a=_hashes(SYSTEM_A)[-1:], b=())
    route = router.choose([*SYSTEM_B, 1], now=1)
    assert (route.worker, route.reason) == ("b", "load")


def test_a_chats_next_turn_goes_where_the_previous_turn_went() -> None:
    """Both workers hold the system prompt; a conversation's turns extend the previous prompt, whose end (not a
    block boundary, so no event names it) the router remembers for the worker it chose."""
    held = _hashes(SYSTEM_A)[-1:]
    router = _router(a=held, b=held)
    turns = {c: [*SYSTEM_A, 100 + c, 7, 7] for c in range(6)}
    first = {c: router.choose(turns[c], now=1) for c in turns}
    assert {r.worker for r in first.values()} == {"a", "b"}, "the load spreads the conversations"
    for r in first.values():
        router.done(r)
    for c in turns:
        turns[c] = [*turns[c], 40, 41, 42, 43, 44, 45, 46, 47, 48, 50 + c]  # the answer and the next message
        route = router.choose(turns[c], now=100)  # after the block predictions expired
        assert route.worker == first[c].worker and route.matched_tokens == 35, c
        router.done(route)
    assert router.choose([*SYSTEM_A, 999, 7, 7], now=100).matched_tokens == 32  # another conversation: the system
    for w in ("a", "b"):  # still alive much later
        router.index.apply(KVEvent(w, "snapshot", held, BS, WorkerLoad(), model=FP), now=390)
    assert router.choose(turns[0], now=400).matched_tokens == 32  # the end was forgotten after END_TTL_S
