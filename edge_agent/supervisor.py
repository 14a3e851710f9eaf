"""Runs the fine-tune as a child process of the daemon, so inference and uploads never wait for training."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_agent.fileio import read_json
from edge_agent.ids import new_id
from edge_agent.layout import AgentPaths

log = logging.getLogger("edge_agent")


class FinetuneSupervisor:
    """Runs one fine-tune at a time as a child process and reports how it ended."""

    def __init__(self, config_file: Path, paths: AgentPaths):
        self.config_file, self.paths = config_file, paths
        self.process: subprocess.Popen | None = None
        self.run_id: str | None = None
        self.reason: str | None = None
        self.stopping = False

    @property
    def running(self) -> bool:
        return self.process is not None

    def start(self, reason: str) -> str:
        self.run_id, self.reason, self.stopping = new_id(), reason, False
        command = [sys.executable, "-m", "edge_agent", "finetune", "--config", str(self.config_file),
                   "--run-id", self.run_id, "--reason", reason, "--parent-pid", str(os.getpid())]
        with open(self.paths.log_file, "ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.info("fine-tune %s started (%s), pid %d", self.run_id, reason, self.process.pid)
        return self.run_id

    def progress(self) -> dict[str, Any] | None:
        if self.run_id is None:
            return None
        return read_json(self.paths.runs / self.run_id / "progress.json")

    def poll(self) -> tuple[int, dict[str, Any] | None] | None:
        """(exit code, report) once the child has ended, else None."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        report = read_json(self.paths.runs / self.run_id / "report.json")
        self.process = None
        return code, report

    def stop(self, timeout_s: float = 5.0) -> None:
        """Abandon the fine-tune: it terminates its workers; nothing half-made becomes visible."""
        if self.process is None:
            return
        self.stopping = True
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        log.info("fine-tune %s abandoned", self.run_id)
