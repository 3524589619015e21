"""The dense masked InfoNCE: the specification every other backend must match.

It materialises the full N x M similarity matrix and lets autograd differentiate it (the
temperature included, when it is a tensor that requires grad), so it is simple and exact in
float64, and its memory grows with N * M.
"""

from __future__ import annotations

import torch

from ._masks import contributing_rows, masked_logsumexp, pair_masks, prepare
from ._options import InfoNCEOptions, OpInputs
from ._validation import as_rows


def dense_rows(inputs: OpInputs, options: InfoNCEOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query loss (0 where the query does not contribute) and the contributing mask."""
    q = prepare(as_rows(inputs.query), inputs.temperature, options.normalize)
    k = prepare(as_rows(inputs.key), None, options.normalize)
    s = q @ k.T
    labels, ignore_index, denominator = inputs.labels, options.ignore_index, options.denominator
    pos, neg = pair_masks(labels, inputs.key_labels, inputs.groups, inputs.key_groups, ignore_index, 0,
                          options.self_key_offset)
    n_pos = pos.sum(dim=1)
    valid = contributing_rows(labels, n_pos, neg.sum(dim=1), denominator, ignore_index)

    if denominator == "all":
        log_denominator = masked_logsumexp(s, pos | neg)[:, None].expand_as(s)
    elif denominator == "negatives":
        log_denominator = masked_logsumexp(s, neg)[:, None].expand_as(s)
    else:  # each_positive: log(exp(s_ip) + sum over negatives)
        log_denominator = torch.logaddexp(s, masked_logsumexp(s, neg)[:, None])
    per_pair = torch.where(pos, log_denominator - s, 0.0)
    loss = per_pair.sum(dim=1) / n_pos.clamp_min(1)
    return torch.where(valid, loss, 0.0), valid
