"""Exercise checks that hint: a learner's function is tried on random and edge cases, and a
failure names the symptom ("probabilities do not sum to 1") rather than just failing.

Each checker returns a :class:`Result`; displaying it in a notebook prints ✓ or ✗ and the hint.
The checks live one module per chapter (:mod:`~cyclelab.checks.tokenizing`, :mod:`~cyclelab.checks.embedding`,
…), each check beside its reference and hints; :mod:`~cyclelab.checks.harness` runs them.
"""

from cyclelab.checks.attention import check_causal_attention, check_decode_step
from cyclelab.checks.clock_cycle import check_greedy_step
from cyclelab.checks.decoding import check_masked_prediction, check_perplexity, check_top_p_filter
from cyclelab.checks.efficiency import check_attainable, check_int8_row
from cyclelab.checks.embedding import check_embed_lookup, check_mean_pool, check_rope_pair
from cyclelab.checks.fine_tuning import check_lora_forward, check_masked_labels, check_training_step
from cyclelab.checks.forward_pass import check_block, check_layer_norm, check_rms_norm
from cyclelab.checks.harness import Result
from cyclelab.checks.knowledge import check_graph_lookup, check_ig_sum, check_patched_prob
from cyclelab.checks.robustness import check_overlapping_spans, check_swap_scores
from cyclelab.checks.sentiment import check_label_logprob
from cyclelab.checks.tokenizing import check_apply_merges, check_count_pairs, check_merge_pair
from cyclelab.checks.translation import check_beam_step, check_cross_attention

__all__ = [
    "Result",
    "check_apply_merges",
    "check_attainable",
    "check_beam_step",
    "check_block",
    "check_causal_attention",
    "check_count_pairs",
    "check_cross_attention",
    "check_decode_step",
    "check_embed_lookup",
    "check_graph_lookup",
    "check_greedy_step",
    "check_ig_sum",
    "check_int8_row",
    "check_label_logprob",
    "check_layer_norm",
    "check_lora_forward",
    "check_masked_labels",
    "check_masked_prediction",
    "check_mean_pool",
    "check_merge_pair",
    "check_overlapping_spans",
    "check_patched_prob",
    "check_perplexity",
    "check_rms_norm",
    "check_rope_pair",
    "check_swap_scores",
    "check_top_p_filter",
    "check_training_step",
]
