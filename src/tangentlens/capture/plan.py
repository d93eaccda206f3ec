"""Planning a call's captures from one memory budget: examples per capture and which layers to materialize.

The plan is made once per call from a trial capture of the first block (see
:meth:`~.gradients.GradientCapture.plan`): :func:`rule_cost` measures each layer rule's bytes per example,
:func:`plan_blocks` chooses the materialized layers and the block size, and :func:`largest_block` solves the
budget's quadratic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .caps import BlockCapture, Cap, EmbeddingCap, OuterCap
from .rules import OuterRule, Rule, materialize_is_cheaper

DENSE_ADVANTAGE = 4
"""Materialize a layer's per-example gradients only where the factored Gram is this many times more work
per pair: materializing costs T·M·d_in·d_out per example and its Gram is bound by memory traffic."""

GRAM_TILE_BYTES = 4 * 2**20
"""Position-wise Gram intermediates of one pair of blocks are kept near this size: larger tiles are no
faster (a MiniLM-sized BERT, 30 tokens, N = 48, 1 thread: blocks of 12 or 16 examples 4.7-4.8 s, 24
5.8 s, one block of 48 6.4 s), and a symmetric kernel computes only the upper triangle of its block pairs."""

@dataclass
class CapturePlan:
    """How a call captures its blocks (see :meth:`~.gradients.GradientCapture.plan`).

    Attributes:
        block: examples per capture (≤ the caller's ``batch_size``).
        fits: the most examples per capture the working budget allows (``block`` may be smaller, to keep
            Gram tiles near ``GRAM_TILE_BYTES``).
        per_example: bytes of one example's captures (what a cached column costs).
        working: bytes of working memory per example of a block.
        activations: bytes the forward saves for backward, per example.
        dropped: layers not materialized because the captures would not fit the cache budget.
        capture: the trial's capture when the trial was the whole first block (to be used as its capture).
    """

    block: int
    fits: int
    per_example: int
    working: int
    activations: int
    dropped: list[str]
    capture: BlockCapture | None = None


class RuleCost(NamedTuple):
    """Per-example bytes of one layer rule, measured by the planning capture.

    Attributes:
        rule: the layer rule.
        factored: its compact capture.
        dense: its materialized per-example gradients.
        pair: the largest intermediate of one pair of examples in a position-wise Gram block.
        candidate: materialize it if the cache allows.
    """

    rule: Rule
    factored: float
    dense: float
    pair: float
    candidate: bool


def rule_cost(rule: Rule, cap: Cap, examples: int, materialize: str) -> RuleCost:
    """Measure one rule's capture ``cap`` of a trial slice of ``examples`` examples.

    A Linear/Conv layer with T > 1 positions is a candidate for materializing where its factored Gram is
    over ``DENSE_ADVANTAGE`` times more work per pair (:func:`~.rules.materialize_is_cheaper`) and the
    consumer allows it (``materialize``, see :func:`plan_blocks`); with "all" every layer is, with
    "kronecker" or "all" so is an embedding table.
    """
    factored = cap.nbytes() / examples
    pair, dense, candidate = 0.0, 0.0, False
    if isinstance(cap, OuterCap):
        es = cap.delta.element_size()
        T, din, dout, M = cap.a.shape[1], cap.a.shape[2], cap.delta.shape[3], cap.delta.shape[1]
        dense = M * (din * dout * (cap.weight is not None) + dout * (cap.bias is not None)) * es
        pair = 3.0 * T * T * es if T > 1 else 0.0
        candidate = (
            materialize != "kronecker" and rule.allow_dense
            and materialize_is_cheaper(T, din, dout, M, DENSE_ADVANTAGE)
        ) or materialize == "all"
    elif isinstance(cap, EmbeddingCap):
        es = cap.delta.element_size()
        T, d, M = cap.delta.shape[2], cap.delta.shape[3], cap.delta.shape[1]
        dense = M * cap.num_embeddings * d * es
        pair = 4.0 * T * T * es
        candidate = materialize != "chosen"  # features materialize the table's gradient
    return RuleCost(rule, factored, dense, pair, candidate)


def largest_block(w: float, g: float, budget: float, limit: int, tile: bool = True) -> int:
    """The largest s ≤ limit (at least 1) with s·w + s²·g ≤ budget (and s²·g ≤ ``GRAM_TILE_BYTES``).

    Args:
        w: working bytes per example.
        g: bytes of the largest Gram intermediate per pair of examples (0: none).
        budget: the working budget in bytes.
        limit: the caller's ``batch_size``.
        tile: also keep Gram tiles within ``GRAM_TILE_BYTES``.
    """
    if g > 0:
        s = (-w + math.sqrt(w * w + 4 * g * budget)) / (2 * g)
        if tile:
            s = min(s, math.sqrt(GRAM_TILE_BYTES / g))
    else:
        s = budget / max(w, 1.0)
    return int(max(1, min(limit, math.floor(s))))


def plan_blocks(
    costs: list[RuleCost],
    fallback: float,
    graph: float,
    *,
    limit: int,
    n_cache: int,
    cache_budget: int,
    work_budget: int,
    materialize: str,
) -> tuple[CapturePlan, list[OuterRule]]:
    """Choose the layers to materialize and the examples per capture.

    * With "chosen", every candidate is materialized while the captures of ``n_cache`` examples fit
      ``cache_budget``; candidates with the largest materialized excess are dropped first.
    * The block is the largest s ≤ ``limit`` with s·w + s²·g ≤ ``work_budget`` and s²·g ≤
      ``GRAM_TILE_BYTES``, where w is the per-example working memory (saved activations and backward
      transients, captures, materialized and fallback gradients, each counted twice for the temporaries
      that build them) and g the largest per-pair intermediate of a position-wise Gram block of a layer
      left factored (kernels only: features form no Gram blocks).

    Args:
        costs: each rule's measured bytes per example.
        fallback: the fallback's gradient bytes per example.
        graph: the bytes the forward saves for backward, per example.
        limit: the caller's ``batch_size``.
        n_cache: examples whose captures may be cached at once.
        cache_budget: bytes for cached captures.
        work_budget: bytes of one block's working set.
        materialize: what the consumer of the captures needs: kernels ("chosen": the plan picks the
            layers to materialize), flat features ("all": every gradient is materialized) or
            Kronecker-projected features ("kronecker": Linear/Conv factors stay, other layers materialize).

    Returns:
        The plan (without a capture) and the Linear/Conv rules whose captures a kernel materializes.
    """
    dense = {id(st.rule) for st in costs if st.candidate}
    dropped: list[str] = []

    def cache_pe() -> float:
        return fallback + sum(st.dense if id(st.rule) in dense else st.factored for st in costs)

    if materialize == "chosen":
        for st in sorted(costs, key=lambda st: st.dense - st.factored, reverse=True):
            if n_cache * cache_pe() <= cache_budget:
                break
            if id(st.rule) in dense:
                dense.discard(id(st.rule))
                dropped.append(st.rule.group)
    per_example = cache_pe()
    # saved activations and backward transients; captures and the temporaries that build them
    w = 2 * graph + 2 * per_example + sum(st.factored for st in costs)
    # Gram intermediates of factored layers (features form no Gram blocks)
    pairs = [st.pair for st in costs if id(st.rule) not in dense] if materialize == "chosen" else []
    g = max(pairs, default=0.0)
    block = largest_block(w, g, work_budget, limit)
    fits = largest_block(w, g, work_budget, limit, tile=False)
    chosen = [
        st.rule for st in costs
        if isinstance(st.rule, OuterRule) and materialize == "chosen" and id(st.rule) in dense
    ]
    return CapturePlan(block, fits, int(per_example), int(w), int(graph), dropped), chosen
