"""Click histories as tensors: ragged item-id lists, left-padded to a fixed length with the most
recent items kept (0 = padding), the shape every sequence model and head here reads."""
from __future__ import annotations

import numpy as np
import torch


def pad_histories(histories, max_len: int) -> torch.Tensor:
    """Ragged id lists -> [B, max_len] LongTensor, most recent items kept, left-padded with 0."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h):] = torch.as_tensor(h, dtype=torch.long)
    return out


def pad_list_array(column, max_len: int) -> torch.Tensor:
    """Arrow list<int> column (ragged histories) -> [B, max_len] LongTensor like `pad_histories`,
    vectorized over the flat values (no Python loop per row). Null lists count as empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.minimum(lengths, max_len)
    rows = np.repeat(np.arange(len(lengths)), keep)
    j = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)  # 0.. keep-1 within each row
    src = np.repeat(np.cumsum(lengths) - lengths + lengths - keep, keep) + j
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    out[rows, max_len - keep[rows] + j] = flat[src]
    return torch.from_numpy(out)


def trim_padding(history: torch.Tensor) -> torch.Tensor:
    """[B, L] left-padded histories without the leading columns that are padding in every row (at
    least one column kept): the same scores for every model here, less work."""
    used = (history != 0).any(0).nonzero()
    return history[:, int(used[0]) if len(used) else history.shape[1] - 1:]


def pad_to_longest(histories, max_history: int) -> torch.Tensor:
    """Left-padded to the longest history of the batch (at most max_history): every model here
    counts positions back from the most recent item, so less padding changes no score, only the time."""
    longest = max((len(h) for h in histories), default=1)
    return pad_histories(histories, max(1, min(max_history, longest)))
