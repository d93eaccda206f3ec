"""Per-example gradient structure: one batched forward, one batched backward per output probe.

For a probe vector v (over the C logits) the per-example gradient of v·f(x) with respect to the parameters of
a Linear, Conv1d/Conv2d or Embedding layer is a sum over positions t of outer products δ_t a_tᵀ (output
gradient times input activation or patch); for norm-affine parameters it is Σ_t δ_t ⊙ x̂_t. Forward hooks
record a (or x̂, or token ids); tensor hooks on the module outputs record δ during a batched backward pass
per probe. Captures are *compact*: inner products between examples are computed from the factors,

    ⟨Σ_t δ_it a_itᵀ, Σ_s δ_js a_jsᵀ⟩ = Σ_{t,s} (δ_it·δ_js)(a_it·a_js),

so for an MLP (one position) a Gram block costs two small matrix products and never forms a per-example
gradient. Where the factored form is more expensive than the gradient itself (many positions, e.g.
convolutions), the capture materializes per-example gradients (one batched einsum) instead.

Every other selected parameter (custom layers, attention in-projections, weight-tied parameters, layers
called functionally) falls back to per-example vector-Jacobian products with ``torch.func`` (``vmap`` over
examples), and to a plain per-example loop if ``vmap`` cannot trace the model.

Modules must be called batch-first. A module called on an input shared by the whole batch (first
dimension 1 in a block of B > 1: BERT's default ``position_ids`` of shape (1, L), a buffer, a constant)
has its output expanded to (B, ...) before the network uses it, so each example's gradient reaches its own
copy and stays exact; if that expansion changes the network's logits (the output was broadcast along
another axis, or reduced), or a module's input is not batch-first at all (unbatched, sequence-first), its
parameters use the fallback.

On the first block of every call, a randomly weighted sum over examples of the hook-based per-example
gradients, Σ_i w_i g_i with fixed pseudo-random w_i in [0.5, 1.5), is checked against autograd's gradient
of Σ_i w_i v_i·f(x_i) (one extra backward pass). Unlike a plain batch sum, this sees gradients credited to
the wrong example. A parameter whose hook-based gradient does not match (a weight also used outside its
module, a batch laid out elsewhere) is moved to the fallback path with a warning, so results are exact
either way.

Data flow (one module per step):

* :mod:`.rules`: a :class:`Rule` per covered module, chosen by module type from :data:`RULES`
  (:func:`rule_for`), hooks the module and turns (input, δ) into a compact capture;
* :mod:`.fallback`: :class:`Fallback` gives the other parameters' per-example gradients;
* :mod:`.caps`: the captures (:class:`OuterCap`, :class:`EmbeddingCap`, :class:`DenseCap`) of one block
  (:class:`BlockCapture`) and their Gram products;
* :mod:`.plan`: :class:`CapturePlan`, the block size and materialized layers from one memory budget;
* :mod:`.gradients`: :class:`GradientCapture` runs a block (forward, backward per probe, first-block
  checks and demotions, fallback) and plans a call;
* :mod:`.activations`: :class:`ActivationCapture`, the forward-only captures (Em, CK).
"""

from .activations import ActivationCapture
from .caps import BlockCapture, Cap, DenseCap, EmbeddingCap, OuterCap, position_gram
from .fallback import Fallback
from .gradients import GradientCapture, ProbeFn
from .plan import (
    DENSE_ADVANTAGE,
    GRAM_TILE_BYTES,
    CapturePlan,
    RuleCost,
    largest_block,
    plan_blocks,
    rule_cost,
)
from .rules import (
    RULES,
    ConvRule,
    EmbeddingRule,
    LinearRule,
    NormRule,
    OuterRule,
    Rule,
    materialize_is_cheaper,
    register_rule,
    rule_for,
)

__all__ = [
    "DENSE_ADVANTAGE",
    "GRAM_TILE_BYTES",
    "RULES",
    "ActivationCapture",
    "BlockCapture",
    "Cap",
    "CapturePlan",
    "ConvRule",
    "DenseCap",
    "EmbeddingCap",
    "EmbeddingRule",
    "Fallback",
    "GradientCapture",
    "LinearRule",
    "NormRule",
    "OuterCap",
    "OuterRule",
    "ProbeFn",
    "Rule",
    "RuleCost",
    "largest_block",
    "materialize_is_cheaper",
    "plan_blocks",
    "position_gram",
    "register_rule",
    "rule_cost",
    "rule_for",
]
