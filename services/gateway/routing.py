"""Which engine a request goes to: the routing policies and the gateway's view of each engine's
prefix cache.

`cache_aware` (the default) follows SGLang's router: while the engines' loads are balanced, a
request goes to the engine whose cache most likely holds the longest prefix of its prompt, when
that prefix covers at least `--cache-threshold` of the prompt; otherwise to the engine whose cache
the gateway has filled least (the most room). Once loads are out of balance — the busiest engine
has more than `--balance-abs-threshold` samples more than the idlest *and* more than
`--balance-rel-threshold` times as many — requests go to the least loaded engine until balance
returns, so a hot conversation cannot pin all traffic to one engine. Unlike SGLang's router, an
engine that would queue the request (a waiting queue, or every row taken) is passed over while
another has room, so a prefix shared by all traffic (a common system prompt) cannot keep the other
engines idle until the absolute threshold is crossed. And where SGLang's router matches characters
of the request text, the match here is on the prompt's token ids (the gateway has them from the
tokenizer), so it sees exactly the prefix an engine's radix cache would.

Each engine's cache is approximated by a `PrefixIndex`: the prompts routed there, as a trie of
fixed-size token pages keyed by chained hashes (the way vLLM keys its prefix-cache blocks),
bounded in size and trimmed least recently used first. A prefix is always used more recently than
its extensions, so trimming drops the ends of prompts before their beginnings.

`least_load` takes the engine with the fewest running, waiting and just-sent samples;
`power_of_two` the less loaded of two engines drawn at random; `round_robin` each in turn.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROUTING_POLICIES = ("cache_aware", "least_load", "power_of_two", "round_robin")
PAGE_TOKENS = 16  # prefix granularity of the index: a partial last page is not recorded


class PrefixIndex:
    """The token prefixes routed to one engine, as chained hashes of `PAGE_TOKENS`-token pages,
    at most `max_tokens` tokens (`max_tokens // PAGE_TOKENS` pages), least recently used trimmed.

    `match` and `insert` cost O(len(ids) / PAGE_TOKENS) dictionary operations. A hash collision
    can only overstate a match (a routing hint, never a correctness issue)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_pages = max(1, max_tokens // PAGE_TOKENS)
        self._pages: OrderedDict[int, None] = OrderedDict()  # page key -> (LRU order)

    @property
    def size(self) -> int:
        """Tokens recorded."""
        return len(self._pages) * PAGE_TOKENS

    def match(self, ids: Sequence[int]) -> int:
        """Length in tokens of the longest recorded prefix of `ids` (a multiple of PAGE_TOKENS);
        the pages matched become the most recently used."""
        matched = []
        for key in _page_keys(ids):
            if key not in self._pages:
                break
            matched.append(key)
        self._touch(matched)
        return len(matched) * PAGE_TOKENS

    def insert(self, ids: Sequence[int]) -> None:
        """Records every full page of `ids`, then trims to the size bound."""
        self._touch(_page_keys(ids))
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    def _touch(self, chain: list[int]) -> None:
        """Makes a chain of pages the most recently used, its first page last: a prefix stays
        more recent than its extensions, so trimming takes the ends of prompts first."""
        for key in reversed(chain):
            self._pages[key] = None
            self._pages.move_to_end(key)


def _page_keys(ids: Sequence[int]) -> list[int]:
    """Chained hash of each full page: page i's key covers tokens [0, (i + 1) * PAGE_TOKENS)."""
    keys, key = [], 0
    for start in range(0, len(ids) - PAGE_TOKENS + 1, PAGE_TOKENS):
        key = hash((key, tuple(ids[start : start + PAGE_TOKENS])))
        keys.append(key)
    return keys


@dataclass(frozen=True)
class RoutingConfig:
    """The routing flags (GatewayConfig's, by SGLang's router's names and defaults)."""

    policy: str = "cache_aware"
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2**22  # tokens per engine


@dataclass(frozen=True)
class Candidate:
    """A routable engine: its address, load score (running + waiting + sent since the last
    poll, in samples), prefix index, and whether it has room for one more sample now."""

    address: str
    load: int
    index: PrefixIndex
    room: bool = True  # a new sample would run at once (no queue, a free row)


class Policy:
    """Chooses among the routable engines; `choose` records the prompt in the chosen engine's
    index (all policies do, so switching policy on a live gateway keeps the view warm)."""

    def __init__(self, cfg: RoutingConfig, rng: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self._rng = rng
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[Candidate], ids: Sequence[int]) -> Candidate:
        """One of `candidates` (not empty, in a stable order) for a prompt of `ids`."""
        policy = self.cfg.policy
        if policy == "round_robin":
            chosen = candidates[next(self._turn) % len(candidates)]
        elif policy == "power_of_two":
            chosen = self._power_of_two(candidates)
        elif policy == "cache_aware" and ids and not self._imbalanced(candidates):
            chosen = self._cache_aware(candidates, ids)
        else:
            chosen = min(candidates, key=lambda c: c.load)
        if ids:
            chosen.index.insert(ids)
        return chosen

    def _imbalanced(self, candidates: Sequence[Candidate]) -> bool:
        loads = [c.load for c in candidates]
        high, low = max(loads), min(loads)
        cfg = self.cfg
        return high - low > cfg.balance_abs_threshold and high > low * cfg.balance_rel_threshold

    def _cache_aware(self, candidates: Sequence[Candidate], ids: Sequence[int]) -> Candidate:
        roomy = [c for c in candidates if c.room]
        if roomy and len(roomy) < len(candidates):
            candidates = roomy  # never queue for a cache hit while another engine has room
        matches = [(c.index.match(ids), c) for c in candidates]
        best, chosen = max(matches, key=lambda m: (m[0], -m[1].load))
        if best and best >= self.cfg.cache_threshold * len(ids):
            return chosen
        return min(candidates, key=lambda c: (c.index.size, c.load))

    def _power_of_two(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        first = int(self._rng() * len(candidates))
        second = (first + 1 + int(self._rng() * (len(candidates) - 1))) % len(candidates)
        return min(candidates[first], candidates[second], key=lambda c: c.load)
