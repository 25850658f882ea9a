"""`photon bench trainer`: how fast the local trainer is, against a bare PyTorch loop and the machine's peak.

For each setting (fp32 and bf16 autocast; `torch.compile` off and on) both arms train the same freshly
initialised model on the same in-memory tokens with the same batch, LR and thread count, on the same device;
the arms alternate (bare first, then photon first, and so on) so machine noise hits both, and the best of
each is kept. Reported per setting: tokens/s of each arm, their ratio (goal ≥ 0.97: the trainer's
bookkeeping must be free), the median over repeats of the ratio of the two runs of one repeat (adjacent in
time, so less exposed to the machine's drift than the two bests), and model FLOP/s
(6 × matmul parameters + attention, per token) over the machine's peak in the same dtype, measured in the
same run before and after the settings (the highest matmul rate seen: large square ones, and the model's own
shapes; goal ≥ 0.6 of the bf16 peak for the `small` preset), and, on a GPU, over the device's datasheet bf16
peak (MFU). Beside the peak, the ceiling the model's own shapes allow: the FLOP/s of a loop
that did nothing but the matmuls of its Linear layers (forward and both backward products, at the bench's
batch), each timed alone. Stored in docs/results/trainer-<device>.json.
"""

from __future__ import annotations

import json
import re
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from photon.bench.results import LoadSampler, chosen_results_dir, save_result
from photon.config import RunConfig, with_overrides
from photon.data.shards import TokenStream
from photon.model.flops import flops_per_token
from photon.model.transformer import Transformer
from photon.train.device import autocast, place, resolve_device, setup_backend
from photon.train.local import adamw_kernel, make_optimizer, train_local

# How `flops_per_token` counts, said beside the numbers (MFU depends on it): attention is not halved for the
# causal mask, as in PaLM's and nanoGPT's accounting; a causal-aware count gives lower MFU
FLOP_COUNT = ("; PaLM's count: 6 × the parameters of every matmul + 12 × layers × d_model × seq_len for "
              "attention, not halved for the causal mask")
# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for MFU on known GPUs.
DATASHEET_BF16 = {"H100 SXM": 989.4e12, "H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200": 989.4e12,
                  "A100": 312e12, "L40S": 362.05e12, "L40": 181.05e12, "A10": 125e12, "L4": 121e12,
                  "RTX 4090": 165.2e12}
# How `torch.cuda.get_device_name()` names them, tried in this order, each a whole word or words: an H100 SXM
# calls itself "NVIDIA H100 80GB HBM3", so a bare "H100" is the SXM part once PCIe and NVL are ruled out.
_DEVICE_NAMES = (("H100 PCIe", "H100 PCIe"), ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"), ("H200", "H200"),
                 ("A100", "A100"), ("L40S", "L40S"), ("L40", "L40"), ("A10", "A10"), ("L4", "L4"),
                 ("RTX 4090", "RTX 4090"))


def datasheet_bf16(device_name: str | None) -> float | None:
    """The datasheet's dense bf16 peak of the GPU `torch.cuda.get_device_name()` calls `device_name`; None for
    a device not in DATASHEET_BF16 (or no GPU)."""
    for pattern, part in _DEVICE_NAMES:
        if device_name and re.search(rf"(?<!\w){re.escape(pattern)}(?!\w)", device_name, re.IGNORECASE):
            return DATASHEET_BF16[part]
    return None


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Best FLOP/s of square matmuls of a few sizes (the machine's practical peak in this dtype), after a
    second of warm-up: here the first bf16 matmuls of a process ran at half the speed of later ones."""
    sizes = (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192)
    best = 0.0
    for warm_up in (True, False):
        for n in sizes:
            budget = (min(1.0, seconds / 3) if warm_up else seconds) / len(sizes)
            per_product = _seconds_per_matmul(n, n, n, dtype, device, budget, min_reps=2)
            if not warm_up:
                best = max(best, 2 * n**3 / per_product)
    return best


def _seconds_per_matmul(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, budget_s: float,
                        min_reps: int) -> float:
    """Seconds one [m, k] @ [k, n] product takes, repeated for `budget_s` (and at least `min_reps` times)
    after one untimed product."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or reps < min_reps:
        a @ b
        reps += 1
    _sync(device)
    return (time.perf_counter() - start) / reps


def linear_matmuls(cfg: RunConfig) -> dict[tuple[int, int, int], int]:
    """How many times a training step multiplies [m, k] by [k, n], per (m, k, n), in the model's Linear layers
    (forward x·Wᵀ, backward dy·W and dyᵀ·x) at the config's batch."""
    tokens = cfg.train.batch_size * cfg.train.seq_len
    counts: dict[tuple[int, int, int], int] = {}
    for module in Transformer(cfg.model).modules():
        if isinstance(module, torch.nn.Linear):
            i, o = module.in_features, module.out_features
            for shape in ((tokens, i, o), (tokens, o, i), (o, tokens, i)):
                counts[shape] = counts.get(shape, 0) + 1
    return counts


def shape_ceiling(cfg: RunConfig, device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """FLOP/s of the model's Linear matmuls at this batch, each shape timed alone (forward x·Wᵀ, and backward
    dy·W and dyᵀ·x): what a training loop with no other work could reach on these shapes. Attention's own
    products are left out."""
    counts = linear_matmuls(cfg)
    flops = elapsed = 0.0
    for (m, k, n), count in counts.items():
        flops += 2 * m * k * n * count
        elapsed += _seconds_per_matmul(m, k, n, dtype, device, seconds / len(counts), min_reps=3) * count
    return flops / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_loop(model: torch.nn.Module, tokens: torch.Tensor, cfg: RunConfig, steps: int,
               device: torch.device) -> float:
    """The plainest correct loop: slice, forward, backward, clip, AdamW step."""
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay, **adamw_kernel(device))  # the same kernel as ours
    n = t.batch_size * t.seq_len
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        off = (i * n) % (tokens.numel() - n - 1)
        x = tokens[off:off + n].view(t.batch_size, t.seq_len).to(device, non_blocking=True)
        y = tokens[off + 1:off + n + 1].view(t.batch_size, t.seq_len).to(device, non_blocking=True)
        with autocast(device, t.bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    _sync(device)
    return steps * n / (time.perf_counter() - start)


def _photon_loop(model: torch.nn.Module, raw: torch.nn.Module, stream: TokenStream, cfg: RunConfig,
                 steps: int, device: torch.device) -> float:
    opt = make_optimizer(raw, cfg.train)
    _sync(device)
    result = train_local(model, opt, stream, 0, 0, steps, cfg.train, cfg.train.steps)
    _sync(device)
    return result.tokens / result.seconds


def measure_setting(cfg: RunConfig, device: torch.device, steps: int, repeats: int, warmup: int,
                    console: Console) -> dict[str, float]:
    t = cfg.train
    rng = np.random.default_rng(0)
    n_tok = (steps + warmup + 1) * t.batch_size * (t.seq_len + 1) * 2
    array = rng.integers(0, cfg.model.vocab_size, n_tok, dtype=np.int64)
    tokens = torch.from_numpy(array)
    stream = TokenStream([array.astype(np.uint16 if cfg.model.vocab_size <= 65536 else np.uint32)],
                         t.seq_len, t.batch_size, seed=0)
    best = {"photon": 0.0, "bare": 0.0}
    pairs = []
    for rep in range(repeats):
        this = {}
        for arm in ("bare", "photon") if rep % 2 == 0 else ("photon", "bare"):  # ABBA: a drift hits both
            torch.manual_seed(0)
            raw = Transformer(cfg.model)
            model = place(raw, t, device)  # the same placement (and compile) for both arms
            if arm == "bare":
                _bare_loop(model, tokens, cfg, warmup, device)
                tps = _bare_loop(model, tokens, cfg, steps, device)
            else:
                _photon_loop(model, raw, stream, cfg, warmup, device)
                tps = _photon_loop(model, raw, stream, cfg, steps, device)
            best[arm], this[arm] = max(best[arm], tps), tps
            console.print(f"  repeat {rep + 1}/{repeats} {arm:7s} {tps:10.0f} tok/s")
            del model, raw
        pairs.append(this["photon"] / this["bare"])
    return {"bare_tok_s": best["bare"], "photon_tok_s": best["photon"], "ratio": best["photon"] / best["bare"],
            "paired_ratio": float(np.median(pairs))}


def _peaks_and_ceilings(cfg: RunConfig, device: torch.device, console: Console,
                        seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {k: matmul_peak(device, dt, seconds) for k, dt in dtypes.items()}
    ceilings = {k: shape_ceiling(cfg, device, dt, seconds) for k, dt in dtypes.items()}
    console.print(f"{device}: matmul peak fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} "
                  f"GFLOP/s; the model's matmul shapes alone: fp32 {ceilings['fp32'] / 1e9:.1f} GFLOP/s, "
                  f"bf16 {ceilings['bf16'] / 1e9:.1f} GFLOP/s")
    return peaks, ceilings


def run_trainer_bench(cfg: RunConfig, steps: int = 20, repeats: int = 5, warmup: int = 3,
                      settings: tuple[str, ...] = ("fp32", "bf16", "fp32+compile", "bf16+compile"),
                      console: Console | None = None, save: bool = True,
                      calibrate_s: float = 3.0) -> dict[str, Any]:
    """`calibrate_s`: seconds for each measurement of a peak or a shape ceiling (tests pass less). The result is
    stored after each setting (a GPU's time is scarce: a later setting that fails or runs out of time keeps the
    earlier ones; a finished run's record there is only replaced by another finished one), then once more with
    the peaks measured again at the end. A setting that fails is recorded with its error and the others still
    run; the call then raises, after storing."""
    console = console or Console()
    device = resolve_device(cfg.train.device)
    setup_backend(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    started = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    data: dict[str, Any] = {
        "preset": cfg.name, "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
        "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32, "batch": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len, "params": sum(p.numel() for p in Transformer(cfg.model).parameters()),
        "flops_per_token": flops_per_token(cfg), "datasheet_bf16": datasheet_bf16(name), "steps": steps,
        "repeats": repeats, "rows": {}, "failed": {}, "settings": list(settings)}

    def rate(peaks: dict[str, float]) -> None:
        for setting, row in data["rows"].items():
            row["of_peak"] = row["model_flops"] / peaks[setting.partition("+")[0]]
            row["of_bf16_peak"] = row["model_flops"] / peaks["bf16"]
        data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def store(final: bool = True) -> Path | None:
        record = f"trainer-{device.type}"
        if not save or (not final and _complete_record(chosen_results_dir() / f"{record}.json")):
            return None  # mid-run, a finished run's record stays until this one has finished too
        return save_result(record, data, load, started=started)

    with LoadSampler() as load:
        peaks, ceilings = _peaks_and_ceilings(cfg, device, console, calibrate_s)
        data.update(peaks=peaks, shape_ceilings=ceilings)
        for setting in settings:
            dtype, _, comp = setting.partition("+")
            scfg = with_overrides(cfg, [f"train.bf16={dtype == 'bf16'}", f"train.compile={bool(comp)}"])
            console.print(f"[bold]{setting}[/]")
            try:
                row = measure_setting(scfg, device, steps, repeats, warmup, console)
            except Exception as e:  # noqa: BLE001 -- recorded, and raised once the rest is measured and stored
                console.print_exception()
                data["failed"][setting] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                release_cuda_memory(device)
                continue
            row["model_flops"] = row["photon_tok_s"] * data["flops_per_token"]
            data["rows"][setting] = row
            rate(peaks)
            store(final=False)  # so far: the peaks measured before the settings
        # measured again after the settings (here the same bf16 matmul ran at rates 2× apart within minutes):
        # the best of each, and the peak is the highest matmul rate seen in the run, the model's own shapes'
        # included, so no ratio below is against a peak measured in a slow moment
        again = _peaks_and_ceilings(cfg, device, console, calibrate_s)
        ceilings = {k: max(v, again[1][k]) for k, v in ceilings.items()}
        peaks = {k: max(v, again[0][k], ceilings[k]) for k, v in peaks.items()}
        data.update(peaks=peaks, shape_ceilings=ceilings, complete=True)
        rate(peaks)
    path = store()
    console.print(render(data))
    if path is not None:
        console.print(f"stored in {path}")
    if data["failed"]:
        raise RuntimeError("bench trainer: " + "; ".join(f"{k} failed ({v})" for k, v in data["failed"].items()))
    return data


def _complete_record(path: Path) -> bool:
    """Whether `path` holds the record of a trainer benchmark that ran to its end (older records all did)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
        return "settings" not in data or bool(data.get("complete"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def release_cuda_memory(device: torch.device) -> None:
    """After a failed setting (out of memory, say): what it left on the GPU, back to the allocator's pool."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def render(data: dict[str, Any]) -> str:
    dev = data["device_name"] or f"{data['device']}, {data['threads']} threads"
    fp32 = "fp32 (TF32 matmuls)" if data.get("tf32") else "fp32"
    lines = [f"Preset `{data['preset']}` ({data['params'] / 1e6:.2f}M parameters, {data['flops_per_token'] / 1e6:.1f} "
             f"MFLOP per token{FLOP_COUNT}), batch "
             f"{data['batch']}×{data['seq_len']}, {dev}. Matmul peak measured in the same run: "
             f"{fp32} {data['peaks']['fp32'] / 1e9:,.1f} GFLOP/s, bf16 {data['peaks']['bf16'] / 1e9:,.1f} GFLOP/s. "
             f"Best of {data['repeats']} alternating repeats of {data['steps']} steps per arm." + (
                 f" The model's own matmul shapes, each timed alone (its Linear layers' forward and backward "
                 f"products at this batch), reach fp32 {data['shape_ceilings']['fp32'] / 1e9:,.1f} GFLOP/s "
                 f"({data['shape_ceilings']['fp32'] / data['peaks']['fp32']:.0%} of that peak) and bf16 "
                 f"{data['shape_ceilings']['bf16'] / 1e9:,.1f} GFLOP/s "
                 f"({data['shape_ceilings']['bf16'] / data['peaks']['bf16']:.0%}): what a loop doing nothing else "
                 f"could reach. Each is the best of a measurement before and one after the settings (the same "
                 f"bf16 matmul ran at rates up to 2× apart within minutes on this machine)." if "shape_ceilings" in data
                 else "")]
    if "settings" in data and not data.get("complete"):  # stored mid-run, and the run never finished
        left = [k for k in data["settings"] if k not in data["rows"] and k not in data["failed"]]
        lines += ["", f"**Incomplete run**: it stopped before {', '.join(left) or 'the peaks were measured again'}; "
                  "the peaks are those measured before the settings."]
    for setting, error in data.get("failed", {}).items():
        lines += ["", f"**{setting} failed**: {error}"]
    if not data["rows"]:
        return "\n".join(lines).rstrip()
    lines += ["",
             "| setting | bare loop tok/s | photon tok/s | photon / bare | model FLOP/s | of this dtype's peak | "
             "of the bf16 peak |" + (" MFU (datasheet bf16) |" if data["datasheet_bf16"] else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if data["datasheet_bf16"] else "")]
    for setting, r in data["rows"].items():
        mfu = f" {r['model_flops'] / data['datasheet_bf16']:.1%} |" if data["datasheet_bf16"] else ""
        lines.append(f"| {setting} | {r['bare_tok_s']:,.0f} | {r['photon_tok_s']:,.0f} | {r['ratio']:.3f} | "
                     f"{r['model_flops'] / 1e9:,.1f} G | {r['of_peak']:.1%} | {r['of_bf16_peak']:.1%} |{mfu}")
    best = max(data["rows"].values(), key=lambda r: r["of_bf16_peak"])
    worst_ratio = min(r["ratio"] for r in data["rows"].values())
    paired = [r["paired_ratio"] for r in data["rows"].values() if "paired_ratio" in r]
    lines += ["", f"- Goal: ≥ 0.97 × the bare loop at equal settings: worst {worst_ratio:.3f}, "
              f"{'met' if worst_ratio >= 0.97 else 'NOT met'}" + (
                  f" (per setting, the median ratio within a repeat: "
                  + ", ".join(f"{k} {r['paired_ratio']:.3f}" for k, r in data["rows"].items()) + ")."
                  if len(paired) == len(data["rows"]) else "."),
              f"- Goal: ≥ 0.6 of the measured bf16 peak: best {best['of_bf16_peak']:.2f}, "
              f"{'met' if best['of_bf16_peak'] >= 0.6 else 'NOT met'}" + (
                  f" (this model's matmul shapes alone reach "
                  f"{data['shape_ceilings']['bf16'] / data['peaks']['bf16']:.2f} of it)."
                  if "shape_ceilings" in data else ".")]
    if data["datasheet_bf16"]:
        mfu = max(r["model_flops"] for r in data["rows"].values()) / data["datasheet_bf16"]
        lines.append(f"- Goal (GPU): ≥ 40% MFU against the datasheet bf16 peak: best {mfu:.1%}, "
                     f"{'met' if mfu >= 0.4 else 'NOT met'}.")
    return "\n".join(lines)

