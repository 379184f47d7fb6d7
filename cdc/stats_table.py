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

The pooled-grid statistics (for the `di` criterion) go to a second file, one row per layer x channel x
class with the per-class sum of the channel's G-cell vectors, plus one row per layer x channel with
class -1 holding the G x G sum of outer products over all images (row-major):

| column      | type          | meaning                                                    |
|-------------|---------------|------------------------------------------------------------|
| layer, layer_index, channel, class, n_images | as above | class -1: all images              |
| sum         | list<float64> | G cells (null on class -1 rows)                            |
| outer       | list<float64> | G x G (null on class rows)                                 |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdc.errors import InputError, reading
from cdc.stats import GridStats, LayerStats

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
    return table_to_stats(read_checked(path, SCHEMA, "table of activation statistics"))


def read_checked(path: str | Path, schema: pa.Schema, what: str, allow_empty: bool = False) -> pa.Table:
    """The Parquet file at `path` read with `schema`, refusing a file of another kind (a column
    missing or of another type) or with no rows, rather than reading its absent columns as nulls."""
    with reading(path, what):
        found = pq.read_schema(path)
        wrong = [
            f"{f.name} ({f.type})"
            for f in schema
            if f.name not in found.names or not found.field(f.name).type.equals(f.type)
        ]
        if wrong:
            raise InputError(
                f"{path}: not a {what}: columns {', '.join(wrong)} missing or of another type "
                f"(found {', '.join(found.names)})",
                path,
            )
        table = pq.read_table(path, schema=schema)
    if table.num_rows == 0 and not allow_empty:
        raise InputError(f"{path}: {what} has no rows", path)
    return table


# one row per layer x channel: the channel's score, and whether coarse or fine labels scored it
SCORES_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("layer_index", pa.int64()),
        ("channel", pa.int64()),
        ("score", pa.float64()),
        ("label_level", pa.string()),
    ]
)


GRID_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("layer_index", pa.int32()),
        ("channel", pa.int32()),
        ("class", pa.int32()),
        ("n_images", pa.int64()),
        ("sum", pa.list_(pa.float64())),
        ("outer", pa.list_(pa.float64())),
    ]
)


def write_grid_stats(path: Path, stats: dict[str, GridStats]) -> None:
    rows: dict[str, list] = {name: [] for name in GRID_SCHEMA.names}
    for index, (name, st) in enumerate(stats.items()):
        k, c, g = st.s1.shape
        for ch in range(c):
            for cls in range(-1, k):
                rows["layer"].append(name)
                rows["layer_index"].append(index)
                rows["channel"].append(ch)
                rows["class"].append(cls)
                rows["n_images"].append(int(st.n.sum() if cls < 0 else st.n[cls]))
                rows["sum"].append(None if cls < 0 else st.s1[cls, ch].tolist())
                rows["outer"].append(st.outer[ch].ravel().tolist() if cls < 0 else None)
    pq.write_table(pa.table(rows, schema=GRID_SCHEMA), path)


def read_grid_stats(path: Path) -> dict[str, GridStats]:
    """Inverse of `write_grid_stats`, layers in forward order."""
    # empty when dump_stats.grid is null
    table = read_checked(path, GRID_SCHEMA, "table of pooled-grid statistics", allow_empty=True)
    df = table.to_pandas().sort_values(["layer_index", "channel", "class"])
    stats: dict[str, GridStats] = {}
    for _, g in df.groupby("layer_index", sort=True):
        totals, per_class = g[g["class"] < 0], g[g["class"] >= 0]
        c, k = len(totals), per_class["class"].max() + 1
        s1 = np.stack(per_class["sum"].to_numpy()).reshape(c, k, -1).transpose(1, 0, 2)
        cells = s1.shape[2]
        outer = np.stack(totals["outer"].to_numpy()).reshape(c, cells, cells)
        n = per_class[per_class["channel"] == 0].sort_values("class")["n_images"].to_numpy(np.int64)
        stats[g["layer"].iloc[0]] = GridStats(n, np.ascontiguousarray(s1), outer)
    return stats
