"""Printing query results for the `hcc-assets sql` command."""

from __future__ import annotations

import duckdb
import polars as pl

# Statement kinds `hcc-assets sql` runs: queries only. The connection is read-only anyway; this
# also refuses what a read-only connection still allows (COPY ... TO, EXPORT, INSTALL, SET, ATTACH).
# duckdb's stubs name the members SELECT_STATEMENT etc.; at runtime they are SELECT, EXPLAIN, MULTI.
READ_ONLY_KINDS = {
    duckdb.StatementType.SELECT,  # type: ignore[attr-defined]
    duckdb.StatementType.EXPLAIN,  # type: ignore[attr-defined]
    duckdb.StatementType.MULTI,  # type: ignore[attr-defined]
}


class WriteRefusedError(ValueError):
    pass


def check_read_only(sql: str) -> None:
    """Raise WriteRefusedError naming the statement kind unless every statement only reads."""
    statements = duckdb.connect(":memory:").extract_statements(sql)
    for statement in statements:
        if statement.type not in READ_ONLY_KINDS:
            kind = statement.type.name
            raise WriteRefusedError(
                f"refused: {kind} statement. `hcc-assets sql` is read-only (queries only); the feature store "
                "is written by the Dagster assets, so re-materialize the asset instead"
            )


def format_frame(frame: pl.DataFrame, fmt: str = "table", max_rows: int = 100) -> str:
    if fmt == "csv":
        return frame.with_columns(_lists_as_text(frame)).write_csv().rstrip("\n")
    if fmt == "json":
        return frame.write_json()
    with pl.Config(
        tbl_rows=max_rows, tbl_cols=-1, tbl_width_chars=400, fmt_str_lengths=60, tbl_hide_dataframe_shape=False
    ):
        return str(frame)


def _lists_as_text(frame: pl.DataFrame) -> list[pl.Expr]:
    # CSV has no list type; write lists as "a;b;c"
    return [
        pl.col(name).cast(pl.List(pl.String)).list.join(";").alias(name)
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.List)
    ]
