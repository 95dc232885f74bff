"""Showing bench results: a rich table on the terminal and a matplotlib PNG."""

from __future__ import annotations

import os

from uswap.bench.equal import tolerance
from uswap.bench.runner import (POOL, Bench, base_backend, describe_fill, failed, failures, median_by, run_label,
                                split_workload)


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _order(key: tuple) -> tuple:
    """Rows per workload: uswap first (each +pool row after its plain one), then `uswap run`, then native by
    page-cluster, then the others."""
    workload, backend, io, page_cluster = key
    rank = {"uswap": 0, "run": 1, "native": 2}.get(base_backend(backend), 3)
    return workload, rank, str(io), backend.endswith(POOL), -(page_cluster or 0)


def _label(backend: str, io, page_cluster) -> str:
    return f"{backend}/{io}" if io else f"{backend} pc={page_cluster}"


# (column, the run field whose median it shows, digits); "wall s" says FAILED when no run completed
MEDIANS = (("wall s", "wall_s", 2), ("outside budget MiB", "outside_budget_mib", 1), ("total MiB", "total_mib", 1),
           ("fault p50 µs", "fault_p50_us", 1), ("fault p99 µs", "fault_p99_us", 1), ("pswpin", "pswpin", 0),
           ("pswpout", "pswpout", 0), ("rewritten", "rewritten", 0), ("daemon CPU s", "daemon_cpu_s", 1),
           ("daemon RSS MiB", "daemon_rss_mib", 1))
LIMIT = ("limit MiB", "limit_mib", 1)       # with --equal-memory, after "total MiB"
POOL_MEDIANS = (("pool pages at peak", "pool_peak_pages", 0), ("pool MiB at peak", "pool_peak_compressed_mib", 1),
                ("pool ratio", "pool_ratio", 2), ("pool written back", "pool_written_back", 0),
                ("pool rejected", "pool_rejected", 0))
RATIO_TITLE = ("uswap (with the pool: io=pool/MODE; or kernel swap through the uswap FUSE store, io=fuse, or to zram, "
               "zswap; `uswap run` of the native binary, io=run/MODE, run+pool/MODE) / native (page-cluster 3) wall "
               "time; < 1 is faster")
PEER_TITLE = ("uswap / the faster of zram and zswap (median wall time), each with its total memory (limit + what "
              "it used outside); < 1 is faster")
PEER_COLUMNS = ("workload", "uswap row", "wall s", "total MiB", "faster peer", "peer wall s", "peer total MiB",
                "over peer wall", "failed")


def _medians(bench: Bench) -> tuple:
    """The median columns this bench has: limit with equal memory, the pool's with +pool rows."""
    cols = list(MEDIANS)
    if bench.config.equal_memory:
        cols.insert(3, LIMIT)
    if any(r["backend"].endswith(POOL) for r in bench.runs):
        cols += POOL_MEDIANS
    return tuple(cols)


def columns(bench: Bench) -> tuple[str, ...]:
    extra = ("equal memory",) if bench.config.equal_memory else ()
    return ("workload", "backend", *(c[0] for c in _medians(bench)), "mismatches", "failed", *extra)


def rows(bench: Bench) -> list[list[str]]:
    """One row per (workload, backend): medians over the runs that completed; a row none of whose runs completed
    says FAILED for its wall time, and the failed column says why (never a time for a killed run)."""
    runs = bench.runs
    cols = _medians(bench)
    med = {key: median_by(runs, key) for _, key, _ in cols}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["backend"], r["io"], r["page_cluster"]), []).append(r)
    out = []
    for k in sorted(groups, key=_order):
        worst = [r["mismatches"] for r in groups[k] if r["mismatches"] is not None]   # failed runs too
        cells = [k[0], _label(*k[1:])]
        for _, key, digits in cols:
            cells.append(fmt(med[key][k], digits) if k in med[key] else "FAILED" if key == "wall_s" else "-")
        cells += [str(max(worst)) if worst else "-", failures(groups[k]) or "-"]
        if bench.config.equal_memory:
            cells.append(equal_cell(bench, k, med["total_mib"].get(k)))
        out.append(cells)
    return out


def equal_cell(bench: Bench, key: tuple, total_mib: float | None) -> str:
    """The equal memory column: calibration's note, or "yes" when the row's timed runs (their median total)
    stayed within the tolerance of --resident too: a run after calibration can use more outside than the
    calibration run did, and then the row says so rather than "yes"."""
    found = bench.limits.get(f"{key[0]} {run_label(*key[1:])}")
    if found is None:
        return "-"
    if found["note"]:
        return found["note"]
    line = (bench.config.resident + tolerance(bench.config.resident)) / (1 << 20)
    if total_mib is not None and total_mib > line:
        return (f"not in the timed runs: their total {total_mib:.1f} MiB is over {line:.1f} MiB (the calibration "
                f"runs': {', '.join(f'{limit / (1 << 20):.1f} + {outside}' for limit, outside in found['tried'])})")
    return "yes"


def short_note(cell: str) -> str:
    """The equal memory column on a terminal: "yes", or "no: " and the note's first clause (the Markdown has
    the whole note)."""
    return cell if cell in ("yes", "-") else "no: " + cell.split(":")[0].split(" (")[0]


def peer_cells(r: dict) -> list[str]:
    return [r["workload"], r["row"], fmt(r["wall_s"], 2), fmt(r["total_mib"]), r["peer"] or "-",
            fmt(r["peer_wall_s"], 2), fmt(r["peer_total_mib"]), fmt(r["over_peer_wall"], 2), r["failed"] or "-"]


def ratio_cells(r: dict) -> tuple[str, str]:
    if r["uswap_over_native_wall"] is None:
        return "failed", "-"
    spread = f"{r['spread'][0]:.2f} – {r['spread'][1]:.2f}" if r["spread"] else "-"
    return f"{r['uswap_over_native_wall']:.2f}", spread


def table(bench: Bench):
    from rich.table import Table
    t = Table(title=f"uswap bench: {bench.config.size >> 20} MiB through {bench.config.resident >> 20} MiB "
                    f"(median of {bench.config.repeat} completed; {describe_fill(bench.config.fill, bench.config.workloads)}; "
                    f"{bench.config.placement})")
    for col in columns(bench):
        t.add_column(col, justify="left" if col in ("workload", "backend", "failed", "equal memory") else "right")
    for row in rows(bench):
        if bench.config.equal_memory:
            row = [*row[:-1], short_note(row[-1])]
        t.add_row(*row)
    ratios = Table(title=RATIO_TITLE)
    for col in ("workload", "io", "ratio", "spread", "failed"):
        ratios.add_column(col)
    for r in bench.ratios():
        ratios.add_row(r["workload"], r["io"], *ratio_cells(r), r.get("failed") or "-")
    tables = [t, ratios]
    if bench.peer_ratios():
        peers = Table(title=PEER_TITLE)
        for col in PEER_COLUMNS:
            peers.add_column(col)
        for r in bench.peer_ratios():
            peers.add_row(*peer_cells(r))
        tables.append(peers)
    return tables


def markdown(bench: Bench) -> str:
    """The same tables as Markdown, for docs/BENCHMARKS.md."""
    cols = columns(bench)
    lines = [] if not bench.runs else ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(bench)]
    if bench.breakdown:
        lines += ["", "| part of one swap-in | uswap p50 µs | floor µs (shared/REFERENCE.md, C) |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['p50_us']:.1f} | {r['floor_us']} |" for r in bench.breakdown]
    if bench.not_run():
        lines += [""] + [f"Not run under `uswap run`: {line}." for line in bench.not_run()]
    if bench.ratios():
        lines += ["", "| workload | uswap io (pool/MODE: with the pool; fuse: kernel swap via the FUSE store; zram, "
                  "zswap; run/MODE, run+pool/MODE: `uswap run`) | over native wall | spread (per round) | failed |",
                  "|---|---|---|---|---|"]
        for r in bench.ratios():
            cells = [r["workload"], r["io"], *ratio_cells(r), r.get("failed") or "-"]
            lines.append("| " + " | ".join(cells) + " |")
    if bench.peer_ratios():
        lines += ["", "| " + " | ".join(PEER_COLUMNS) + " |", "|" + "---|" * len(PEER_COLUMNS)]
        lines += ["| " + " | ".join(peer_cells(r)) + " |" for r in bench.peer_ratios()]
    return "\n".join(lines).strip()


def plot(bench: Bench, path: str) -> None:
    """Latency CDFs per workload (first round) and the wall-time ratio bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy
    workloads = [w for w in bench.config.workloads if split_workload(w)[0] != "hog"]
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(5 * (len(workloads) + 1), 4))
    axes = list(numpy.atleast_1d(axes))
    for ax, workload in zip(axes, workloads):
        for name, file in sorted(bench.latency_files.items()):
            if not name.startswith(workload + " ") or not os.path.exists(file):
                continue
            ns = numpy.fromfile(file, dtype=numpy.uint32)
            if ns.size:
                ax.plot(ns / 1e3, numpy.arange(1, ns.size + 1) / ns.size, label=name.split(" ", 1)[1])
        ax.set_xscale("log")
        ax.set_xlabel("fault latency (µs)")
        ax.set_ylabel("fraction of faults")
        ax.set_title(f"{workload}: fault latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        dead = sorted({_label(r["backend"], r["io"], r["page_cluster"]) for r in bench.runs
                       if r["workload"] == workload and r["repeat"] == 0 and failed(r)})
        if dead:   # no curve for a failed run: say so where its curve would be
            ax.text(0.02, 0.98, "FAILED: " + ", ".join(dead), transform=ax.transAxes, va="top", color="tab:red",
                    fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax = axes[-1]
    # over native pc=3; without a native row, over the faster of zram and zswap
    ratios = [{"workload": r["workload"], "io": r["io"], "ratio": r["uswap_over_native_wall"], "spread": r["spread"]}
              for r in bench.ratios()]
    over = "native"
    if not ratios:
        ratios = [{"workload": r["workload"], "io": r["row"], "ratio": r["over_peer_wall"], "spread": None}
                  for r in bench.peer_ratios()]
        over = "faster of zram, zswap"
    labels = [f"{r['workload']}\n{r['io']}" for r in ratios]
    values = [r["ratio"] or 0.0 for r in ratios]   # a failed row: no bar, a FAILED mark
    spreads = [r["spread"] or [v, v] for v, r in zip(values, ratios)]
    # with a failed round the median (of the completed runs) may lie outside the spread (of complete pairs)
    errs = [[max(0.0, v - s[0]) for v, s in zip(values, spreads)],
            [max(0.0, s[1] - v) for v, s in zip(values, spreads)]]
    ax.bar(range(len(values)), values, yerr=errs, capsize=3, color="tab:blue")
    for i, r in enumerate(ratios):
        if r["ratio"] is None:
            ax.text(i, 0.05, "FAILED", rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel(f"uswap / {over} wall time")
    ax.set_title("wall time ratio (lower is better)")
    fig.suptitle(f"uswap bench — {bench.machine()['cpu_model']}, kernel {bench.machine()['kernel']}; "
                 f"{bench.config.placement}; {describe_fill(bench.config.fill, bench.config.workloads)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def breakdown_table(bench: Bench):
    from rich.table import Table
    t = Table(title=f"one swap-in fault, p50 ({bench.config.placement})")
    for col in ("part", "uswap µs", "floor µs (shared/REFERENCE.md, C)"):
        t.add_column(col)
    for row in bench.breakdown:
        t.add_row(row["part"], f"{row['p50_us']:.1f}", row["floor_us"])
    return t
