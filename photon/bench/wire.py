"""`photon bench wire`: a large model through the real Flower path, on loopback: memory and transfer speed.

The `paper-350m` shape (1.4 GB of fp32 parameters) trains a token of work per round (H = 1, batch 1, short
sequences: the point is the wire, not the training) through
- the deployed runtime: a SuperLink and one warm SuperNode on 127.0.0.1 (insecure, loopback), the run submitted
  as `photon submit` does; the ServerApp's and the node runtime's peak resident memory (VmHWM, polled from
  /proc while they run) and the node's seconds to pull the task and push the reply (from its log);
- Flower's simulation runtime, in a fresh process: the whole server process's peak (SuperLink state, the
  ServerApp and Ray's driver share it) and the simulated node's (a Ray worker); payloads take the blob side
  channel there too (`launch.loopback_blobs`).
The blob server's own peak is reported in both (a process of its own; an upload's file pages while it is
received).
Against a baseline measured in the same invocation: a plain socket copy of the same bytes between two
processes on loopback, best of 3, compared with the best of the 3 transfers each way after the first (which
fills new pages). Goals: server ≤ 3× the model; node ≤ model + AdamW state + 1× the model (4×), judged with
the paper's step and again, in a second deployed run, with the node started as `photon node --lean` (each
parameter stepped in backward, so the gradients never all exist, and activation checkpointing); transfer ≥ 50%
of the plain socket's bandwidth.
Stored in docs/results/wire.json. The runs' checkpoints, blobs and node state (tens of GB) are deleted once the
numbers are stored; their logs stay.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from photon.bench.results import LoadSampler, publish
from photon.config import RunConfig, config_to_dict, with_overrides
from photon.model.transformer import count_params

MB = 2**20
SOCKET_REPEATS = 3  # plain socket copies per baseline; the best counts, as the best task does


def loopback_mb_s(nbytes: int, chunk: int = 4 * MB, keep: bool = False) -> float:
    """A plain TCP copy of `nbytes` from a child process to this one over 127.0.0.1, in MB/s: received into
    one reused `chunk` (the bytes are dropped; it stays in the CPU's cache), or with `keep` into a buffer of
    `nbytes` touched beforehand (the bytes are kept, as any receiver must, but no page is new)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        sender = subprocess.Popen([sys.executable, "-c", (
            "import socket,sys; n=int(sys.argv[2]); b=bytearray(4<<20); s=socket.create_connection(('127.0.0.1',"
            "int(sys.argv[1]))); left=n\nwhile left>0:\n k=min(left,len(b)); s.sendall(memoryview(b)[:k]); left-=k\n"
            "s.close()"), str(port), str(nbytes)])
        buf = memoryview(bytearray(nbytes if keep else chunk))
        conn, _ = server.accept()
        got, start = 0, time.perf_counter()
        with conn:
            while got < nbytes:
                n = conn.recv_into(buf[got:got + chunk] if keep else buf)
                if not n:
                    break
                got += n
        seconds = time.perf_counter() - start
        sender.wait()
    return got / MB / seconds


def runtime_mb() -> float:
    """Peak RSS of a process that has only imported what a node runs (Python, torch, Flower, photon): the
    floor under any node's peak, whatever the model."""
    code = ("import re, torch, flwr, photon.transport.client_app, photon.federation.worker; "
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


class PeakWatcher:
    """Polls /proc for processes whose command line matches each pattern; keeps each one's peak VmHWM (MB)."""

    def __init__(self, patterns: dict[str, str], every_s: float = 0.2):
        self.patterns, self.every_s = patterns, every_s
        self.peaks: dict[str, float] = {k: 0.0 for k in patterns}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmd:
                        continue
                    for name, pattern in self.patterns.items():
                        if pattern in cmd:
                            hwm = re.search(r"VmHWM:\s+(\d+) kB", (proc / "status").read_text())
                            if hwm:
                                self.peaks[name] = max(self.peaks[name], int(hwm.group(1)) / 1024)
                except OSError:
                    continue
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wire_config(cfg: RunConfig) -> RunConfig:
    return with_overrides(cfg, [
        "train.seq_len=64", "train.batch_size=1", "train.micro_batch_size=null", "train.eval_batches=1",
        "train.warmup_steps=1", "train.activation_checkpointing=false", "federation.local_steps=1",
        # 4 rounds: the first transfer of each direction fills new pages; the best of the 3 after it is
        # compared with the best of 3 plain socket copies
        "federation.rounds=4", "federation.clients_per_round=1", "data.partition.num_clients=1",
        "federation.num_nodes=1", "federation.eval_every=4", "federation.procs_per_node=1",
        # the model and its update on the wire, not the client's kept AdamW state (2 more models, which
        # `state_backup` would upload every round): the node keeps it, as a single-node client needs no backup
        "federation.state_backup=false"])


def deployed(cfg: RunConfig, out: Path, console: Console, lean: bool = False) -> dict[str, Any]:
    from photon.launch import processes, submit, superlink, supernode
    from photon.launch.certs import read_token

    out = Path(out).resolve()
    cfg = with_overrides(cfg, [f"data.prep_dir={Path(cfg.data.prep_dir).resolve()}"])
    address = f"127.0.0.1:{processes.free_port()}"
    procs = []
    with PeakWatcher({"server": "flwr-serverapp", "node": "clientapp-runtime", "superlink": "superlink",
                      "blob server": "photon.transport.blobs"}) as w:
        try:
            procs.append(superlink.start_superlink(int(address.rsplit(":", 1)[1]), out / "server", insecure=True,
                                                   log_file=out / "superlink.log"))
            procs.append(supernode.start_supernode(address, processes.free_port(), out / "node", data=cfg.data.prep_dir,
                                                   insecure=True, log_file=out / "node.log", warm=True, lean=lean))
            home = out / "submit"
            submit.write_connection(home, address, insecure=True,
                                    token=read_token(superlink.operator_token_file(out / "server", None)))
            run_id = submit.submit_run(home, cfg, "wire")
            console.print(f"deployed: run {run_id} on {address}")
            status = submit.wait_run(home, run_id, poll_s=1.0, timeout_s=3600)
        finally:
            for p in reversed(procs):
                processes.stop(p)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"the deployed wire run ended {status['status']}; see {out}")
    text = (out / "node.log").read_text(errors="replace")
    timings = [tuple(map(float, m)) for m in re.findall(r"pulled in ([\d.]+) s, ran in ([\d.]+) s, pushed in ([\d.]+) s",
                                                        text)]
    fetched = [float(s) for s in re.findall(r"fetched \w+ blob: [\d.]+ MB in ([\d.]+) s", text)]
    uploaded = [float(s) for s in re.findall(r"uploaded reply blob: [\d.]+ MB in ([\d.]+) s", text)]
    return {"peaks_mb": w.peaks, "tasks": [{"pull_s": a, "run_s": b, "push_s": c} for a, b, c in timings],
            "blob_fetch_s": fetched, "blob_upload_s": uploaded}


def simulated(cfg: RunConfig, out: Path, console: Console) -> dict[str, Any]:
    """Flower's simulation in a fresh process (so its peak is this run's alone)."""
    code = ("import json,sys,resource; from pathlib import Path; from photon.config import build_config; "
            "from photon.launch.simulation import run_simulated; "
            "run_simulated(build_config(json.loads(sys.argv[1])), Path(sys.argv[2])); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    with PeakWatcher({"node": "ray::", "driver": "photon.launch.simulation",
                      "blob server": "photon.transport.blobs"}) as w:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(config_to_dict(cfg)), str(out / "run")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the simulated wire run failed: {proc.stderr[-2000:]}")
    peak = float(re.findall(r"PEAK ([\d.]+)", proc.stdout)[-1])
    return {"peaks_mb": {"server": peak, "node": w.peaks["node"], "blob server": w.peaks["blob server"]}}


def run_wire_bench(cfg: RunConfig, out: Path, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    cfg = wire_config(cfg)
    model_mb = count_params(cfg.model) * 4 / MB
    started = time.time()
    with LoadSampler() as load:
        socket_runs = [loopback_mb_s(int(model_mb * MB)) for _ in range(SOCKET_REPEATS)]
        console.print(f"plain socket on loopback: {', '.join(f'{r:,.0f}' for r in socket_runs)} MB/s")
        kept_runs = [loopback_mb_s(int(model_mb * MB), keep=True) for _ in range(SOCKET_REPEATS)]
        console.print(f"plain socket on loopback, bytes kept: {', '.join(f'{r:,.0f}' for r in kept_runs)} MB/s")
        floor_mb = runtime_mb()
        dep = deployed(cfg, out / "deployed", console)
        sim = simulated(cfg, out / "simulated", console)
        lean = deployed(cfg, out / "deployed-lean", console, lean=True)
    data = {"preset": cfg.name, "model_mb": model_mb, "socket_mb_s": max(socket_runs), "socket_runs_mb_s": socket_runs,
            "socket_kept_mb_s": max(kept_runs), "socket_kept_runs_mb_s": kept_runs, "runtime_mb": floor_mb,
            "deployed": dep, "simulated": sim,
            "deployed_lean": {"node": "photon node --lean", "peaks_mb": lean["peaks_mb"], "tasks": lean["tasks"]}}
    publish("wire", data, render, load, started, console)
    freed = drop_large_files(out)
    console.print(f"removed {freed / 2**30:.1f} GB of checkpoints, blobs and node state under {out} (logs kept)")
    return data


def drop_large_files(root: Path, min_bytes: int = 16 * MB) -> int:
    """Delete the files of at least `min_bytes` under `root` (checkpoints, model blobs, a node's parked model
    and kept state: tens of GB at this shape, of no use once the numbers are stored); logs stay. Bytes freed."""
    freed = 0
    for f in Path(root).rglob("*"):
        try:
            if f.is_file() and not f.is_symlink() and (size := f.stat().st_size) >= min_bytes:
                f.unlink()
                freed += size
        except OSError:
            continue
    return freed


def _after_first(xs: list) -> list:
    """The rounds after the first, which fills new pages (a fresh process, a fresh upload file); all of them
    when there is only one."""
    return xs[1:] or xs


def render(data: dict[str, Any]) -> str:
    m = data["model_mb"]
    dep, sim = data["deployed"], data["simulated"]
    later = _after_first(dep["tasks"])
    if dep.get("blob_fetch_s") and dep.get("blob_upload_s"):  # the side channel moved the payloads
        pull, push = (min(_after_first(dep[k])) for k in ("blob_fetch_s", "blob_upload_s"))
        how = "blob side channel"
    else:
        pull, push, how = min(t["pull_s"] for t in later), min(t["push_s"] for t in later), "Flower messages"
    rate = m / max(pull, push)
    lines = [f"Preset `{data['preset']}` shape: {m:,.0f} MB of fp32 parameters, one local step per round (the wire "
             f"is measured, not training). A plain socket copy of the same bytes between two processes on "
             f"loopback: {data['socket_mb_s']:,.0f} MB/s"
             + (f" (best of {len(data['socket_runs_mb_s'])})" if "socket_runs_mb_s" in data else "") + ".", "",
             "| runtime | process | peak RSS | × the model |", "|---|---|---|---|"]
    runs = [("deployed", dep["peaks_mb"]), ("simulation", sim["peaks_mb"])]
    if lean := data.get("deployed_lean"):
        runs.append(("deployed, lean node", {"node": lean["peaks_mb"]["node"]}))
    for runtime, peaks in runs:
        for proc, mb in peaks.items():
            lines.append(f"| {runtime} | {proc} | {mb:,.0f} MB | {mb / m:.2f}× |")
    lines += ["", f"Deployed transfer ({how}, best task): model down {pull:.2f} s ({m / pull:,.0f} MB/s), update up "
              f"{push:.2f} s ({m / push:,.0f} MB/s). Flower's own message path for the same task (pull / push of "
              f"the message carrying the references, best after the first): "
              f"{min(t['pull_s'] for t in later):.2f} s / {min(t['push_s'] for t in later):.2f} s.", "",
              f"- Goal: server ≤ 3× the model: deployed ServerApp {dep['peaks_mb']['server'] / m:.2f}×, "
              f"{'met' if dep['peaks_mb']['server'] <= 3 * m else 'NOT met'} (simulation: one process holds the "
              f"SuperLink's state too, {sim['peaks_mb']['server'] / m:.2f}×).",
              f"- Goal: node ≤ model + AdamW state + 1× model (4×): deployed {dep['peaks_mb']['node'] / m:.2f}×, "
              f"{'met' if dep['peaks_mb']['node'] <= 4 * m else 'NOT met'}" + (
                  f" (a process that has only imported what a node runs holds {data['runtime_mb']:,.0f} MB, "
                  f"{data['runtime_mb'] / m:.2f}× of it, whatever the model: "
                  f"{(dep['peaks_mb']['node'] - data['runtime_mb']) / m:.2f}× above that)."
                  if "runtime_mb" in data else ".") + (
                  f" With the node started as `{lean['node']}` (step in backward, activation checkpointing; a "
                  f"second deployed run, the rest equal): {lean['peaks_mb']['node'] / m:.2f}×, "
                  f"{'met' if lean['peaks_mb']['node'] <= 4 * m else 'NOT met'}; a task ran in "
                  f"{min(t['run_s'] for t in _after_first(lean['tasks'])):.1f} s at best there against "
                  f"{min(t['run_s'] for t in later):.1f} s (clipping needs a norm pass first)." if lean else ""),
              f"- Goal: transfer ≥ 50% of the plain socket: {rate / data['socket_mb_s']:.1%} of it, "
              f"{'met' if rate >= 0.5 * data['socket_mb_s'] else 'NOT met'}" + (
                  f" (the same socket copy into a buffer of the model's size, touched beforehand, so the bytes "
                  f"are kept as a receiver must: {data['socket_kept_mb_s']:,.0f} MB/s; the transfer is "
                  f"{rate / data['socket_kept_mb_s']:.1%} of that)." if "socket_kept_mb_s" in data else ".")]
    return "\n".join(lines)
