"""The clusters bench/disagg_ttft.py measures: a demo-shaped model folder, one `pdserve up` process
with its config file, readiness, and the CPU seconds its worker processes use (from /proc)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve.config import CATALOG  # noqa: E402
from pdserve.model.tokenizer import DEMO_TOKENIZER_DIR  # noqa: E402

# This tree's pdserve, run by the interpreter running the bench (a venv's entry point may be elsewhere).
PDSERVE = [sys.executable, "-m", "pdserve.cli"]
# Every cluster: an 8k prompt on a loaded machine may take minutes; a retry (first-token timeout) or
# an expired decode reservation (30 s by default) would spoil the pair. Neither changes an idle TTFT.
BASE_YAML = "router:\n  first_token_timeout_s: 600\ndecode:\n  reservation_timeout_s: 600\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(folder: Path, context: int) -> None:
    """The demo shape with `context` positions, random weights, as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = CATALOG["demo"]
    cfg = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                      num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, vocab_size=s.vocab_size,
                      max_position_embeddings=context, rope_theta=s.rope_theta, rms_norm_eps=s.rms_norm_eps,
                      tie_word_embeddings=s.tie_word_embeddings, bos_token_id=s.bos_token_id,
                      eos_token_id=s.eos_token_ids[0], torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for f in DEMO_TOKENIZER_DIR.iterdir():
        shutil.copy(f, folder / f.name)


class Cluster:
    def __init__(self, name: str, model: str, args: list[str], yaml_text: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        yaml_text = BASE_YAML + (yaml_text or "")
        self.cfg_path = None
        if yaml_text:
            fd, self.cfg_path = tempfile.mkstemp(suffix=".yaml", prefix=f"pdserve-{name}-")
            os.write(fd, yaml_text.encode())
            os.close(fd)
            args = ["--config", self.cfg_path, *args]
        self.model = model
        self.cmd = [*PDSERVE, "up", "--model", model, *args, "--port", str(self.port), "--threads", "1"]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def display_cmd(self) -> str:
        cmd = " ".join(self.cmd[3:]).replace(str(self.port), "PORT").replace(self.model, "MODEL")
        if self.cfg_path:
            cmd = cmd.replace(self.cfg_path, "CFG.yaml")
        return "pdserve " + cmd

    def start(self, timeout: float = 300.0) -> None:
        log(f"starting {self.name}: {self.display_cmd()}")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if "serving" in line and "/v1" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited rc={self.proc.returncode}:\n" + "\n".join(self.lines[-30:]))
            if ready.is_set():
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        log(f"{self.name} ready on :{self.port} in {time.perf_counter() - t0:.1f}s")
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n" + "\n".join(self.lines[-30:]))

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the cluster's worker processes (not the router's), from /proc."""
        if self.proc is None:
            return 0.0
        tck = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in _children(self.proc.pid):
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_text()
            except OSError:
                continue
            if "serve" in cmd.split("\0"):  # a worker (`pdserve serve --role ...`)
                total += (int(f[11]) + int(f[12])) / tck
        return total

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit 30s after SIGTERM; killing pid {self.proc.pid}")
                self.proc.kill()
                self.proc.wait()
            log(f"stopped {self.name} (rc={self.proc.returncode})")
        if self.cfg_path:
            try:
                os.unlink(self.cfg_path)
            except OSError:
                pass


def _children(pid: int) -> list[int]:
    """`pid` and its descendants."""
    parent: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                parent[int(p)] = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo += [c for c, pp in parent.items() if pp == q]
    return out
