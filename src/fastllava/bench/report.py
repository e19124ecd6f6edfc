"""Benchmark output: a text table, a JSON file with the environment, and a PNG plot (matplotlib,
from the plots extra: checked when this module is imported, so before any timing)."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..extras import require

require("matplotlib", "plots", "fastllava bench")  # bench.png; `fastllava bench` imports this module first


def environment(device: torch.device) -> dict:
    from .. import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    env = {"device": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "fastllava": __version__, "python": platform.python_version(),
           "command": " ".join(["fastllava", *sys.argv[1:]]) if sys.argv else "", "cpus": os.cpu_count()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def table(cases: list[dict]) -> str:
    """One markdown row per case; ratios are transformers' time over ours (and our decode speed
    over theirs) when transformers was measured."""
    modes = _modes(cases)
    head = ["batch", "visual tokens"] + (["decode"] if len(modes) > 1 else []) + [
        "vision ms", "projector ms", "prefill ms", "TTFT ms", "decode tok/s", "e2e ms", "peak MiB", "KV MiB"]
    if len(modes) > 1:
        head.append(f"same tokens as {modes[0]}")
    speculated = any("speculate" in c["ours"] for c in cases)
    if speculated:
        head.append("drafts kept / tokens per step")
    compare = any("hf" in c for c in cases)
    if compare:
        head += ["HF TTFT ms", "HF decode tok/s", "HF e2e ms", "TTFT x", "decode x", "e2e x", "same tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        o = c["ours"]
        row = [str(c["batch"]), str(c["visual_tokens"])] + ([c["decode"]] if len(modes) > 1 else []) + [
            _ms(o["vision_s"]), _ms(o["projector_s"]), _ms(o["prefill_s"]), _ms(o["ttft_s"]),
            f"{o['decode_tok_s']:.1f}", _ms(o["e2e_s"]), _mib(o["peak_bytes"]), _mib(o["kv_cache_bytes"])]
        if len(modes) > 1:
            row.append(str(c["same_tokens_as_first_decode"]))
        if speculated:
            sp = o.get("speculate")
            row.append("-" if sp is None else f"{sp['acceptance']:.0%} / {sp['tokens_per_step']:.2f}")
        if compare:
            h, r = c.get("hf"), c.get("ratios", {})
            row += ["-"] * 7 if h is None else [
                _ms(h["ttft_s"]), f"{h['decode_tok_s']:.1f}", _ms(h["e2e_s"]), f"{r['ttft']:.2f}",
                f"{r['decode']:.2f}", f"{r['e2e']:.2f}", str(c["same_tokens"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _modes(cases: list[dict]) -> list[str]:
    """The decode modes the cases were timed in, in order."""
    return list(dict.fromkeys(c.get("decode", "eager") for c in cases))


def write(out_dir: Path, report: dict, plot: bool = True) -> list[Path]:
    """bench.json and bench.md (and, with `plot`, bench.png) in out_dir -> the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "bench.json", out_dir / "bench.md", out_dir / "bench.png"]
    files[0].write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    files[1].write_text(f"{env['device']}, {env['date']}, torch {env['torch']}, fastllava {env['fastllava']}\n\n"
                        f"`{env['command']}`\n\n" + table(report["cases"]) + "\n")
    if not plot:
        return files[:2]
    draw(report, files[2])
    return files


def draw(report: dict, path: Path) -> None:
    """Time to first token and prefill against visual tokens kept, one line per batch size (and
    decode mode, when several were timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    modes = _modes(report["cases"])
    for mode, batch in [(m, b) for m in modes for b in sorted({c["batch"] for c in report["cases"]})]:
        rows = sorted((c for c in report["cases"] if c["batch"] == batch and c.get("decode", "eager") == mode),
                      key=lambda c: c["visual_tokens"])
        x = [c["visual_tokens"] for c in rows]
        label = f"fastllava{' ' + mode if len(modes) > 1 else ''}, batch {batch}"
        axes[0].plot(x, [c["ours"]["ttft_s"] * 1000 for c in rows], marker="o", label=label)
        axes[1].plot(x, [c["ours"]["prefill_s"] * 1000 for c in rows], marker="o", label=label)
        if mode == modes[0] and all("hf" in c for c in rows):
            axes[0].plot(x, [c["hf"]["ttft_s"] * 1000 for c in rows], marker="x", linestyle="--",
                         label=f"transformers, batch {batch}")
    for ax, title in zip(axes, ("time to first token", "language-model prefill")):
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['model']} on {report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
