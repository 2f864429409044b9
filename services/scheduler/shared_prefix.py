"""Which requests of a step share a cached prefix: the Step's `shared_prefixes`, from the tree.

A running request locks the tree node where its cached prefix ends (`req.node`), and its KV slots
for positions 0 .. depth(n)-1 are the path of any ancestor n: every request below n shares them.
Each request joins the group of its deepest ancestor that is at least `MIN_SHARED_PREFIX` deep,
no deeper than the start of its slice (a prefix the step itself computes is not shared), and
reached by another request of the step; groups of one are dropped. Cost: O(requests x tree depth
in edges), a few microseconds per request.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.radix_cache import TreeNode
from services.scheduler.request import Req

# Shorter shared spans save less than the extra kernel calls cost (SGLang's cascade uses similar
# thresholds); 64 tokens of SmolLM2-135M are ~1.5 MB of KV per row.
MIN_SHARED_PREFIX = 64


def shared_prefixes(
    computed: Sequence[tuple[Req, int]], min_len: int = MIN_SHARED_PREFIX
) -> list[tuple[int, list[int]]]:
    """(length, rows) per group of the requests computed in a step, given as (req, slice start).

    A request whose table row is repointed next step (`pending_write`) is left out: its row does
    not hold the tree's slots yet."""
    depth: dict[TreeNode, int] = {}
    paths: list[list[TreeNode]] = []
    count: dict[TreeNode, int] = {}
    for req, start in computed:
        path = _candidates(req, start, min_len, depth)
        for node in path:
            count[node] = count.get(node, 0) + 1
        paths.append(path)
    groups: dict[TreeNode, list[int]] = {}
    for (req, _), path in zip(computed, paths, strict=True):
        node = next((n for n in path if count[n] > 1), None)
        if node is not None:
            assert req.row is not None
            groups.setdefault(node, []).append(req.row)
    return [(depth[node], rows) for node, rows in groups.items() if len(rows) > 1]


def _candidates(req: Req, start: int, min_len: int, depth: dict[TreeNode, int]) -> list[TreeNode]:
    """Ancestors of req.node (itself included), deepest first, min_len <= depth <= start."""
    node = req.node
    if node is None or req.pending_write is not None or req.num_cached < min_len:
        return []
    _fill_depths(node, depth)
    out: list[TreeNode] = []
    while node.parent is not None and depth[node] >= min_len:
        if depth[node] <= start:
            out.append(node)
        node = node.parent
    return out


def _fill_depths(node: TreeNode, depth: dict[TreeNode, int]) -> None:
    """depth[n] = tokens from the root to the end of n's edge, for n and its ancestors."""
    chain: list[TreeNode] = []
    cur = node
    while cur.parent is not None and cur not in depth:
        chain.append(cur)
        cur = cur.parent
    total = depth.get(cur, 0)  # 0 at the root
    for n in reversed(chain):
        total += len(n.key)
        depth[n] = total
