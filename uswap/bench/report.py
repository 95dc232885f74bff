"""Showing bench results: a rich table on the terminal and a matplotlib PNG."""

from __future__ import annotations

import os

from uswap.bench.runner import Bench, describe_fill, failed, failures, median_by


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _order(key: tuple) -> tuple:
    """Rows per workload: uswap first, then `uswap run`, then native by page-cluster, then the others."""
    workload, backend, io, page_cluster = key
    return workload, {"uswap": 0, "run": 1, "native": 2}.get(backend, 3), str(io), -(page_cluster or 0)


def _label(backend: str, io, page_cluster) -> str:
    return f"{backend}/{io}" if io else f"{backend} pc={page_cluster}"


COLUMNS = ("workload", "backend", "wall s", "outside budget MiB", "fault p50 µs", "fault p99 µs", "pswpin", "pswpout",
           "rewritten", "daemon CPU s", "daemon RSS MiB", "mismatches", "failed")
RATIO_TITLE = ("uswap (or kernel swap through the uswap FUSE store, io=fuse, or to zram, zswap; `uswap run` of the "
               "native binary, io=run/MODE) / native (page-cluster 3) wall time; < 1 is faster")


def rows(bench: Bench) -> list[list[str]]:
    """One row per (workload, backend): medians over the runs that completed; a row none of whose runs completed
    says FAILED for its wall time, and the failed column says why (never a time for a killed run)."""
    runs = bench.runs
    med = {key: median_by(runs, key) for key in ("wall_s", "outside_budget_mib", "fault_p50_us", "fault_p99_us",
                                                  "pswpin", "pswpout", "rewritten", "daemon_cpu_s", "daemon_rss_mib")}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["workload"], r["backend"], r["io"], r["page_cluster"]), []).append(r)
    out = []
    for k in sorted(groups, key=_order):
        worst = [r["mismatches"] for r in groups[k] if r["mismatches"] is not None]   # failed runs too
        wall = fmt(med["wall_s"][k], 2) if k in med["wall_s"] else "FAILED"
        out.append([k[0], _label(*k[1:]), wall, fmt(med["outside_budget_mib"].get(k)),
                    fmt(med["fault_p50_us"].get(k)), fmt(med["fault_p99_us"].get(k)), fmt(med["pswpin"].get(k), 0),
                    fmt(med["pswpout"].get(k), 0), fmt(med["rewritten"].get(k), 0), fmt(med["daemon_cpu_s"].get(k)),
                    fmt(med["daemon_rss_mib"].get(k)), str(max(worst)) if worst else "-",
                    failures(groups[k]) or "-"])
    return out


def ratio_cells(r: dict) -> tuple[str, str]:
    if r["uswap_over_native_wall"] is None:
        return "failed", "-"
    spread = f"{r['spread'][0]:.2f} – {r['spread'][1]:.2f}" if r["spread"] else "-"
    return f"{r['uswap_over_native_wall']:.2f}", spread


def table(bench: Bench):
    from rich.table import Table
    t = Table(title=f"uswap bench: {bench.config.size >> 20} MiB through {bench.config.resident >> 20} MiB "
                    f"(median of {bench.config.repeat} completed; {describe_fill(bench.config.fill)}; "
                    f"{bench.config.placement})")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("workload", "backend", "failed") else "right")
    for row in rows(bench):
        t.add_row(*row)
    ratios = Table(title=RATIO_TITLE)
    for col in ("workload", "io", "ratio", "spread", "failed"):
        ratios.add_column(col)
    for r in bench.ratios():
        ratios.add_row(r["workload"], r["io"], *ratio_cells(r), r.get("failed") or "-")
    return t, ratios


def markdown(bench: Bench) -> str:
    """The same tables as Markdown, for docs/BENCHMARKS.md."""
    lines = [] if not bench.runs else [
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(bench)]
    if bench.breakdown:
        lines += ["", "| part of one swap-in | uswap p50 µs | floor µs (shared/REFERENCE.md, C) |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['p50_us']:.1f} | {r['floor_us']} |" for r in bench.breakdown]
    if bench.not_run():
        lines += [""] + [f"Not run under `uswap run`: {line}." for line in bench.not_run()]
    if not bench.ratios():
        return "\n".join(lines).strip()
    lines += ["", "| workload | uswap io (fuse: kernel swap via the FUSE store; zram, zswap; run/MODE: `uswap run`) | "
              "over native wall | spread (per round) | failed |",
              "|---|---|---|---|---|"]
    for r in bench.ratios():
        cells = [r["workload"], r["io"], *ratio_cells(r), r.get("failed") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(bench: Bench, path: str) -> None:
    """Latency CDFs per workload (first round) and the wall-time ratio bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy
    workloads = [w for w in bench.config.workloads if w != "hog"]
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
    ratios = bench.ratios()
    labels = [f"{r['workload']}\n{r['io']}" for r in ratios]
    values = [r["uswap_over_native_wall"] or 0.0 for r in ratios]   # a failed row: no bar, a FAILED mark
    spreads = [r["spread"] or [v, v] for v, r in zip(values, ratios)]
    # with a failed round the median (of the completed runs) may lie outside the spread (of complete pairs)
    errs = [[max(0.0, v - s[0]) for v, s in zip(values, spreads)],
            [max(0.0, s[1] - v) for v, s in zip(values, spreads)]]
    ax.bar(range(len(values)), values, yerr=errs, capsize=3, color="tab:blue")
    for i, r in enumerate(ratios):
        if r["uswap_over_native_wall"] is None:
            ax.text(i, 0.05, "FAILED", rotation=90, ha="center", va="bottom", color="tab:red", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("uswap / native wall time")
    ax.set_title("wall time ratio (lower is better)")
    fig.suptitle(f"uswap bench — {bench.machine()['cpu_model']}, kernel {bench.machine()['kernel']}; "
                 f"{bench.config.placement}; {describe_fill(bench.config.fill)}", fontsize=9)
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
