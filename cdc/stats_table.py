"""The Parquet schema of the activation statistics (one row per layer x channel x class).

| column            | type    | meaning                                                   |
|-------------------|---------|-----------------------------------------------------------|
| layer             | string  | prunable layer name (module path of its block)            |
| layer_index       | int32   | position in forward order (0-based); block order for T    |
| channel           | int32   | output channel of the layer's conv                        |
| class             | int32   | fine class id                                             |
| n_images          | int64   | images of that class seen                                 |
| pixels_per_image  | int64   | D = H x W of the scored activation                        |
| sum               | float64 | sum of the activation over all pixels of those images     |
| sum_sq            | float64 | sum of its square                                         |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdc.stats import LayerStats

SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("channel", pa.int32()),
        ("class", pa.int32()),
        ("n_images", pa.int64()),
        ("pixels_per_image", pa.int64()),
        ("sum", pa.float64()),
        ("sum_sq", pa.float64()),
    ]
)


def stats_to_table(stats: dict[str, LayerStats]) -> pa.Table:
    columns: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
    for index, (name, st) in enumerate(stats.items()):
        k, c = st.s1.shape
        columns["layer"].append(np.full(k * c, name, dtype=object))
        columns["layer_index"].append(np.full(k * c, index, np.int32))
        columns["channel"].append(np.tile(np.arange(c, dtype=np.int32), k))
        columns["class"].append(np.repeat(np.arange(k, dtype=np.int32), c))
        columns["n_images"].append(np.repeat(st.n, c))
        columns["pixels_per_image"].append(np.full(k * c, st.pixels, np.int64))
        columns["sum"].append(st.s1.ravel())
        columns["sum_sq"].append(st.s2.ravel())
    arrays = [pa.array(np.concatenate(columns[f.name]), type=f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def table_to_stats(table: pa.Table) -> dict[str, LayerStats]:
    """Inverse of `stats_to_table`, layers in forward order."""
    df = table.to_pandas().sort_values(["layer_index", "class", "channel"])
    stats: dict[str, LayerStats] = {}
    for _, g in df.groupby("layer_index", sort=True):
        k, c = g["class"].max() + 1, g["channel"].max() + 1
        n = g.drop_duplicates("class").sort_values("class")["n_images"].to_numpy(np.int64)
        stats[g["layer"].iloc[0]] = LayerStats(
            n,
            int(g["pixels_per_image"].iloc[0]),
            g["sum"].to_numpy().reshape(k, c),
            g["sum_sq"].to_numpy().reshape(k, c),
        )
    return stats


def write_stats(path: Path, stats: dict[str, LayerStats]) -> None:
    pq.write_table(stats_to_table(stats), path)


def read_stats(path: Path) -> dict[str, LayerStats]:
    return table_to_stats(pq.read_table(path, schema=SCHEMA))
