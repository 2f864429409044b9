"""Which requests of a step share a cached prefix: the Step's `shared_prefixes`, from the tree.

A running request locks the tree node where its cached prefix ends (`req.node`), and its KV slots
for positions 0 .. depth(n)-1 are the path of any ancestor n: every request below n shares them.
A request's candidates are its ancestors (itself included) at least `MIN_SHARED_PREFIX` deep and
no deeper than the start of its slice (a prefix the step itself computes is not shared).

Each request joins at most one group, and the groups are chosen for the KV reads they save: a
group of m rows over L positions reads the span once instead of m times, saving (m - 1) x L
position reads. Grouping by the deepest node with company alone splits rows that share a long
system prompt by the first tokens of their questions (3 rows at 1,001 positions and 2 at 1,002
instead of 5 at 1,000: 3,004 positions saved instead of 4,000), and attention backends keep
spans of too few rows off their span kernels (torch_backend's SPAN_MIN_ROWS). So, from the
deepest candidate nodes up, a node either keeps the groups found below it (plus one of the rows
that reach it without one) or gathers every row below it into one group, whichever saves more.
Groups of one are dropped. Extend rows count here as decode rows do, though by default the
attention backends keep only a span's decode rows (their select_shared_prefixes). Cost:
O(requests x tree depth in edges), a few microseconds per request.
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
    """(length, rows) per group of the requests computed in a step, given as (req, slice start),
    chosen node by node from the deepest for the position reads they save (module docstring: a
    greedy choice, not a search over every partition).

    A request whose table row is repointed next step (`pending_write`) is left out: its row does
    not hold the tree's slots yet."""
    depth: dict[TreeNode, int] = {}
    ends: dict[TreeNode, list[int]] = {}  # rows whose deepest candidate is the node
    above: dict[TreeNode, TreeNode | None] = {}  # the next candidate up (None: the top one)
    for req, start in computed:
        path = _candidates(req, start, min_len, depth)
        if not path:
            continue
        assert req.row is not None
        ends.setdefault(path[0], []).append(req.row)
        # Every ancestor of a candidate that is at least min_len deep is a candidate too (it is
        # shallower than the slice start), so `above` is the same whichever request sets it.
        for node, parent in zip(path, [*path[1:], None], strict=True):
            above[node] = parent
    below: dict[TreeNode, list[TreeNode]] = {}
    for node, parent in above.items():
        if parent is not None:
            below.setdefault(parent, []).append(node)
    # Per node, deepest first: its groups (depth, rows), the position reads they save, the rows
    # below it in none of them (at most one: two such rows would group at this node) and all
    # rows below it.
    groups: dict[TreeNode, list[tuple[int, list[int]]]] = {}
    saved: dict[TreeNode, int] = {}
    loose: dict[TreeNode, list[int]] = {}
    rows: dict[TreeNode, list[int]] = {}
    for node in sorted(above, key=depth.__getitem__, reverse=True):
        kids = below.get(node, [])
        rows[node] = ends.get(node, []) + [r for k in kids for r in rows[k]]
        reaching = ends.get(node, []) + [r for k in kids for r in loose[k]]
        kept = [g for k in kids for g in groups[k]]
        kept_saved = sum(saved[k] for k in kids)
        if len(reaching) > 1:
            kept.append((depth[node], sorted(reaching)))
            kept_saved += (len(reaching) - 1) * depth[node]
            reaching = []
        gathered = (len(rows[node]) - 1) * depth[node]
        if gathered > kept_saved:
            groups[node], saved[node], loose[node] = (
                [(depth[node], sorted(rows[node]))],
                gathered,
                [],
            )
        else:
            groups[node], saved[node], loose[node] = kept, kept_saved, reaching
    return [g for node, parent in above.items() if parent is None for g in groups[node]]


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
