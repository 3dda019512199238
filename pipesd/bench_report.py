"""results.md and the PNG plots of ``pipesd bench`` (from its results.json structure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _matched(a: dict[str, Any], policy: str) -> str:
    if not a["compared"]:
        return "–"
    if policy == "target-only":
        return "reference"
    return f"{a['matched']}/{a['compared']}"


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# pipesd bench results",
        "",
        f"{result['max_new_tokens']} new tokens per prompt, greedy. `ms/token`: wall-clock "
        "time per output token from the request, over all tokens of the cell (`median`: the "
        "median over prompts); `decode ms/token`: the same after the first token. "
        "Energy per token: edge energy is **modelled** from the edge's CPU time and the "
        "scenario's device power profile "
        + ", ".join(
            f"{k} {v['active_w']:g} W active / {v['idle_w']:g} W idle"
            for k, v in result["power_profiles"].items()
        )  # fmt: skip
        + "; cloud energy is "
        + _cloud_energy_label(result)
        + ". `matched`: runs whose greedy output equals target-only's token for token.",
        "",
    ]
    for w, by_sc in result["summary"].items():
        for sc, cell in by_sc.items():
            desc = result["scenarios"][sc]["description"]
            lines += [
                f"## {w}, {sc}: {desc}",
                "",
                "| policy | ms/token | median | decode ms/token | tok/s | TTFT ms | acceptance "
                "| verif/token | mean draft | up B/token | down B/token | rollbacks | wasted "
                "| edge J/token (modelled) | cloud J/token | matched |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for p, a in cell.items():
                acc = a["acceptance_rate"]
                lines.append(
                    f"| {p} | {a['ms_per_token']:.1f} | {a['median_ms_per_token']:.1f} | "
                    f"{a['decode_ms_per_token']:.1f} | "
                    f"{a['tokens_per_s']:.2f} | {a['ttft_ms']:.0f} | "
                    f"{_f(None if acc is None else 100 * acc, '.1f')}"
                    f"{'%' if acc is not None else ''} | {a['verifications_per_token']:.3f} | "
                    f"{_f(a['mean_draft_len'], '.2f')} | {a['bytes_up_per_token']:.0f} | "
                    f"{a['bytes_down_per_token']:.0f} | {a['rollbacks']} | "
                    f"{a['wasted_drafts']} | {a['edge_j_per_token']:.3f} | "
                    f"{a['cloud_j_per_token']:.3f} | {_matched(a, p)} |"
                )
            names = list(cell)
            lines += [
                "",
                "Speed-up of the row's policy over the column's in decode time per token "
                "(column / row; decode = after the first token, so the prompt's prefill, the "
                "same work for every policy, does not dilute it):",
                "",
                "| | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names),
            ]
            for p in names:
                row = [
                    f"{cell[q]['decode_ms_per_token'] / cell[p]['decode_ms_per_token']:.2f}"
                    if cell[p]["decode_ms_per_token"] else "–"
                    for q in names
                ]  # fmt: skip
                lines.append(f"| {p} | " + " | ".join(row) + " |")
            lines.append("")
    lines += _divergences(result)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cloud_energy_label(result: dict[str, Any]) -> str:
    sources = sorted({r["energy_source"]["cloud"] for r in result["runs"]})
    return " / ".join(sources) if sources else "not measured"


def _divergences(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    draft = [r for r in runs if r["policy"] == "draft-only"
             and r["matches_target_only"] is not None]  # fmt: skip
    spec = [r for r in runs if r["policy"] not in ("target-only", "draft-only")
            and r["matches_target_only"] is not None]  # fmt: skip
    lines = ["## Greedy output against target-only", ""]
    bad = [r for r in spec if not r["matches_target_only"]]
    lines.append(
        f"Speculative runs identical to target-only: {len(spec) - len(bad)} of {len(spec)}."
    )
    for r in bad:
        d = r["divergence"] or {}
        m = d.get("target_margin")
        lines.append(
            f"- {r['policy']}, {r['scenario']}, {r['workload']} prompt {r['prompt_index']}: "
            f"first differs at new token {d.get('position')}"
            + (f" (target's top-two logit margin there {m:.3f})" if m is not None else "")
        )
    if draft:
        differ = sum(not r["matches_target_only"] for r in draft)
        lines += ["", f"draft-only's text differs from target-only's in {differ} of "
                      f"{len(draft)} runs (expected: it is the small model alone)."]  # fmt: skip
    return lines + [""]


# -------------------------------------------------------------------------------- plots
def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    summary = result["summary"]
    for metric, fname, ylabel in (
        ("ms_per_token", "time_per_token.png", "ms per output token"),
        ("energy", "energy_per_token.png", "J per output token (edge modelled + cloud)"),
    ):
        fig, axes = plt.subplots(len(summary), 1, figsize=(12, 4.2 * len(summary)),
                                 squeeze=False)  # fmt: skip
        for ax, (w, by_sc) in zip(axes[:, 0], summary.items(), strict=True):
            scs = list(by_sc)
            pols = list(dict.fromkeys(p for sc in scs for p in by_sc[sc]))
            width = 0.8 / max(1, len(pols))
            cmap = plt.get_cmap("tab20")
            for k, p in enumerate(pols):
                xs = [i + (k - (len(pols) - 1) / 2) * width for i in range(len(scs))]
                if metric == "ms_per_token":
                    ys = [by_sc[sc].get(p, {}).get("ms_per_token", 0.0) for sc in scs]
                    ax.bar(xs, ys, width, label=p, color=cmap(k))
                else:
                    edge = [by_sc[sc].get(p, {}).get("edge_j_per_token", 0.0) for sc in scs]
                    cloud = [by_sc[sc].get(p, {}).get("cloud_j_per_token", 0.0) for sc in scs]
                    ax.bar(xs, edge, width, color=cmap(k), label=p)
                    ax.bar(xs, cloud, width, bottom=edge, color=cmap(k), alpha=0.45,
                           hatch="//", edgecolor="white")  # fmt: skip
            ax.set_xticks(range(len(scs)), scs)
            ax.set_ylabel(ylabel)
            title = f"{w}: {ylabel}"
            if metric == "energy":
                title += " (solid: edge, hatched: cloud)"
            ax.set_title(title)
            ax.legend(fontsize=7, ncol=4)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    tl = timeline(result, out)
    if tl is not None:
        written.append(tl)
    return written


def _rounds(trace: list[list[Any]], one_way_s: float, n_rounds: int) -> dict[str, list[Any]]:
    """Bars (start, width) per lane for the first ``n_rounds`` verdicts of a trace."""
    lanes: dict[str, list[Any]] = {"edge: draft": [], "link: up": [], "cloud: verify": [],
                                   "link: down": []}  # fmt: skip
    # Start after the first verdict: before it, prefill and prompt evaluation dominate.
    first = next((i for i, e in enumerate(trace) if e[0] == "verdict"), None)
    if first is None:
        return lanes
    t0 = trace[first][1]
    verdicts = 0
    for kind, a, b in trace[first + 1 :]:
        a -= t0
        if kind == "draft":
            lanes["edge: draft"].append((a, b - t0 - a))
        elif kind in ("send", "verify"):
            lanes["link: up"].append((a, one_way_s))
        elif kind == "verdict":
            arrive = a - one_way_s
            lanes["cloud: verify"].append((arrive - b, b))
            lanes["link: down"].append((arrive, one_way_s))
            verdicts += 1
            if verdicts >= n_rounds:
                break
    return lanes


def timeline(result: dict[str, Any], out: Path, *, n_rounds: int = 5) -> Path | None:
    """A few rounds of pipesd and vanilla on edge, link and cloud lanes."""
    import matplotlib.pyplot as plt

    from pipesd.link import SCENARIOS

    picks: dict[tuple[str, str], dict[str, Any]] = {}
    for r in result["runs"]:
        if r.get("trace") and r["policy"] in ("pipesd", "vanilla"):
            sc = result["scenarios"][r["scenario"]]
            if sc["link"] is None:
                continue
            key = (r["scenario"], r["workload"])
            picks.setdefault(key, {})[r["policy"]] = r
    both = [k for k, v in picks.items() if len(v) == 2]
    if not both:
        return None
    key = sorted(both)[0]
    one_way = SCENARIOS[result["scenarios"][key[0]]["link"]].one_way_ms / 1000.0
    fig, axes = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True)
    colors = {"edge: draft": "tab:blue", "link: up": "tab:orange", "cloud: verify": "tab:green",
              "link: down": "tab:red"}  # fmt: skip
    for ax, policy in zip(axes, ("pipesd", "vanilla"), strict=True):
        lanes = _rounds(picks[key][policy]["trace"], one_way, n_rounds)
        for y, (lane, bars) in enumerate(lanes.items()):
            ax.broken_barh([(s * 1000, w * 1000) for s, w in bars], (y - 0.4, 0.8),
                           color=colors[lane])  # fmt: skip
        ax.set_yticks(range(len(lanes)), list(lanes))
        ax.invert_yaxis()
        ax.set_title(f"{policy}: {n_rounds} verifications after the first ({key[1]}, {key[0]})")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(
        "ms since the first verdict (link bars: one-way latency from each send; cloud bars: the "
        "verdict's verify time, placed one latency before it arrived)"
    )
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
