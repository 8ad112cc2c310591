"""The embedding column's Arrow type, the zero tensor of a bad video, and conversion of a
batch of matrices to the column without a round trip through Python floats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from video_embeddings.settings import EMBEDDING_DIM

__all__ = [
    "EMBEDDING_TYPE",
    "VECTOR_TYPE",
    "matrices",
    "mean_vectors",
    "to_arrow",
    "zero_embedding",
]

EMBEDDING_TYPE = pa.list_(pa.list_(pa.float32(), EMBEDDING_DIM))
"""A list of fixed-size float vectors, which LanceDB searches as a multivector."""
VECTOR_TYPE = pa.list_(pa.float32(), EMBEDDING_DIM)
"""One vector per video: the mean-vector column's type."""


def zero_embedding() -> np.ndarray:
    """The spec's result for a video that cannot be processed: one all-zero row."""
    return np.zeros((1, EMBEDDING_DIM), dtype=np.float32)


def to_arrow(rows: list[np.ndarray]) -> pa.Array:
    """One ``(n_i, 1024)`` float32 array per video → the column's Arrow array, built from
    the arrays' buffers without a round trip through Python floats."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), EMBEDDING_DIM)
    return pa.ListArray.from_arrays(pa.array(offsets), values, type=EMBEDDING_TYPE)


def matrices(column: pa.Array) -> list[np.ndarray]:
    """An ``EMBEDDING_TYPE`` column → one ``(rows, 1024)`` float32 matrix per value (no
    rows for a NULL), sharing the column's memory."""
    offsets = column.offsets.to_numpy()  # into column.values, which keeps a NULL's slot
    values = column.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, EMBEDDING_DIM)
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def mean_vectors(video_embedding: pa.Array) -> pa.Array:
    """The mean-vector column's Geneva batch UDF body: each video's ``aggregate_mean``
    vector (``VECTOR_TYPE``), the zero vector for the zero tensor of a bad video, NULL for
    a NULL embedding."""
    from video_embeddings.aggregate import aggregate_mean

    valid = video_embedding.is_valid().to_pylist()
    means = [
        aggregate_mean(m) if ok else None
        for m, ok in zip(matrices(video_embedding), valid, strict=True)
    ]
    return pa.array(means, type=VECTOR_TYPE)
