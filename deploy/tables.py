"""Plain-text tables of the command line and the demo: scores, fleet status, fine-tuning rounds, config fields."""

from __future__ import annotations


def format_table(rows: list[dict]) -> str:
    """A plain-text table: id, reward, components (and caption), error."""
    header = ("id", "reward", "details")
    lines = []
    for r in rows:
        details = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["components"].items()))
        if r.get("caption") is not None:
            details += f' caption="{r["caption"]}"'
        if r.get("segments"):
            details += " segments=" + ", ".join(f"{s['label']}:{s['likelihood']:.2f}" for s in r["segments"])
        if r["error"]:
            details = r["error"]
        reward = "-" if r["reward"] is None else f"{r['reward']:.4f}"
        lines.append((r["id"], reward, details))
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header[:2])]
    out = [f"{header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}"]
    out += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in lines]
    return "\n".join(out)


def format_score_grid(columns: dict[str, list[dict]]) -> str:
    """One row per image, one column per application: `{application: score_files rows}` (the same images in the
    same order in every column). A sample that failed shows its error code."""
    names = list(columns)
    ids = [r["id"] for r in columns[names[0]]]
    cells = [
        [r["error"].split(":")[0] if r["error"] else f"{r['reward']:.4g}" for r in columns[name]] for name in names
    ]
    widths = [max(len("id"), *map(len, ids))] + [max(len(n), *map(len, c)) for n, c in zip(names, cells, strict=True)]
    out = [
        "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(["id", *names], widths, strict=True)))
    ]
    for row, sample_id in enumerate(ids):
        values = [sample_id.ljust(widths[0])] + [c[row].rjust(w) for c, w in zip(cells, widths[1:], strict=True)]
        out.append("  ".join(values))
    return "\n".join(out)


def format_status(rows: list[dict]) -> str:
    """One line per application of `fleet_status`: status, replicas (running/target, and per node once the fleet
    runs on several), health, fingerprint."""
    several_nodes = len({ip for r in rows for d in r["deployments"] for ip in d.get("nodes", {})}) > 1

    def replicas(d: dict) -> str:
        where = ", ".join(f"{ip} x{n}" for ip, n in d.get("nodes", {}).items())
        return f"{d['name']} {d['running']}/{d['target']}" + (f" ({where})" if several_nodes and where else "")

    header = ("application", "status", "replicas", "health", "fingerprint")
    lines = []
    for r in rows:
        fingerprint = r.get("provenance", {}).get("fingerprint", "")[:12]
        deployments = ", ".join(map(replicas, r["deployments"]))
        lines.append((r["application"], r["status"], deployments, r["health"], fingerprint))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]
    )


def format_rounds(rows: list[dict], rewards: list[str]) -> str:
    """One line per round: held-out mean +- SE and win rate vs the base model of each reward, the testbed oracle's
    all-attribute accuracy and the fidelity distance where the job measured them, and the wait share."""
    testbed = [
        (key, title)
        for key, title in (("eval/oracle/all", "oracle all"), ("eval/fidelity", "fidelity"))
        if rows and f"{key}/mean" in rows[0]
    ]
    header = f"{'round':>5}  " + "  ".join(f"{name + ' (held-out)':>34}  {'win':>5}" for name in rewards)
    header += "".join(f"  {title:>16}" for _, title in testbed)
    lines = [header + f"  {'loss':>7}  {'wait':>6}  {'round s':>7}"]
    for row in rows:
        cells = []
        for name in rewards:
            cell = f"{row[f'eval/{name}/mean']:.5g} +- {row[f'eval/{name}/se']:.2g}"
            cells.append(f"{cell:>34}  {row[f'eval/{name}/win_rate']:>5.2f}")
        extra = "".join(f"  {row[f'{key}/mean']:>7.3f} +- {row[f'{key}/se']:<4.2f}" for key, _ in testbed)
        loss = "-" if row.get("final") else f"{row['loss']:.4f}"
        lines.append(
            f"{row['round']:>5}  "
            + "  ".join(cells)
            + extra
            + f"  {loss:>7}  {100 * row['time/wait_fraction']:>5.1f}%  {row['time/round_s']:>7.1f}"
        )
    return "\n".join(lines)


def format_options(fields) -> str:
    """`services.config.describe_fields` rows as `key = default` lines, each with its description indented below."""
    import textwrap

    lines = []
    for key, default, description in fields:
        lines.append(f"{key} = {default}")
        if description:
            lines.append(textwrap.fill(description, 119, initial_indent="    ", subsequent_indent="    "))
    return "\n".join(lines)
