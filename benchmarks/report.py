"""Regenerate BENCHMARKS.md (and the README's summary table) from benchmarks/results/*.json.

    python benchmarks/report.py --run     # run the CPU benchmarks here first, then write BENCHMARKS.md
    python benchmarks/report.py           # only rewrite BENCHMARKS.md from the stored results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "BENCHMARKS.md"
README = HERE.parent / "README.md"


def _machine(m: dict) -> str:
    flags = f" (CPU features: {', '.join(m['cpu_flags']) or 'none of AVX2, FMA, AVX-512, VNNI, AMX'})" \
        if "cpu_flags" in m else ""
    return (f"{m.get('cpu_model', m.get('processor', '?'))}{flags}, {m['cpus']} CPUs, torch {m['torch']} "
            f"({m['threads']} threads){', ' + m['gpu'] if m.get('gpu') else ''}; {m['date']}")


def _ratio(r: dict, *path: str) -> str:
    """A median ratio in bold, with its range over the repeated runs."""
    value = r
    for key in path:
        value = value[key]
    low, high = r.get("spread", {}).get(".".join(path), (None, None))
    return f"**{value:.2f}x**" + (f" ({low:.2f}-{high:.2f})" if low is not None and r["repeat"] > 1 else "")


def cpu_section(r: dict) -> list[str]:
    f, a, o = r["fold"], r["agc"], r["onnx"]
    lines = [
        "## CPU", "",
        f"Machine: {_machine(r['machine'])}. Measured here: fp32 matmul {r['peak_gflops']:.0f} GFLOP/s, "
        f"copy bandwidth {r['copy_gbps']:.1f} GB/s.", "",
        f"Command: `python benchmarks/report.py --run` (runs `benchmarks/cpu.py`: {r['repeat']} interleaved runs of "
        "every section, each in a fresh process). Every time is the median over the runs of medians of repeated, "
        "interleaved calls; headline ratios give their range over the runs in brackets. F0 at 256 px; models "
        "with non-zero skip gains (at initialisation they are zero and would flatter folding).", "",
        "### Folded PyTorch vs timm's `dm_nfnet_f0` (batch 1)", "",
        "| | timm | folded | ratio |", "|---|---|---|---|",
        f"| eager, plain modules (`fold`) | {f['timm_eager_ms']:.1f} ms | {f['folded_eager_ms']:.1f} ms "
        f"| {_ratio(r, 'fold', 'eager_speedup')} |",
        f"| eager, kernels laid out once for oneDNN (`prepack(fold(...))`) | {f['timm_eager_ms']:.1f} ms "
        f"| {f['prepacked_eager_ms']:.1f} ms | {_ratio(r, 'fold', 'prepacked_speedup')} |",
        f"| `torch.compile` (inductor, freezing) | {f['timm_compiled_ms']:.1f} ms | {f['folded_compiled_ms']:.1f} ms "
        f"| {f['compiled_speedup']:.2f}x |",
        f"| folded compiled vs timm eager | | | **{f['folded_compiled_vs_timm_eager']:.2f}x** |", "",
        "### AGC vs `timm.utils.agc.adaptive_clip_grad` (F0's parameters, fresh real gradients each step)", "",
        "| timm | ours | ratio | ours: bytes moved / copy bandwidth |", "|---|---|---|---|",
        f"| {a['timm_ms']:.1f} ms | {a['ours_ms']:.1f} ms | {_ratio(r, 'agc', 'speedup')} | "
        f"{a['ours_gbps']:.1f} GB/s = {a['fraction_of_copy_bandwidth']:.0%} of {a['copy_gbps']:.1f} GB/s |", "",
        f"{a['params']} tensors, {a['megabytes']:.0f} MB of weights; the floor is reading weights and gradients "
        "once (the few clipped units are written in place).", "",
        "### ONNX Runtime (CPU provider), F0 at 256 px", "",
        "| | timm's export (dynamo) | ours fp32 | ours int8 |", "|---|---|---|---|",
        f"| graph nodes | {o['timm_nodes']} | {o['ours_nodes']} | |",
        f"| file size | {o['timm_mb']:.0f} MB | {o['ours_mb']:.0f} MB (weights {o['weights_mb']:.0f} MB) "
        f"| {o['int8_mb']:.0f} MB |",
    ]
    for b in ("b1", "b8"):
        x = o[b]
        lines.append(f"| batch {b[1:]} latency | {x['timm_ms']:.1f} ms | {x['ours_ms']:.1f} ms "
                     f"({_ratio(r, 'onnx', b, 'ours_vs_timm')} timm's time) | {x['int8_ms']:.1f} ms "
                     f"({_ratio(r, 'onnx', b, 'int8_speedup')} faster than fp32) |")
    lines += ["", "Achieved throughput of our fp32 export: " + ", ".join(
        f"batch {b[1:]}: {o[b]['ours_gflops']:.0f} GFLOP/s ({o[b]['fraction_of_peak']:.0%} of the measured matmul "
        "rate)" for b in ("b1", "b8")) + ". Above 100% means ONNX Runtime's convolution kernels outrun the "
        "2048x2048 matmul used as the yardstick on this noisy shared machine, i.e. the export runs at the machine's "
        "practical compute limit.", "",
        "Reading the numbers: folding removes the per-call weight standardisation, which is what eager PyTorch pays "
        "for; the folded kernels are constants, so `prepack` also lays them out once for oneDNN and fuses each "
        "activation into the convolution before it (a plain `nn.Conv2d` re-lays its kernel out at every call, and "
        "timm's model must, since it standardises its kernels at every call). The convolutions then run at the "
        "machine's compute limit. Graph compilers that treat weights as constants (inductor with freezing, ONNX "
        "Runtime's constant folding at session start) fold it themselves at load time, so there the two graphs run "
        "at about the same speed; what our export changes there is a graph of a quarter of the nodes, no "
        "standardisation work at each session start, and one self-describing file. In int8 our export also keeps "
        "the squeeze-excite and head means quantised: it writes them as GlobalAveragePool, which ONNX Runtime runs "
        "in int8, where the exporter's ReduceMean runs in float behind a dequantise.", ""]
    if "loader" in r:
        d = r["loader"]
        lines += ["### Reading image folders for training (per image, timm's train transform at 224 px)", "",
                  "| timm's `ImageDataset` | ours (reads as the runtime does) | ratio |", "|---|---|---|",
                  f"| {d['timm_ms']:.2f} ms | {d['ours_ms']:.2f} ms | {_ratio(r, 'loader', 'ours_vs_timm')} "
                  "timm's time |", "",
                  "Real JPEG photos (scikit-image's astronaut, chelsea, coffee). Ours parses each image's header once "
                  "more, to find the 16-bit images that timm's PIL conversion would clip, and rescales those; other "
                  "images pass as they are.", ""]
    return lines


def readme_table(r: dict, gpu: dict | None = None, serve: dict | None = None) -> str:
    """The README's summary of the CPU results, of the GPU's AGC where measured, and of serving."""
    f, a, o = r["fold"], r["agc"], r["onnx"]
    g = gpu["agc"] if gpu and not _failed(gpu.get("agc")) and "ours_gpu_ms" in gpu["agc"] else None
    gpu_rows = [f"| AGC on F0's parameters, {gpu['machine']['gpu']} | {g['timm_agc_ms']:.1f} ms | "
                f"{g['ours_agc_ms']:.2f} ms | {g['speedup']:.0f}x faster (GPU time {g['ours_gpu_share_of_step']:.1%} "
                "of a training step) |"] if g else []
    return "\n".join([
        "| what | timm | nfnet-hub | ratio |", "|---|---|---|---|",
        f"| F0 eager inference, batch 1, 256 px | {f['timm_eager_ms']:.1f} ms | {f['folded_eager_ms']:.1f} ms "
        f"(`fold`) | {f['eager_speedup']:.2f}x faster |",
        f"| the same, kernels prepacked for oneDNN | {f['timm_eager_ms']:.1f} ms | {f['prepacked_eager_ms']:.1f} ms "
        f"(`prepack(fold(...))`) | {f['prepacked_speedup']:.2f}x faster |",
        f"| AGC on F0's parameters | {a['timm_ms']:.1f} ms | {a['ours_ms']:.1f} ms | {a['speedup']:.1f}x faster "
        f"({a['fraction_of_copy_bandwidth']:.0%} of copy bandwidth) |", *gpu_rows,
        f"| ONNX F0 graph | {o['timm_nodes']} nodes | {o['ours_nodes']} nodes | |",
        f"| ONNX Runtime F0, batch 1 / batch 8 | {o['b1']['timm_ms']:.1f} / {o['b8']['timm_ms']:.1f} ms "
        f"| {o['b1']['ours_ms']:.1f} / {o['b8']['ours_ms']:.1f} ms | {o['b1']['ours_vs_timm']:.2f}x / "
        f"{o['b8']['ours_vs_timm']:.2f}x the time |",
        f"| ONNX Runtime int8 vs our fp32, batch 8 | | {o['b8']['int8_ms']:.1f} ms | "
        f"{o['b8']['int8_speedup']:.1f}x faster |", *_serve_rows(serve)])


def _serve_rows(serve: dict | None) -> list[str]:
    if not serve or "f0" not in serve["models"]:
        return []
    c, x = serve["cold_start_s"], serve["models"]["f0"]["levels"]["32"]
    cpu = f"{serve['machine']['cpus']}-core {serve['machine'].get('cpu_model', 'CPU').split('(')[0].strip()}"
    return [f"| F0 behind `nfnet-hub serve`, 32 concurrent requests, vs `OnnxClassifier` at batch 32 ({cpu}) | | "
            f"{x['requests_per_s']:.1f} req/s | {x['ratio_to_raw']:.2f}x the raw throughput |",
            f"| F0 cold start to the first answer (timm: ONNX Runtime on timm's export; {cpu}) | "
            f"{c['ort_session_timm_dm_nfnet_f0']:.2f} s | {c['nfnet_hub_serve_f0']:.2f} s (`nfnet-hub serve`) | "
            f"{c['ratio']:.2f}x the time |"]


def _write_readme_table(table: str) -> None:
    start, end = "<!-- benchmarks: written by benchmarks/report.py -->\n", "\n<!-- /benchmarks -->"
    text = README.read_text()
    head, rest = text.split(start, 1)
    README.write_text(head + start + table + end + rest.split(end, 1)[1])


def _failed(section) -> str | None:
    """Why a GPU section has no numbers (gpu.py records a failure and goes on), or None."""
    if not isinstance(section, dict):
        return "not run"
    return section.get("error") or section.get("skipped")


def _gpu_fold(f: dict, setup: dict) -> list[str]:
    lines = [f"### Folded PyTorch vs timm's `{setup['anchor']}` (eager, {setup['size']} px)", "",
             "| precision, batch | timm | folded | speed-up | folded: achieved TFLOP/s (share of measured peak) |",
             "|---|---|---|---|---|"]
    for key, x in f.items():
        precision, batch = key.rsplit("_b", 1)
        lines.append(f"| {precision}, {batch} | {x['timm_ms']:.2f} ms | {x['folded_ms']:.2f} ms | "
                     f"**{x['speedup']:.2f}x** | {x['folded_tflops']:.1f} ({x['fraction_of_peak']:.1%}) |")
    return lines + [""]


def _gpu_agc(a: dict, setup: dict) -> list[str]:
    methods = ", ".join(f"`{m}` {a[m + '_ms']:.2f} ms" for m in ("per_tensor", "grouped", "triton") if m + "_ms" in a)
    lines = [f"### AGC vs `timm.utils.agc.adaptive_clip_grad` (`{setup['ours']}`'s parameters, fresh real gradients "
             "each call)", "",
             f"| timm | ours (`method=\"auto\"`: `{a['ours_method']}`) | speed-up (target >= 10x) |", "|---|---|---|",
             f"| {a['timm_agc_ms']:.2f} ms | {a['ours_agc_ms']:.2f} ms | **{a['speedup']:.1f}x** |", "",
             f"One call each, host work and a sync included. Each method of ours, same result: {methods}.", "",
             f"Share of a training step (target < 1%): the step is `{setup['ours']}`, SGD with Nesterov momentum, "
             f"bf16 autocast, batch {a['step_batch']} at {a['step_size']} px, {a['train_step_ms_bf16']:.1f} ms with "
             "AGC.", "", "| measure | share of the step |", "|---|---|"]
    if "ours_gpu_ms" in a:
        lines.append(f"| GPU time of our AGC ({a['ours_gpu_ms']:.3f} ms) | **{a['ours_gpu_share_of_step']:.2%}** |")
    lines += [f"| the step with AGC against without ({a['train_step_ms_bf16']:.2f} vs "
              f"{a['train_step_without_agc_ms']:.2f} ms, medians of interleaved rounds) | "
              f"{'**' * ('ours_gpu_ms' not in a)}{a['agc_share_of_step']:.2%}{'**' * ('ours_gpu_ms' not in a)} |",
              f"| one isolated call, host work and sync included ({a['ours_agc_ms']:.2f} ms) | "
              f"{a['ours_share_of_step']:.2%} |", ""]
    if "ours_gpu_ms" in a:
        lines += [f"Our AGC reads weights and gradients at {a['ours_read_gb_s']:.0f} GB/s, "
                  f"{a['ours_read_gb_s'] / a['copy_gb_s']:.0%} of the {a['copy_gb_s']:.0f} GB/s a plain copy "
                  "reaches here: it runs at the memory floor. In a step its host work (a pointer table, two "
                  "launches) overlaps with the GPU, which is still running the backward pass; an isolated call "
                  "waits for it.", ""]
    if (grown := a["train_step_ms_bf16"] - a["train_step_without_agc_ms"]) > 2 * a["ours_agc_ms"]:
        lines += [f"**Not explained:** the step grew by {grown:.1f} ms, over twice an isolated call's whole cost; " + (
            f"a call queued behind 10 ms of GPU work held the host {a['host_ms_behind_gpu_work']:.2f} ms; with the "
            f"grouped method the step took {a['train_step_grouped_agc_ms']:.1f} ms; the timed "
            f"steps {'stayed' if a['step_rounds_finite'] else 'did not stay'} finite." if "host_ms_behind_gpu_work" in a
            else "this run predates the checks for a host sync and for divergence (`benchmarks/gpu.py`)."), ""]
    return lines + [f"Same clipped gradients as timm's on this device (every method): largest difference "
                    f"{a['max_rel_difference_vs_timm']:.1e} of a tensor's largest entry, with "
                    f"{a['tensors_clipped_by_timm']} of {a['tensors']} tensors clipped.", ""]


def _gpu_onnx(o: dict, setup: dict) -> list[str]:
    lines = [f"### ONNX Runtime ({o['provider']}), `{setup['anchor']}` at {setup['size']} px, inputs and outputs "
             "on the device", ""]
    lines += [f"- {name[:-6]}: could not run: {error}" for name, error in o.items() if name.endswith("_error")]
    lines += ["| batch | timm's export | ours fp32 (ratio to timm's time) | ours fp16 (speed-up) | ours int8 "
              "(speed-up) | fp32 share of fp32 peak |", "|---|---|---|---|---|---|"]

    def cell(x: dict, name: str, ratio: str) -> str:
        return f"{x[name + '_ms']:.2f} ms ({x[ratio]:.2f}x)" if ratio in x else "-"

    for key, x in o.items():
        if key.startswith("b") and isinstance(x, dict):
            timm = f"{x['timm_ms']:.2f} ms" if "timm_ms" in x else "-"
            share = x.get("fp32_fraction_of_float32_peak")
            lines.append(f"| {key[1:]} | {timm} | {cell(x, 'fp32', 'ours_vs_timm')} | "
                         f"{cell(x, 'fp16', 'fp16_speedup')} | {cell(x, 'int8', 'int8_speedup')} | "
                         f"{'-' if share is None else format(share, '.0%')} |")
    return lines + [""]


def int8_section(r: dict) -> list[str]:
    """Accuracy of each quantisation setting over training seeds, here and on an emulated CPU; speed against fp32."""
    emulated = r.get("emulated_cpu")
    lines = ["## int8 on any x86 CPU", "",
             f"Machine: {_machine(r['machine'])}. "
             + (f"Emulated: `qemu-x86_64 -cpu {emulated}` (AVX2 and FMA, neither AVX-512 nor VNNI: the CPU of the "
                "machine where 8-bit weights lost points)." if emulated else "No CPU was emulated."), "",
             "Command: `python benchmarks/int8.py`. The quickstart's model (nano on digits, 10 epochs) trained with "
             f"seeds {', '.join(map(str, r['seeds']))}, quantised with each setting on {r['calibration_images']} "
             "training digits (four fifths calibrate, as export does), and scored on the 360 held-out digits. "
             "Cells give the change in accuracy against fp32 (points), the worst over the seeds first.", "",
             "| setting | worst change here | worst change " + (f"on {emulated}" if emulated else "emulated")
             + " | each seed, here / emulated |", "|---|---|---|---|"]
    for name, seeds in r["accuracy"].items():
        here = [v["here"] - v["fp32"] for v in seeds.values()]
        there = [v["emulated"] - v["fp32"] for v in seeds.values() if "emulated" in v]
        each = ", ".join(f"{v['here'] - v['fp32']:+.2f}" + (f" / {v['emulated'] - v['fp32']:+.2f}"
                                                            if "emulated" in v else "") for v in seeds.values())
        worst_there = f"{min(there):+.2f}" if there else "-"
        lines.append(f"| {name} | {min(here):+.2f} | {worst_there} | {each} |")
    sp = r["speed"]
    lines += ["", f"Speed: `{sp['model']}` at {sp['img_size']} px, ONNX Runtime CPU provider, here (medians of 3 "
              "interleaved rounds).", "", "| setting | batch 1 | batch 8 |", "|---|---|---|"]
    for name in sp["b1"]:
        lines.append(f"| {name} | {sp['b1'][name]['ms']:.1f} ms ({sp['b1'][name]['speedup']:.2f}x fp32's speed) | "
                     f"{sp['b8'][name]['ms']:.1f} ms ({sp['b8'][name]['speedup']:.2f}x) |")
    b8, export = sp["b8"], "7-bit + stem conv and classifier in fp32 (export)"
    older = "".join(f" At {o} (for runtimes before ONNX Runtime 1.17: each GELU written as its formula) fp32 runs at "
                    f"{b8[f'fp32, {o}']['speedup']:.2f}x and int8 at {b8[f'{export}, {o}']['speedup']:.2f}x the "
                    "speed of fp32 at opset 20 (batch 8)."
                    for o in [k.removeprefix("fp32, ") for k in b8 if k.startswith("fp32, opset")])
    return lines + ["", "The export uses 7-bit weights with the stem convolution and the classifier in fp32: no pair "
                    "of products can saturate, so the file computes the same integers on every x86 CPU (a test "
                    "compares its logits on the emulated CPU), and its accuracy is the one measured here. 7-bit "
                    "weights run on the same u8 x s8 kernels as 8-bit ones, so without VNNI they run as fast as the "
                    "8-bit int8 measured in the CPU section above; u8 x u8, the other remedy ONNX Runtime's "
                    f"documentation names, runs at {b8['u8 weights (u8 x u8)']['speedup']:.2f}x fp32's speed here "
                    f"(batch 8), the export's int8 at {b8[export]['speedup']:.2f}x." + older, ""]


def int8_real_cpu_section(r: dict) -> list[str]:
    """The same benchmark run on a real CPU without VNNI, each file scored natively and under the emulation of that
    CPU: whether qemu's EPYC-Milan computes what the real one does."""
    lines = ["### The same on a real CPU without VNNI", "",
             f"Machine: {_machine(r['machine'])}. Command: `python benchmarks/int8.py --name int8_no_vnni` on that "
             f"machine: every file scored on it and under `qemu-x86_64 -cpu {r['emulated_cpu']}`.", "",
             "| setting | worst change on this CPU | worst change emulated | each seed, this CPU / emulated |",
             "|---|---|---|---|"]
    same = total = 0
    for name, seeds in r["accuracy"].items():
        real = [v["here"] - v["fp32"] for v in seeds.values()]
        emul = [v["emulated"] - v["fp32"] for v in seeds.values()]
        same, total = same + sum(a == b for a, b in zip(real, emul)), total + len(real)
        each = ", ".join(f"{a:+.2f} / {b:+.2f}" for a, b in zip(real, emul))
        lines.append(f"| {name} | {min(real):+.2f} | {min(emul):+.2f} | {each} |")
    sp, export = r["speed"], "7-bit + stem conv and classifier in fp32 (export)"
    lines += ["", f"The emulation gives this CPU's accuracy in {same} of {total} cells.", "",
              f"Speed on this CPU: `{sp['model']}` at {sp['img_size']} px (medians of 3 interleaved rounds).", "",
              "| setting | batch 1 | batch 8 |", "|---|---|---|"]
    lines += [f"| {name} | {sp['b1'][name]['ms']:.1f} ms ({sp['b1'][name]['speedup']:.2f}x fp32's speed) | "
              f"{sp['b8'][name]['ms']:.1f} ms ({sp['b8'][name]['speedup']:.2f}x) |" for name in sp["b1"]]
    before = sp["b8"]["8-bit weights (before)"]["speedup"]
    return lines + ["", f"Without VNNI the export's int8 runs at {sp['b8'][export]['speedup']:.2f}x fp32's speed "
                    f"(batch 8), 8-bit weights at {before:.2f}x.", ""]


def trainer_section(r: dict) -> list[str]:
    """Our trainer against timm's train.py with the same model, flags and data."""
    s = r["setup"]
    lines = ["### Trainer: `nfnet-hub train` vs timm's `train.py` (`nfnet-hub timm-train`, our AGC)", "",
             f"{s['model']}, bf16, batch {s['batch']} at {s['size']} px, {s['workers']} loader workers, a synthetic "
             f"image folder ({s['classes']} classes x {s['per_class']}); epoch 2's average images per second, the "
             "two trainers taking turns. Command: `python benchmarks/trainer.py` (in `benchmarks/device.sh`).", "",
             "| trainer | images/s (median) | runs |", "|---|---|---|"]
    for name, label in (("ours", "nfnet-hub train"), ("timm_train_py", "timm's train.py")):
        x = r.get(name, {})
        runs = ", ".join(f"{v:.0f}" for v in x.get("runs", [x.get("img_s", 0)]))
        lines.append(f"| {label} | {x['img_s']:.0f} | {runs} |" if "img_s" in x else
                     f"| {label} | no number ({x.get('error') or x.get('skipped') or 'not run'}) | |")
    if "ours_vs_timm" in r:
        lines += ["", f"Ours runs at **{r['ours_vs_timm']:.2f}x** timm's train.py (medians; target: at least 1x)."]
    return lines + [""]


def serve_section(r: dict, heading: str = "## Serving: `nfnet-hub serve` vs OnnxClassifier") -> list[str]:
    """The server under bounded loopback load against the raw batched throughput of the same model."""
    lines = [heading, "", f"Machine: {_machine(r['machine'])}; device {r['device']}. Command: `python "
             f"benchmarks/serve.py` (server and load generator share the machine). Closed loop: C tritonclient "
             f"workers, one image per request; the server batches up to 32 within {r['max_delay_ms']:g} ms. "
             "'raw' is `OnnxClassifier.logits` on a batch of C in the same run. Goals: at C = 32 at least 0.8x "
             "the raw throughput; p99 under max-delay + 2x the raw batch time.", "",
             "| model | C | server req/s | raw img/s (batch C) | ratio | p50 ms | p99 ms | p99 bound ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        for c, x in m["levels"].items():
            lines.append(f"| {name} ({m['input']}) | {c} | {x['requests_per_s']:.1f} | {x['raw_images_per_s']:.1f} | "
                         f"**{x['ratio_to_raw']:.2f}x** | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                         f"{x['p99_bound_ms']:.1f}{'' if x['p99_within_bound'] else ' (missed)'} |")
    for name, m in r["models"].items():
        one = m["levels"]["1"]
        if not all(x["p99_within_bound"] for x in m["levels"].values()):
            trip = one["p50_ms"] - r["max_delay_ms"] - one["raw_batch_ms"]
            lines += ["", f"{name} misses the latency bound, which leaves no room for the HTTP round trip: at C = 1 "
                      f"a request took {trip:.2f} ms beyond the batching delay and the model's own time."]
        x = m["levels"]["32"]
        if x["ratio_to_raw"] < 0.8:
            cpu_ms = r["machine"]["cpus"] / x["requests_per_s"] * 1e3
            lines += ["", f"{name} misses the throughput goal: at most {cpu_ms:.2f} ms of CPU per request went to "
                      "HTTP, the protocol and the load generator, against "
                      f"{1e3 / x['raw_images_per_s']:.3f} ms for the model's own work per image: a model this small "
                      "is bound by the per-request cost, which batching does not share."]
    if "cold_start_s" in r:
        c = r["cold_start_s"]
        lines += ["", "Cold start, F0, seconds from starting the process to the first answer (median of 5, the two "
                  "interleaved): "
                  f"`nfnet-hub serve` {c['nfnet_hub_serve_f0']:.2f} s; a process opening ONNX Runtime on timm's own "
                  f"`dm_nfnet_f0` export (which folds weight standardisation as the session starts) and running "
                  f"it {c['ort_session_timm_dm_nfnet_f0']:.2f} s (**{c['ratio']:.2f}x**)."]
    return lines + [""]


def libraries_section(r: dict) -> list[str]:
    """KServe's model server against MLServer, the two Python Open Inference Protocol servers."""
    lines = ["### The serving library: KServe's model server vs MLServer", "",
             f"Machine: {_machine(r['machine'])}. Command: `python benchmarks/serving_libraries.py --mlserver ...`. "
             f"Requests: {r['requests']}, from tritonclient (JSON, since MLServer's REST API has no binary tensor "
             "extension); each server batches within 5 ms.", "",
             "| server | C | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, levels in r["servers"].items():
        for c, x in levels.items():
            lines.append(f"| {name} | {c} | {x['requests_per_s']:.1f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} |")
    servers = list(r["servers"].values())
    ratio = servers[1]["32"]["requests_per_s"] / servers[0]["32"]["requests_per_s"]
    return lines + ["", f"With JSON at C = 32, MLServer answers {ratio:.2f}x the requests KServe's server does. Only "
                    "KServe's speaks the binary extension, which tritonclient uses by default and which is much "
                    "cheaper than JSON (compare the table above); and it is what KServe deployments run.", ""]


def gpu_section(r: dict | None) -> list[str]:
    lines = ["## GPU", ""]
    if r is None:
        return lines + ["Not measured yet: no GPU was lent to the sessions so far. `benchmarks/device.sh` runs "
                        "every GPU measurement in one call of under 8 minutes on a bare GPU machine (fold fp32/bf16 "
                        "vs timm, AGC vs timm and as a share of a training step, ONNX Runtime CUDA: our fp32 vs "
                        "timm's export, fp16 and int8 vs fp32, achieved FLOP/s vs the measured matmul peak; "
                        "`benchmarks/gpu.py --smoke` runs every step on the CPU, in the tests); its results land "
                        "in `benchmarks/results/gpu.json` and here.", ""]
    peak = r["peak_tflops"]
    lines += [f"Machine: {_machine(r['machine'])}. Measured here: matmul {peak['float32']:.0f} TFLOP/s fp32 "
              f"(TF32 off), {peak['bfloat16']:.0f} TFLOP/s bf16.", "",
              "Command: `bash benchmarks/device.sh` (runs `benchmarks/gpu.py`). Every time is the median of "
              "repeated calls, each pair measured in the same run.", ""]
    serve = lambda x, _: serve_section(x, "### Serving on the GPU")  # noqa: E731
    for name, render in (("fold", _gpu_fold), ("agc", _gpu_agc), ("onnx", _gpu_onnx), ("serve", serve)):
        why = _failed(r.get(name))
        lines += [f"### {name}: no numbers ({why})", ""] if why else render(r[name], r["setup"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="store_true", help="run benchmarks/cpu.py first")
    args = p.parse_args()
    if args.run:
        subprocess.run([sys.executable, str(HERE / "cpu.py")], check=True)
    results = HERE / "results"
    cpu = json.loads((results / "cpu.json").read_text())
    gpu = json.loads((results / "gpu.json").read_text()) if (results / "gpu.json").is_file() else None
    int8 = json.loads((results / "int8.json").read_text()) if (results / "int8.json").is_file() else None
    no_vnni = results / "int8_no_vnni.json"
    no_vnni = json.loads(no_vnni.read_text()) if no_vnni.is_file() else None
    trainer = json.loads((results / "trainer.json").read_text()) if (results / "trainer.json").is_file() else None
    serve = json.loads((results / "serve.json").read_text()) if (results / "serve.json").is_file() else None
    libraries = results / "serving_libraries.json"
    libraries = json.loads(libraries.read_text()) if libraries.is_file() else None
    text = ["# Benchmarks", "",
            "Every number is a median, measured against the anchor (timm) in the same run. Regenerate with "
            "`python benchmarks/report.py --run`.", "", *cpu_section(cpu), *(int8_section(int8) if int8 else []),
            *(int8_real_cpu_section(no_vnni) if no_vnni else []),
            *(serve_section(serve) if serve else []), *(libraries_section(libraries) if libraries else []),
            *gpu_section(gpu), *(trainer_section(trainer) if trainer else [])]
    OUT.write_text("\n".join(text))
    _write_readme_table(readme_table(cpu, gpu, serve))
    print(f"wrote {OUT} and the table in {README.name}")


if __name__ == "__main__":
    main()
