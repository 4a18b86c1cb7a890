"""SQL helpers: qualify unqualified table names with the instance's dataset. Pure."""

from __future__ import annotations

import sqlglot
from sqlglot import exp


class SqlError(ValueError):
    """The query could not be parsed (one line)."""


def qualify(sql: str, project: str, dataset: str) -> str:
    """``FROM alerts`` → ``FROM `project.dataset.alerts```; qualified names and CTE names are
    left alone."""
    try:
        trees = sqlglot.parse(sql, read="bigquery")
    except sqlglot.errors.ParseError as e:
        first = str(e).splitlines()[0]
        raise SqlError(f"cannot parse query: {first}") from None
    out = []
    for tree in trees:
        if tree is None:
            continue
        ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
        for t in tree.find_all(exp.Table):
            if not t.args.get("db") and t.name and t.name not in ctes:
                t.set("db", exp.to_identifier(dataset))
                t.set("catalog", exp.to_identifier(project))
        out.append(tree.sql(dialect="bigquery"))
    if not out:
        raise SqlError("empty query")
    return ";\n".join(out)
