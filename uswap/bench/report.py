"""Showing bench results: a rich table on the terminal and a matplotlib PNG."""

from __future__ import annotations

import os

from uswap.bench.runner import Bench, median_by


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _order(key: tuple) -> tuple:
    """Rows per workload: uswap first, then `uswap run`, then native by page-cluster, then the others."""
    workload, backend, io, page_cluster = key
    return workload, {"uswap": 0, "run": 1, "native": 2}.get(backend, 3), str(io), -(page_cluster or 0)


def _label(backend: str, io, page_cluster) -> str:
    return f"{backend}/{io}" if io else f"{backend} pc={page_cluster}"


def table(bench: Bench):
    from rich.table import Table
    runs = bench.runs
    med = {key: median_by(runs, key) for key in ("wall_s", "fault_p50_us", "fault_p99_us", "pswpin", "pswpout",
                                                  "rewritten", "daemon_cpu_s", "daemon_rss_mib")}
    worst = {}
    for r in runs:
        k = (r["workload"], r["backend"], r["io"], r["page_cluster"])
        worst[k] = max(worst.get(k, 0), r["mismatches"] or 0, 1 if r["exit_code"] else 0)
    t = Table(title=f"uswap bench: {bench.config.size >> 20} MiB through {bench.config.resident >> 20} MiB "
                    f"(median of {bench.config.repeat}; {bench.config.placement})")
    for col in ("workload", "backend", "wall s", "fault p50 µs", "fault p99 µs", "pswpin", "pswpout", "rewritten",
                "daemon CPU s", "daemon RSS MiB", "bad"):
        t.add_column(col, justify="left" if col in ("workload", "backend") else "right")

    for k in sorted(med["wall_s"], key=_order):
        t.add_row(k[0], _label(*k[1:]), fmt(med["wall_s"].get(k), 2), fmt(med["fault_p50_us"].get(k)),
                  fmt(med["fault_p99_us"].get(k)), fmt(med["pswpin"].get(k), 0), fmt(med["pswpout"].get(k), 0),
                  fmt(med["rewritten"].get(k), 0), fmt(med["daemon_cpu_s"].get(k)),
                  fmt(med["daemon_rss_mib"].get(k)), str(worst[k]))
    ratios = Table(title="uswap (or kernel swap through the uswap FUSE store, io=fuse; `uswap run` of the native "
                         "binary, io=run/MODE) / native (page-cluster 3) wall time; < 1 is faster")
    for col in ("workload", "io", "ratio", "spread"):
        ratios.add_column(col)
    for r in bench.ratios():
        ratios.add_row(r["workload"], r["io"], f"{r['uswap_over_native_wall']:.2f}",
                       f"{r['spread'][0]:.2f} – {r['spread'][1]:.2f}")
    return t, ratios


def markdown(bench: Bench) -> str:
    """The same tables as Markdown, for docs/BENCHMARKS.md."""
    runs = bench.runs
    med = {key: median_by(runs, key) for key in ("wall_s", "fault_p50_us", "fault_p99_us", "pswpin", "pswpout",
                                                  "rewritten", "daemon_cpu_s", "daemon_rss_mib", "mismatches")}
    lines = [] if not runs else [
        "| workload | backend | wall s | fault p50 µs | fault p99 µs | pswpin | pswpout | rewritten | "
        "daemon CPU s | daemon RSS MiB | mismatches |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    for k in sorted(med["wall_s"], key=_order):
        lines.append(f"| {k[0]} | {_label(*k[1:])} | {fmt(med['wall_s'].get(k), 2)} | "
                     f"{fmt(med['fault_p50_us'].get(k))} | {fmt(med['fault_p99_us'].get(k))} | "
                     f"{fmt(med['pswpin'].get(k), 0)} | {fmt(med['pswpout'].get(k), 0)} | "
                     f"{fmt(med['rewritten'].get(k), 0)} | {fmt(med['daemon_cpu_s'].get(k))} | "
                     f"{fmt(med['daemon_rss_mib'].get(k))} | {fmt(med['mismatches'].get(k), 0)} |")
    if bench.breakdown:
        lines += ["", "| part of one swap-in | uswap p50 µs | floor µs (shared/REFERENCE.md, C) |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['p50_us']:.1f} | {r['floor_us']} |" for r in bench.breakdown]
    if bench.not_run():
        lines += [""] + [f"Not run under `uswap run`: {line}." for line in bench.not_run()]
    if not bench.ratios():
        return "\n".join(lines).strip()
    lines += ["", "| workload | uswap io (fuse: kernel swap via the FUSE store; run/MODE: `uswap run`) | "
              "over native wall | spread (per round) |",
              "|---|---|---|---|"]
    for r in bench.ratios():
        lines.append(f"| {r['workload']} | {r['io']} | {r['uswap_over_native_wall']:.2f} | "
                     f"{r['spread'][0]:.2f} – {r['spread'][1]:.2f} |")
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
        ax.legend(fontsize=8)
    ax = axes[-1]
    ratios = bench.ratios()
    labels = [f"{r['workload']}\n{r['io']}" for r in ratios]
    values = [r["uswap_over_native_wall"] for r in ratios]
    errs = [[v - r["spread"][0] for v, r in zip(values, ratios)], [r["spread"][1] - v for v, r in zip(values, ratios)]]
    ax.bar(range(len(values)), values, yerr=errs, capsize=3, color="tab:blue")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("uswap / native wall time")
    ax.set_title("wall time ratio (lower is better)")
    fig.suptitle(f"uswap bench — {bench.machine()['cpu_model']}, kernel {bench.machine()['kernel']}; "
                 f"{bench.config.placement}", fontsize=9)
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
