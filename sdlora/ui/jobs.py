"""Training jobs started from the page: `python -m sdlora train ...` as a child process, watched through its files.

The job runs exactly what the command line runs, so the page holds no training logic; Stop sends SIGINT, which is
Ctrl-C (a resumable checkpoint). Progress comes from the output folder: `progress.json` when the trainer writes one,
else the `train_log.jsonl` lines and the step count the job was started with. Job state lives in this process,
keyed by job id, so a reloaded page or a second tab re-attaches to it. One job at a time uses the device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError
from sdlora.ui.paths import IMAGE_SUFFIXES, relative


@dataclass
class Job:
    id: str
    name: str
    output: Path
    command: list[str]
    total: int | None
    log_path: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"  # running, stopping, done, stopped, failed
    records: list[dict] = field(default_factory=list)
    _log_offset: int = 0
    _first: tuple[float, int] | None = None  # (time, step) when a step was first seen: the ETA's clock


class Jobs:
    """The page's training jobs; `busy()` says which one holds the device."""

    def __init__(self, root: Path, state_dir: Path):
        self.root = root
        self.state_dir = state_dir
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._count = 0

    def busy(self) -> Job | None:
        with self._lock:
            return self._busy()

    def _busy(self) -> Job | None:
        for job in self.jobs.values():
            self._poll(job)
            if job.status in ("running", "stopping"):
                return job
        return None

    def start(self, name: str, output: Path, args: list[str], total: int | None) -> Job:
        """Run `sdlora train` with `args`; refused while another job runs (one job uses the device at a time)."""
        with self._lock:  # checked and started under one lock: two clicks cannot start two jobs
            running = self._busy()
            if running:
                raise SdloraError(f"'{running.name}' is training ({self._step_text(running)}): one job uses the "
                                  "device at a time; wait for it to finish or stop it")
            self._count += 1
            job_id = f"job{self._count}"
            self.state_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.state_dir / f"{job_id}-{name}.log"
            command = [sys.executable, "-m", "sdlora", "train", *args]
            env = {k: v for k, v in os.environ.items() if not k.startswith("SDLORA_UI_")}  # the token stays here
            # SDLORA_STOP_ON_SIGINT (sdlora/cli/train.py): Stop works even when this server ignores SIGINT (`sdlora ui &`)
            env |= {"PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", "SDLORA_STOP_ON_SIGINT": "1"}
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.root, env=env, start_new_session=True)
            job = Job(job_id, name, output, command, total, log_path, proc)
            self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise SdloraError(f"no job '{job_id}' (the server may have restarted; finished runs are in the library)")
        return job

    def stop(self, job_id: str) -> Job:
        """SIGINT, as Ctrl-C: the trainer writes a checkpoint and exits; `sdlora train --resume` continues it."""
        job = self.get(job_id)
        with self._lock:
            self._poll(job)
            if job.status == "running":
                job.proc.send_signal(signal.SIGINT)
                job.status = "stopping"
        return job

    def shutdown(self, wait_s: float = 60.0) -> None:
        """On server exit: interrupt a running job (it checkpoints), then wait for it."""
        for job in list(self.jobs.values()):
            if job.proc.poll() is None:
                job.proc.send_signal(signal.SIGINT)
                try:
                    job.proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    job.proc.kill()

    def _poll(self, job: Job) -> None:
        if job.finished is not None:
            return
        rc = job.proc.poll()
        if rc is None:
            return
        job.finished = time.time()
        job.status = "done" if rc == 0 else "stopped" if rc == 130 else "failed"

    def state(self, job_id: str) -> dict:
        """What the page shows: status, progress with time left, losses, samples, the error line if it failed."""
        job = self.get(job_id)
        with self._lock:
            self._poll(job)
            self._read_log(job)
        progress = _read_json(job.output / "progress.json") if _fresh(job.output / "progress.json", job) else None
        step = int(progress.get("step") or 0) if progress else max((r["step"] for r in job.records), default=0)
        total = int(progress["total"]) if progress and progress.get("total") else job.total
        if job.status == "done" and total:
            step = total
        now = job.finished or time.time()
        eta = progress.get("eta_s") if progress else None
        if eta is None and total and step:
            if job._first is None:
                job._first = (time.time(), step)
            t0, s0 = job._first
            eta = (now - t0) / (step - s0) * (total - step) if step > s0 else None
        samples = sorted(p for p in (job.output / "samples").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (job.output / "samples").is_dir() else []
        adapter = job.output / f"{job.name}.safetensors"
        checkpoints = sorted((job.output / "checkpoints").glob("step-*")) if (job.output / "checkpoints").is_dir() else []
        return {
            "id": job.id, "name": job.name, "status": job.status, "step": step, "total": total,
            "elapsed_s": round((progress or {}).get("elapsed_s") or now - job.started, 1),
            "eta_s": None if job.status != "running" or eta is None else round(float(eta), 1),
            "losses": [{k: r[k] for k in ("step", "loss", "loss_smooth", "val_loss") if k in r} for r in job.records],
            "samples": [relative(self.root, p) for p in samples],
            "output": relative(self.root, job.output),
            "adapter": relative(self.root, adapter) if adapter.is_file() and job.status == "done" else None,
            "resumable": job.status in ("stopped", "failed") and bool(checkpoints),
            "message": self._message(job),
        }

    def _read_log(self, job: Job) -> None:
        """New complete lines of train_log.jsonl (a line still being written waits for the next poll)."""
        path = job.output / "train_log.jsonl"
        if not _fresh(path, job):  # a replaced run's old log (before --overwrite empties the folder) is not ours
            return
        with open(path, "rb") as f:
            f.seek(job._log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                job.records.append(record)
        job._log_offset += end

    def _message(self, job: Job) -> str:
        if job.status == "running":
            return "loading the base and caching latents" if not job.records and not job.output.joinpath(
                "progress.json").exists() else "training"
        if job.status == "stopping":
            return "stopping: writing a checkpoint"
        lines = job.log_path.read_text(encoding="utf-8", errors="replace").splitlines() if job.log_path.exists() else []
        if job.status == "failed":
            errors = [ln for ln in lines if ln.startswith("sdlora: error:")]
            return errors[-1] if errors else "training failed: " + " | ".join(lines[-3:])
        if job.status == "stopped":
            saved = [ln for ln in lines if ln.startswith("interrupted at step")]
            return (saved[-1] if saved else "stopped before the first step (nothing to resume)")
        return f"finished: {relative(self.root, job.output / (job.name + '.safetensors'))}"

    def _step_text(self, job: Job) -> str:
        progress = (_read_json(job.output / "progress.json") if _fresh(job.output / "progress.json", job) else None) or {}
        step = progress.get("step") or max((r["step"] for r in job.records), default=0)
        total = progress.get("total") or job.total
        return f"step {step}/{total}" if total else f"step {step}"


def _fresh(path: Path, job: Job) -> bool:
    """Written since the job started: files of the run this job replaces are not its progress."""
    try:
        return path.stat().st_mtime >= job.started - 1
    except OSError:
        return False


def _read_json(path: Path) -> dict | None:
    """progress.json is rewritten while we read: a torn or missing file is just no reading this time."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
