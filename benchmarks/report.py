"""Markdown from benchmark JSON: each result's tables, and docs/PERFORMANCE.md regenerated from all results.

    python -m benchmarks.report [--results benchmarks/results] [--out docs/PERFORMANCE.md]

Measured figures always carry the device and the command that produced them; counted and modeled
figures sit in their own tables, labeled as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PERFORMANCE_MD = ROOT / "docs" / "PERFORMANCE.md"


def git_commit(short: bool = True) -> str:
    """HEAD of the checkout (abbreviated unless `short=False`), or "unknown" outside git."""
    try:
        cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_files(root: Path = ROOT) -> list[Path]:
    """The sources every number of a result depends on: the kernels (jit_kernels/*.py) and the model definition."""
    return sorted((root / "jit_kernels").glob("*.py")) + [root / "jit_fast" / "model" / "network.py"]


def source_fingerprint(root: Path = ROOT) -> dict:
    """Git commit of the checkout and sha256 over the (relative path, contents) of `source_files`, so a result
    can later tell whether the kernels or the model changed since it was produced (`benchmarks.report`)."""
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return dict(commit=git_commit(short=False), sources_sha256=digest.hexdigest(),
                sources="jit_kernels/*.py, jit_fast/model/network.py")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _measured_gpu(res: dict) -> list[str]:
    gpu = res["gpu"]
    if "skipped" in gpu:
        return [f"**GPU timings: not taken.** {gpu['skipped']}"]
    head = f"Measured on **{gpu['device']}** (torch {gpu['torch']}) with `{res['command']}`, {res['created']}."
    out = [head]
    check = gpu.get("selfcheck")
    if check:
        out.append(f"`jit_fast.selfcheck` on this device before timing: {check['checks']} checks, "
                   + ("all passed." if check["passed"] else
                      f"FAILED {', '.join(check['failed'])}. Not timed (wrong kernels have no speed): "
                      + ", ".join(f"{k} {'/'.join(v)}" for k, v in gpu.get("refused", {}).items()) + "."))
    if isinstance(gpu.get("ops"), list):
        out.append("Per-op times (`triton.testing.do_bench` median); GB/s = the fused op's I/O bytes / time.")
        out.append(_table(
            ["op", "path", "fwd ms", "fwd+bwd ms", "fwd GB/s", "fwd+bwd GB/s", "% peak BW (fwd+bwd)"],
            [[r["op"], r["path"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}", f"{r['gbps_fwd']:.0f}",
              f"{r['gbps_fwd_bwd']:.0f}", f"{r['pct_peak_bw_fwd_bwd']:.0f}%" if "pct_peak_bw_fwd_bwd" in r else "-"]
             for r in gpu["ops"]],
        ))
    att = gpu.get("attention")
    if isinstance(att, dict) and "backends" in att:
        out.append(_table(
            [f"attention backend ({att['heads']} heads x {att['head_dim']}, {att['tokens']} tokens, batch "
             f"{att['batch']}, bf16)", "runs at head dim", "fwd ms", "fwd+bwd ms"],
            [[name, r["head_dim"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}"] if "fwd_ms" in r
             else [name, r["head_dim"], r.get("error", "-"), "-"] for name, r in att["backends"].items()],
        ))
    if isinstance(gpu.get("block"), list):
        out.append(_table(
            ["block path", "fwd ms", "fwd+bwd ms", "img/s (depth x block, fwd+bwd)", "MFU fwd+bwd"],
            [[r["path"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}", f"{r['img_per_s_depth_blocks']:.0f}",
              _pct(r["mfu_fwd_bwd"]) if "mfu_fwd_bwd" in r else "-"] for r in gpu["block"]],
        ))
    if isinstance(gpu.get("train_step"), list):
        out.append(_table(
            ["train step path", "ms / step", "img/s", "MFU"],
            [[r["path"], f"{r['step_ms']:.1f}", f"{r['img_per_s']:.0f}", _pct(r["mfu"]) if "mfu" in r else "-"]
             for r in gpu["train_step"]],
        ))
    if isinstance(gpu.get("sampling"), list):
        out.append(_table(
            ["sampling path", "CUDA graph", "Heun steps", "img/s"],
            [[r["path"], r["cuda_graph"], r["steps"], f"{r['img_per_s']:.1f}"] for r in gpu["sampling"]],
        ))
    if isinstance(gpu.get("data"), dict) and "error" not in gpu["data"]:
        d = gpu["data"]
        out.append(_table(
            [f"loader backend ({d['images']} synthetic JPEGs, batch {d['batch']}, {d['workers']} workers)", "img/s",
             "CPU ms / image"],
            [[b, f"{d[b]['images_per_s']:.0f}", f"{d[b]['cpu_ms_per_image']:.2f}"] if "images_per_s" in d[b]
             else [b, d[b].get("error", "-"), "-"] for b in ("dali", "torch") if b in d],
        ))
    errors = [f"- {k}: {v['error']}" for k, v in gpu.items() if isinstance(v, dict) and "error" in v]
    return out + (["Sections that failed:\n" + "\n".join(errors)] if errors else [])


def _measured_cpu(res: dict) -> list[str]:
    cpu = res.get("cpu_measured", {})
    if "skipped" in cpu:
        return [f"CPU measurements: {cpu['skipped']}"]
    out = [f"Measured on **{cpu['device']}** ({cpu['threads']} thread) with `{res['command']}`, {res['created']}. "
           "CPU wall-clock only: these say nothing about GPU speed."]
    ops = cpu["reference_ops"]
    out.append(_table(
        [f"eager reference op ({ops['shape']})", "median ms", "min ms"],
        [[k, f"{v['median_s'] * 1e3:.3f}", f"{v['min_s'] * 1e3:.3f}"] for k, v in ops["seconds"].items()],
    ))
    sm = cpu["sampler"]
    out.append(_table(
        [f"sampler ({sm['shape']})", "median ms / step", "min ms / step"],
        [[k, f"{v['median_s'] * 1e3:.3f}", f"{v['min_s'] * 1e3:.3f}"] for k, v in sm["seconds"].items()],
    ))
    dec = cpu["decode"]
    out.append(f"JPEG decode + ADM center crop to {dec['size']} (PIL, 1 thread): "
               f"**{dec['images_per_s']:.0f} img/s** over {dec['images']} ImageNet-sized JPEGs.")
    return out


def _counted_blocks(res: dict) -> list[str]:
    rows, ratios = [], []
    for model, b in res["modeled"]["blocks"].items():
        for path in ("eager", "fused"):
            s = b[path]
            ph = s["phases"]
            per = s["non_gemm_bytes_per_token_hidden"]
            rows.append([
                model, path, ph["fwd"]["all"]["launches"], ph["bwd"]["all"]["launches"],
                _gb(ph["fwd"]["non_gemm"]["bytes"]), _gb(ph["bwd"]["non_gemm"]["bytes"]),
                f"{per['fwd']:.0f} / {per['bwd']:.0f}", _gb(s["saved_activation_bytes"]),
            ])
        c = b["compare"]
        ratios.append([
            model, f"{c['launches_fused']} / {c['launches_eager']} = {_pct(c['launches_ratio'])}",
            f"{_gb(c['non_gemm_bytes_fused'])} / {_gb(c['non_gemm_bytes_eager'])} = {_pct(c['non_gemm_bytes_ratio'])}",
            f"{_gb(c['saved_activation_bytes_fused'])} / {_gb(c['saved_activation_bytes_eager'])} = "
            f"{_pct(c['saved_ratio'])}",
        ])
    return [
        f"Standard block (in-context tokens, pending residual in, no dropout), batch {res['batch']}, bf16 autocast "
        "with fp32 parameters (one process without FSDP); \"bf16 params\": block parameters gathered in bf16 and an "
        "fp32 root as FSDP2 trains (`--fsdp on`, any GPU count; no autocast weight casts); \"dropout block\": one in "
        "the range where the preset trains with dropout (eager: torch's masks drawn, applied and saved; fused: Philox "
        "masks drawn inside the residual and SwiGLU kernels, forward and backward). "
        "Non-GEMM bytes exclude GEMMs and attention (identical in both paths); GB = 1e9 bytes.",
        _table(["model", "path", "launches fwd", "launches bwd", "non-GEMM GB fwd", "non-GEMM GB bwd",
                "non-GEMM B / token / hidden (fwd / bwd)", "saved activations GB"], rows),
        "Fused / eager over forward+backward (issue 7 targets, for the standard block: launches <= 25%, "
        "non-GEMM bytes <= 15%, saved activations <= 60%):",
        _table(["model", "launches", "non-GEMM GB", "saved activations GB"], ratios),
    ]


def _projection_table(rows: list[dict], what: str) -> str:
    return _table(
        ["GPU", f"eager {what} ms", f"fused {what} ms", "speedup", "MFU eager", "MFU fused"],
        [[r["gpu"], f"{r['eager_ms']:.2f}", f"{r['fused_ms']:.2f}", f"{r['speedup_fused_vs_eager']:.2f}x",
          _pct(r["eager_mfu"]), _pct(r["fused_mfu"])] for r in rows],
    )


def _modeled(res: dict) -> list[str]:
    m = res["modeled"]
    a = m["assumptions"]
    out = [
        f"**Modeled, not measured.** Roofline per op: max(FLOPs / (peak x efficiency), bytes / (HBM bandwidth x "
        f"efficiency), {a['min_kernel_s'] * 1e6:.0f} us x launches), ops back to back. Efficiencies assumed: GEMM "
        f"{a['gemm_efficiency']:.0%}, attention {a['attention_efficiency']:.0%}, memory "
        f"{a['bandwidth_efficiency']:.0%}. Peaks: "
        + "; ".join(f"{k} {v['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {v['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
                    for k, v in m["gpus"].items()) + " (datasheet values, see jit_fast/perf/roofline.py).",
    ]
    model = res["model"]
    block = m["blocks"].get(model) or next(iter(m["blocks"].values()))
    out.append(f"Modeled {model} standard block, fwd+bwd, batch {res['batch']}:")
    out.append(_projection_table(block["projection"], "block"))
    step = m["train_step"]
    out.append(f"Modeled {model} full train step (loss fwd+bwd, fused AdamW, 2 EMA updates), batch {res['batch']}:")
    out.append(_projection_table(step["projection"], "step"))
    if "projection_pure_roofline" in step:
        pure = ", ".join(f"{r['gpu']} {r['speedup_fused_vs_eager']:.2f}x" for r in step["projection_pure_roofline"])
        out.append("Same step under a pure roofline (100% of peak FLOP/s and bandwidth, no kernel floor), modeled "
                   f"speedups fused vs eager: {pure}.")
    out.append("```\n" + step["h100_text"] + "\n```")
    sm = m["sampling"]
    st = sm["settings"]
    out.append(
        f"Modeled sampling, {st['solver']}-{st['steps']} with CFG {st['cfg']} on t in {st['interval']}: "
        f"{sm['rows_per_image']} forward rows per image, forward batch {sm['forward_batch']}:"
    )
    out.append(_table(
        ["GPU", "eager img/s", "fused img/s", "speedup"],
        [[r["gpu"], f"{r['eager_img_per_s']:.0f}", f"{r['fused_img_per_s']:.0f}",
          f"{r['speedup_fused_vs_eager']:.2f}x"] for r in sm["projection"]],
    ))
    return out


def _categories(res: dict) -> list[str]:
    block = res["modeled"]["blocks"].get(res["model"])
    if block is None:
        return []
    rows = []
    for cat in ("gemm", "attention", "fused", "other"):
        row = [cat]
        for path in ("eager", "fused"):
            ph = block[path]["phases"]
            row += [ph["fwd"][cat]["launches"] + ph["bwd"][cat]["launches"],
                    _gb(ph["fwd"][cat]["bytes"] + ph["bwd"][cat]["bytes"])]
        rows.append(row)
    step = res["modeled"]["train_step"]
    return [
        f"Where the {res['model']} standard block's launches and bytes go (fwd+bwd, batch {res['batch']}). "
        "In the fused path, `other` is what no fused kernel covers: autocast weight/bias casts and their "
        "gradient casts, bias-gradient sums, the adaLN chunk gradient concat (the fused model computes the adaLN "
        "SiLU once for all blocks, outside them):",
        _table(["category", "eager launches", "eager GB", "fused launches", "fused GB"], rows),
        f"Whole train step, activations saved for backward: eager {_gb(step['eager']['saved_activation_bytes'])} GB, "
        f"fused {_gb(step['fused']['saved_activation_bytes'])} GB ({_pct(step['compare']['saved_ratio'])}).",
        *_bf16_step(step),
    ]


def _bf16_step(step: dict) -> list[str]:
    """The whole train step's forward+backward ratios with bf16 block parameters (FSDP2), if the result has them."""
    c = step.get("bf16_params")
    if c is None:
        return []
    return [
        "Whole train step, forward+backward with bf16 block parameters as FSDP2 trains (training mode: the preset's "
        "dropout included; issue 16 targets for JiT-H/16: launches <= 20%, non-GEMM bytes <= 16%): launches "
        f"{c['launches_fused']} / {c['launches_eager']} = {_pct(c['launches_ratio'])}, non-GEMM GB "
        f"{_gb(c['non_gemm_bytes_fused'])} / {_gb(c['non_gemm_bytes_eager'])} = {_pct(c['non_gemm_bytes_ratio'])}, "
        f"saved activations {_pct(c['saved_ratio'])}."
    ]


def _op_boundaries(res: dict) -> list[str]:
    rows = [[r["op"], r["path"], r["fwd_launches"], _gb(r["fwd_bytes"]), r["bwd_launches"], _gb(r["bwd_bytes"]),
             _gb(r["saved_activation_bytes"])] for r in res["modeled"]["op_boundaries"]]
    return [
        f"Counted per fused-op boundary ({res['model']} block shapes, batch {res['batch']}): eager reference vs "
        "fused custom op (its I/O plus the internal two-stage reduction traffic).",
        _table(["op", "path", "launches fwd", "GB fwd", "launches bwd", "GB bwd", "saved GB"], rows),
    ]


def _per_op(res: dict, limit: int = 25) -> list[str]:
    out = []
    for path in ("eager", "fused"):
        rows = sorted(res["modeled"]["block_per_op"][path], key=lambda r: -(r["bytes_read"] + r["bytes_written"]))
        out.append(f"Counted {res['model']} block, {path} path: the {limit} op groups moving the most bytes.")
        out.append(_table(
            ["phase", "region / autograd node", "op", "category", "calls", "launches", "GB read", "GB written",
             "GFLOP"],
            [[r["phase"], r["region"] or "-", r["op"], r["category"], r["calls"], r["launches"], _gb(r["bytes_read"]),
              _gb(r["bytes_written"]), f"{r['flops'] / 1e9:.1f}"] for r in rows[:limit]],
        ))
    return out


def _compiled(res: dict) -> list[str]:
    c = res["compiled"]
    out = [c["statement"]]
    p = c["inductor_cpu_proxy"]
    if "skipped" in p:
        out.append(f"Inductor CPU proxy: {p['skipped']}")
        return out
    names = {"eager": "eager (counted)", "compiled": "torch.compile (inductor CPU proxy)", "fused": "fused (counted)"}
    out.append(
        f"{p['model']} standard block at batch {p['batch']}, {p['img_size']}px; inductor compiled it on CPU at batches "
        f"{p['compiled_at_batches']} and its per-kernel bytes were scaled to batch {p['batch']} "
        f"({p['seconds']:.0f} s). GEMM and attention launches are the same extern calls in all three."
    )
    out.append(_table(
        ["block", "launches fwd", "launches bwd", "non-GEMM GB fwd+bwd"],
        [[names[k], v["launches_fwd"], v["launches_bwd"], _gb(v["non_gemm_bytes"])]
         for k, v in c["block_counts"].items()],
    ))
    out.append("**Modeled, not measured** (same roofline as below; the compiled column inherits the proxy's limits):")
    out.append(_table(
        ["GPU", "eager ms", "compiled ms (proxy)", "fused ms", "fused vs eager", "fused vs compiled"],
        [[r["gpu"], f"{r['eager_ms']:.2f}", f"{r['compiled_ms']:.2f}", f"{r['fused_ms']:.2f}",
          f"{r['speedup_fused_vs_eager']:.2f}x", f"{r['speedup_fused_vs_compiled']:.2f}x"] for r in c["projection"]],
    ))
    return out


def render_result(res: dict) -> str:
    """Markdown for one `benchmarks.run` result."""
    parts = [
        f"## {res['model']}, batch {res['batch']}, {res['img_size']}px",
        f"Command: `{res['command']}` on {res['host']}, {res['created']}, git {res['git']}, torch "
        f"{res['versions']['torch']}, triton {res['versions']['triton']}"
        + (f"; jit_kernels/*.py + jit_fast/model/network.py sha256 {res['source']['sources_sha256'][:12]}."
           if "source" in res else "."),
        "### Measured on GPU",
        *_measured_gpu(res),
        "### Measured on CPU",
        *_measured_cpu(res),
        "### Counted traffic (fake-tensor dispatch of the real shapes; not timings)",
        *_counted_blocks(res),
        *_categories(res),
        *_op_boundaries(res),
        "### Modeled GPU times (roofline from the counts)",
        *_modeled(res),
        "### The official release as shipped (torch.compile)",
        *_compiled(res),
        "### Per-op detail (counted)",
        *_per_op(res),
    ]
    return "\n\n".join(parts) + "\n"


HEADER = """# Performance

Generated by `python -m benchmarks.report` from the JSON in `benchmarks/results/` (written by
`python -m benchmarks.run`); do not edit by hand. How the numbers are made: docs/BENCHMARKS.md.
Measured figures name their device and command; counted and modeled figures are in their own
tables and say so. No GPU timing appears here unless it was measured on that GPU.
"""


def staleness(res: dict, current: dict) -> str | None:
    """Why a result no longer describes the checkout (`current` = `source_fingerprint()`), or None.

    Stale when the sha256 of jit_kernels/*.py and jit_fast/model/network.py differs from the one recorded (or none was
    recorded). A different commit alone is no warning: committing the results themselves moves HEAD.
    """
    recorded = res.get("source")
    if not recorded or "sources_sha256" not in recorded:
        return f"records no source hash (git {res.get('git', 'unknown')}): cannot tell whether it matches the checkout"
    if recorded["sources_sha256"] != current["sources_sha256"]:
        return (f"was produced from other jit_kernels/*.py or jit_fast/model/network.py "
                f"(sha256 {recorded['sources_sha256'][:12]}, git {recorded.get('commit', 'unknown')[:12]}) "
                f"than the checkout's (sha256 {current['sources_sha256'][:12]}, git {current['commit'][:12]})")
    return None


def warn_stale(paths: list[Path], current: dict, out=None) -> int:
    """Print a clear warning to stderr for every stale result; return how many there were."""
    out = out or sys.stderr
    stale = 0
    for path in paths:
        why = staleness(json.loads(path.read_text()), current)
        if why:
            stale += 1
            print(f"WARNING: STALE BENCHMARK RESULT {path.name} {why}; rerun its command "
                  f"(`python -m benchmarks.run ...`) and `python -m benchmarks.report`.", file=out)
    return stale


TARGET_VS_COMPILED = 1.5  # the step speedup over the compiled official release asked for
TARGET_SAMPLING_MINUTES = 2.0  # 50k B/16 images on 8 GPUs


def render_plans(res: dict) -> str:
    """Markdown for one `benchmarks.plans` result: training per preset, sampling, calibration, the targets."""
    setting = f"{res['gpus']} x {res['gpu']}, global batch {res['global_batch']}, {res['epochs']} epochs of ImageNet"
    rows, samp, best = [], [], {}
    for model, entry in res["presets"].items():
        p, paths = entry["plan"], entry["plan"]["paths"]
        comp = paths["compiled"]["step_s"]
        fp8 = {k: v for k, v in paths.items() if k.startswith("fused+fp8")}
        best[model] = max([("fused bf16", comp / paths["fused"]["step_s"])]
                          + [(k.replace("fused+fp8 ", "fused FP8 "), comp / v["step_s"]) for k, v in fp8.items()],
                          key=lambda kv: kv[1])
        batch = f"{p['per_gpu_batch']}" + (f" ({p['grad_accum']} x {p['micro_batch']})" if p["grad_accum"] > 1 else "")
        rows.append([model, batch, f"{p['peak_bytes'] / 2**30:.1f}" + ("" if p["fits"] else " (no fit)"),
                     *(f"{paths[k]['step_s'] * 1e3:.0f}" for k in ("eager", "compiled", "fused")),
                     *(f"{v['step_s'] * 1e3:.0f}" for v in fp8.values()),
                     f"{comp / paths['fused']['step_s']:.2f}x", *(f"{comp / v['step_s']:.2f}x" for v in fp8.values()),
                     f"{paths['fused']['days']:.1f}", f"{paths['fused']['mfu']:.1%}"])
        sm = entry["sampling"]
        samp.append([model, *(f"{v['img_per_s_per_gpu']:.1f}" for v in sm["paths"].values()),
                     *(f"{v['minutes']:.2f}" for v in sm["paths"].values())])
    fp8_names = [k.replace("fused+fp8 ", "") for k in next(iter(res["presets"].values()))["plan"]["paths"]
                 if k.startswith("fused+fp8")]
    sm0 = next(iter(res["presets"].values()))["sampling"]
    spaths = list(sm0["paths"])
    c = res["calibration"]
    out = [
        f"## Modeled training plans: {setting}",
        f"Command: `{res['command']}`, {res['created']}; `python -m jit_fast.plan` for each preset. **Every figure "
        "is modeled** (counted traffic on the roofline; memory from the memory plan), none measured.",
        _table(["model", "batch / GPU", "peak GiB", "eager ms", "compiled ms", "fused ms",
                *(f"fused FP8 {n} ms" for n in fp8_names), "fused vs compiled",
                *(f"FP8 {n} vs compiled" for n in fp8_names), "days (fused)", "MFU (fused)"], rows),
        f"Modeled sampling ({sm0['settings']['solver']}-{sm0['settings']['steps']}, CFG {sm0['settings']['cfg']} "
        f"on t in {sm0['settings']['interval']}, {sm0['forward_rows_per_image']} forward rows per image, "
        f"{sm0['batch_per_gpu']} images per GPU), img/s per GPU and minutes for {sm0['images']:,} images on "
        f"{sm0['gpus']} GPUs:",
        _table(["model", *(f"{n} img/s" for n in spaths), *(f"{n} min" for n in spaths)], samp),
        f"Calibration: the official code trained {c['model']} ({c['img_size']}px, {c['per_gpu_batch']} per GPU on "
        f"{c['gpus']} x {c['gpu']}, {c['epochs']} epochs) in about {c['days']:.0f} days; the planner's eager estimate "
        f"of that run is {c['modeled_eager_days']:.1f} days (measured / modeled = {c['measured_over_modeled']:.2f}).",
        _targets(best, res["presets"].get("JiT-B/16", {}).get("sampling"), sm0["gpus"]),
    ]
    return "\n\n".join(out) + "\n"


def _targets(best: dict[str, tuple[str, float]], b16_sampling: dict | None, gpus: int) -> str:
    """Whether the model reaches the step target (`best`: per preset its fastest path and ratio to compiled) and,
    when JiT-B/16 was planned, the 50k-image sampling target."""
    reached = [m for m, (_, r) in best.items() if r >= TARGET_VS_COMPILED]
    model, (path, ratio) = max(best.items(), key=lambda kv: kv[1][1])
    line = f"Targets in the model: a step {TARGET_VS_COMPILED}x the compiled official release is " + (
        f"reached by {', '.join(reached)}" if reached else f"not reached (best: {model} {path}, {ratio:.2f}x)")
    if not b16_sampling:
        return line + "."
    name, fastest = min(b16_sampling["paths"].items(), key=lambda kv: kv[1]["minutes"])
    verdict = "reached" if fastest["minutes"] <= TARGET_SAMPLING_MINUTES else "not reached"
    return (f"{line}; 50k JiT-B/16 images on {gpus} GPUs in {TARGET_SAMPLING_MINUTES:g} minutes is {verdict} "
            f"(fastest: {name}, {fastest['minutes']:.2f} min).")


def build_document(results_dir: Path = RESULTS_DIR) -> str:
    """docs/PERFORMANCE.md text: the planner's preset tables, then every result JSON (GPU results first)."""
    plans = [render_plans(json.loads(p.read_text())) for p in sorted((results_dir / "plans").glob("*.json"))]
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results.sort(key=lambda r: ("skipped" in r.get("gpu", {}), r["model"], r["batch"]))
    body = [render_result(r) for r in results] or ["No results yet: run `python -m benchmarks.run`.\n"]
    return HEADER + "\n" + "\n".join(plans + body)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: regenerate the performance page."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=PERFORMANCE_MD)
    args = ap.parse_args(argv)
    warn_stale(sorted(args.results.glob("*.json")) + sorted((args.results / "plans").glob("*.json")),
               source_fingerprint())
    for path in sorted(args.results.glob("*.json")):  # keep each result's own Markdown in step with this renderer
        path.with_suffix(".md").write_text(render_result(json.loads(path.read_text())))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build_document(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
