"""The report: the terminal and Markdown tables with the notes that say how to read them, the
summary, report.md / results.json, and the plots."""
import json
import math
import os

import numpy as np

from .grid import (
    CONTENDER_NAMES,
    FUSED_OPS,
    FUSED_TARGET,
    MASK_REFERENCES,
    MASK_TARGETS,
    OPS,
    PEER_CONTENDERS,
    SKLEARN_OPS,
)


def _fmt(seconds):
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def peers_in(results):
    """The peers that were timed in this run (torch, ONNX Runtime, JAX), in that order."""
    return [p for p in PEER_CONTENDERS if any(r["times"].get(p) for r in results)]


def best_peer(times):
    """(the fastest peer's name, its time) among those timed for a case, or (None, None)."""
    timed = [(times[p], p) for p in PEER_CONTENDERS if times.get(p)]
    return (min(timed)[1], min(timed)[0]) if timed else (None, None)


def _ratio(other, c):
    return f"{other / c:.2f}×" if other else "—"


def table(results):
    """The report table as Markdown lines, with the notes that say how to read it."""
    peers = peers_in(results)
    names = [CONTENDER_NAMES[p] for p in peers]
    head = (["case", "cynorm", "cynorm out=", "NumPy"] + names + ["vs NumPy"]
            + [f"vs {n}" for n in names] + ["vs best peer", "roof", "of roof"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    above = False
    for r in results:
        if r["op"] in MASK_TARGETS or r["op"] in SKLEARN_OPS:
            continue
        t = r["times"]
        c, co, n = t.get("cynorm"), t.get("cynorm_out"), t.get("numpy")
        roof = r.get("roof")
        best = co or c  # backward has no out=: its own time against the roof
        share = None
        if roof:
            share = roof / best
            above |= share > 1.0
        who, fastest = best_peer(t)
        cells = ([r["label"], _fmt(c), _fmt(co), _fmt(n)] + [_fmt(t.get(p)) for p in peers]
                 + [_ratio(n, c)] + [_ratio(t.get(p), c) for p in peers]
                 + [f"{fastest / c:.2f}× ({CONTENDER_NAMES[who]})" if who else "—",
                    _fmt(roof), f"{share:.2f}{'*' if share > 1.0 else ''}" if roof else "—"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "vs NumPy, vs a peer: their time / cynorm's (above 1: cynorm is faster); vs "
              "best peer: against the fastest of torch, ONNX Runtime and JAX for that case "
              "(a peer's cell is — where it has no such op). roof: "
              "the time a same-size copy, timed in the same rounds, takes to move the case's "
              "bytes (medium and large cases only). of roof: roof / cynorm out= (backward, "
              "which has no out=: roof / cynorm); 1.00 is the copy's speed."]
    if above:
        lines.append("* above 1: faster than that copy. The copy is a measured floor, not a "
                     "law: near the cache's size part of the data is still cached (BN "
                     "training's second read above all), and the copy's own loop can be "
                     "slower than a kernel's streamed read and write. Read 0.8-1.3 as at the "
                     "roof.")
    return lines


def summary(results):
    """Speed-ups: geometric means and the worst case against each contender."""
    lines = []
    for other in ["numpy"] + peers_in(results) + ["best peer"]:
        ratios = []
        for r in results:
            if r["op"] in MASK_TARGETS or r["op"] in SKLEARN_OPS:
                continue
            t = r["times"].get(other) if other != "best peer" else best_peer(r["times"])[1]
            if t:
                ratios.append((t / r["times"]["cynorm"], r["label"]))
        if ratios:
            gm = math.exp(sum(math.log(v) for v, _ in ratios) / len(ratios))
            worst = min(ratios)
            name = CONTENDER_NAMES.get(other, other)
            lines.append(f"- against {name}: geometric mean {gm:.2f}× over {len(ratios)} "
                         f"cases, slowest case {worst[0]:.2f}× ({worst[1]})")
    return lines


def fused_table(results):
    """The residual-add forms against cynorm's own add, then normalize: the ratio, and on
    inputs far larger than the cache the target (FUSED_TARGET) and whether it was met."""
    rows = [r for r in results if r["op"] in FUSED_OPS and r["times"].get("cynorm_unfused")]
    if not rows:
        return []
    lines = ["| case | fused | fused out= | add, then norm | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]
        ratio = t["cynorm_unfused"] / t["cynorm"]
        large = r.get("size_class") == "large"
        met = ("yes" if ratio >= FUSED_TARGET else "**no**") if large else "—"
        lines.append(f"| {r['label']} | {_fmt(t['cynorm'])} | {_fmt(t.get('cynorm_out'))} | "
                     f"{_fmt(t['cynorm_unfused'])} | {ratio:.2f}× | "
                     f"{'≥ %.2f×' % FUSED_TARGET if large else '—'} | {met} |")
    lines += ["", "ratio: the time of cynorm's np.add then layer_norm / rms_norm over the fused "
              "call's (above 1: the fused call is faster); the target applies to inputs far "
              "larger than the cache, where the fused call saves a write and a read of h."]
    return lines


def mask_table(results):
    """The padding-mask cases: cynorm with the mask against its reference call and target,
    whether the target was met, and a note on what a miss means."""
    rows = [r for r in results if r["op"] in MASK_TARGETS]
    if not rows:
        return []
    lines = ["| case | cynorm with mask | reference | ratio | target | met | NumPy (mask) | "
             "torch (no mask) |", "|---|---|---|---|---|---|---|---|"]
    missed = False
    for r in rows:
        t = r["times"]
        ratio = t["cynorm"] / t["cynorm_reference"]
        target = MASK_TARGETS[r["op"]]
        met = "yes" if ratio <= target else "**no**"
        missed |= ratio > target
        lines.append(f"| {r['label']} | {_fmt(t['cynorm'])} | {_fmt(t['cynorm_reference'])} "
                     f"({MASK_REFERENCES[r['op']]}) | {ratio:.2f} | ≤ {target:.2f} | {met} | "
                     f"{_fmt(t.get('numpy'))} | {_fmt(t.get('torch'))} |")
    lines += ["", "ratio: cynorm's time with the mask / its reference call's time (lower is "
              "better); target: the most it should be. torch has no mask: its column times "
              "the same reference (BN on the real tokens, LN on the whole padded batch)."]
    if missed:
        lines.append("A **no** is a real miss, shown as measured: there the masked path costs "
                     "more than its target over the reference (BN's reference runs on the "
                     "real tokens gathered beforehand, the gather left out of its time). "
                     "benchmarks/RESULTS.md follows these cases run by run.")
    return lines


def sklearn_table(results):
    """cynorm's BatchNormScaler against scikit-learn's StandardScaler."""
    rows = [r for r in results if r["op"] in SKLEARN_OPS]
    if not rows:
        return []
    lines = ["| case | cynorm BatchNormScaler | sklearn StandardScaler | vs sklearn | roof |",
             "|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]
        sk = t.get("sklearn")
        lines.append(f"| {r['label']} | {_fmt(t['cynorm'])} | {_fmt(sk)} | "
                     + (f"{sk / t['cynorm']:.2f}× | " if sk else "— | ")
                     + f"{_fmt(r.get('roof'))} |")
    return lines


def accuracy_table(accuracy):
    """Each contender's max error per op on float32 data far from zero (bench/accuracy.py)."""
    if not accuracy:
        return []
    from .accuracy import GROUP_SHAPE, OFFSET, SHAPE

    names = [n for n in CONTENDER_NAMES if any(n in e for e in accuracy.values())]
    lines = ["| op | " + " | ".join(CONTENDER_NAMES[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for op, errors in accuracy.items():
        cells = []
        for n in names:
            if n not in errors:
                cells.append("—")
            else:
                cells.append("NaN / inf" if errors[n] is None else f"{errors[n]:.1e}")
        lines.append(f"| {OPS[op]} | " + " | ".join(cells) + " |")
    lines += ["", f"Max abs error of the output (dx for backward) on float32 data of shape "
              f"{SHAPE} ({GROUP_SHAPE} for GroupNorm and InstanceNorm) whose mean lies "
              f"{OFFSET:g} standard deviations from zero, against the "
              "NumPy expression in float64 on the same values; — where a contender has no such "
              "op."]
    return lines


def write_report(info, results, folder):
    """report.md, results.json and (with matplotlib) speedup.png and time_vs_size.png."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)
    plots = _plots(results, folder)
    md = [f"# cynorm benchmark report ({info['date']})", "",
          "Medians of interleaved rounds, seconds per call with a fresh output unless `out=`. "
          "Speed-ups are a contender's time divided by cynorm's (> 1: cynorm is faster); "
          "vs best peer is against the fastest of torch, ONNX Runtime and JAX. "
          "The roof is the time a same-size copy into a preallocated array takes to move the "
          "case's bytes; `of roof` (roof / cynorm out=) is 1.0 at the roof. Small and medium inputs are "
          "reused between calls: cache figures. On large inputs a contender whose call takes "
          "at most a quarter of the slowest one's is sampled up to 5 times per round.", "",
          "## Machine", ""]
    for key in ("cpu", "cpu_count", "threads", "torch_threads", "openmp", "isa", "cynorm",
                "numpy", "torch", "peers", "python", "platform", "build_flags"):
        md.append(f"- {key}: {info.get(key)}")
    md += ["", "## Results", ""] + table(results) + ["", "## Summary", ""] + summary(results)
    errors = accuracy_table(info.get("accuracy"))
    if errors:
        md += ["", "## Accuracy far from zero", ""] + errors
    fused = fused_table(results)
    if fused:
        md += ["", "## Residual add, fused", ""] + fused
    masks = mask_table(results)
    if masks:
        md += ["", "## Padding masks", ""] + masks
    scalers = sklearn_table(results)
    if scalers:
        md += ["", "## scikit-learn", ""] + scalers
    if plots:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return os.path.join(folder, "report.md")


def _plots(results, folder):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # masked cases: torch has no mask, so its bar is against torch on the reference input
    labels = [r["label"] + (f"  [torch: no mask, {MASK_REFERENCES[r['op']]}]"
                            if r["op"] in MASK_REFERENCES else "") for r in results]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(results) + 1.8))
    ypos = np.arange(len(results))
    colors = {"numpy": "tab:blue", "torch": "tab:orange", "onnxruntime": "tab:purple",
              "jax": "tab:red", "sklearn": "tab:green"}
    series = [(p, CONTENDER_NAMES[p], colors[p]) for p in ["numpy"] + peers_in(results)]
    if any(r["times"].get("sklearn") for r in results):
        series.append(("sklearn", "scikit-learn", colors["sklearn"]))
    height = 0.8 / len(series)
    every = []
    for k, (other, name, color) in enumerate(series):
        vals = [r["times"][other] / r["times"]["cynorm"] if r["times"].get(other) else np.nan
                for r in results]
        bars = ax.barh(ypos + (k - (len(series) - 1) / 2) * height, vals, height=height,
                       color=color, label=f"vs {name}")
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}×" for v in vals],
                     fontsize=6, padding=2)
        every += [v for v in vals if not np.isnan(v)]
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    if every:  # ticks at 1, 2, 5 of each decade, labelled as ratios
        lo, hi = min(every + [1.0]) / 1.5, max(every + [1.0]) * 2.5
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)),
                                              math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)
                 if lo <= m * 10.0 ** e <= hi]
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.minorticks_off()
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of cynorm (other's time / cynorm's time; above 1: cynorm is "
                  "faster), log scale")
    ax.legend(loc="lower right")
    ax.set_title("cynorm speed-up per case (masked cases: torch has no mask, see the labels)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "speedup.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append("speedup.png")

    groups = {}
    for r in results:
        if r["op"] == "ln" or (r["op"] == "bn_train" and r["axis"] == 1 and len(r["shape"]) == 2):
            groups.setdefault((r["op"], r["dtype"]), []).append(r)
    groups = {k: sorted(v, key=lambda r: r["nbytes"]) for k, v in groups.items() if len(v) > 1}
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
        for ax, ((op, dtype), rows) in zip(axes[0], groups.items()):
            sizes = [r["nbytes"] for r in rows]
            for name, style in (("cynorm", "o-"), ("cynorm_out", "o--"), ("numpy", "s-"),
                                ("torch", "^-"), ("onnxruntime", "v-"), ("jax", "D-")):
                if not any(r["times"].get(name) for r in rows):
                    continue
                ts = [r["times"].get(name, np.nan) or np.nan for r in rows]
                ax.plot(sizes, ts, style, label=CONTENDER_NAMES[name])
            roofs = [r.get("roof", np.nan) for r in rows]
            ax.plot(sizes, roofs, "k:", label="memory roof")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("input bytes")
            ax.set_ylabel("seconds per call")
            ax.set_title(f"{OPS[op]} {dtype}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "time_vs_size.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append("time_vs_size.png")
    return made
