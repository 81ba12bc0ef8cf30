"""A real Flink session cluster on this machine, for the tests: one StandaloneSession JobManager and N
TaskManagers, separate JVMs run from the Flink jars Maven fetched (densebeam.runners.flink), free ports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from densebeam.runners.flink import JAVA17_OPENS, free_port, stop_process_group, wait_for_port

log = logging.getLogger(__name__)


class LocalFlinkCluster:
    """A Flink session cluster on this machine: a StandaloneSession JobManager and ``task_managers``
    TaskManagers (``slots`` each), separate JVMs run from the Maven-fetched Flink jars, free ports.
    ``rest_address`` is what ``--flink_master`` takes."""

    def __init__(self, lib: Path, workdir: Path, task_managers: int = 2, slots: int = 1,
                 tm_process_mb: int = 1280, jm_process_mb: int = 1024,
                 extra_classpath: Sequence[Path] = ()):
        if task_managers < 1 or slots < 1:
            raise ValueError("a Flink cluster needs at least one TaskManager with one slot")
        self.lib, self.workdir = Path(lib), Path(workdir)
        self.extra_classpath = [str(p) for p in extra_classpath]
        self.task_managers, self.slots = task_managers, slots
        self.tm_mb, self.jm_mb = tm_process_mb, jm_process_mb
        self.rest_port = free_port()
        self.rpc_port = free_port()
        self.procs: list[subprocess.Popen] = []

    @property
    def rest_address(self) -> str:
        return f"localhost:{self.rest_port}"

    def _write_conf(self) -> Path:
        conf = self.workdir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        settings = {
            "jobmanager.rpc.address": "localhost", "jobmanager.rpc.port": self.rpc_port,
            "jobmanager.bind-host": "localhost", "taskmanager.bind-host": "localhost",
            "taskmanager.host": "localhost",
            "rest.address": "localhost", "rest.bind-address": "localhost", "rest.port": self.rest_port,
            "jobmanager.memory.process.size": f"{self.jm_mb}m",
            # What Flink's start scripts compute with BashJavaUtils, given explicitly (JVMs started
            # directly): slots share the task heap; the Python workers run outside the JVM.
            "taskmanager.cpu.cores": self.slots,
            "taskmanager.memory.task.heap.size": f"{self.tm_mb // 2}m",
            "taskmanager.memory.task.off-heap.size": "0m",
            "taskmanager.memory.framework.heap.size": "128m",
            "taskmanager.memory.framework.off-heap.size": "128m",
            "taskmanager.memory.managed.size": "64m",
            # Network buffers: a stage with several side inputs needs one buffer set per input gate.
            "taskmanager.memory.network.min": "128m", "taskmanager.memory.network.max": "128m",
            "taskmanager.memory.jvm-metaspace.size": "256m",
            "taskmanager.memory.jvm-overhead.min": "192m", "taskmanager.memory.jvm-overhead.max": "192m",
            "taskmanager.numberOfTaskSlots": self.slots, "parallelism.default": 1,
            "io.tmp.dirs": str(tmp), "web.tmpdir": str(tmp), "blob.server.port": "0",
            "taskmanager.rpc.port": "0", "taskmanager.data.port": "0",
            "heartbeat.timeout": 60000,
        }
        (conf / "flink-conf.yaml").write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
        return conf

    def _java(self, main: str, conf: Path, name: str, heap_mb: int) -> subprocess.Popen:
        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        opens = [f"--add-opens={m}=ALL-UNNAMED" for m in JAVA17_OPENS]
        cmd = [java, f"-Xmx{heap_mb}m", *opens, "-cp", os.pathsep.join([str(self.lib / "*"), *self.extra_classpath]),
               "-Dorg.slf4j.simpleLogger.showDateTime=true", main, "--configDir", str(conf)]
        logf = open(self.workdir / f"{name}.log", "ab")
        try:
            return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "FLINK_CONF_DIR": str(conf)})
        finally:
            logf.close()

    def overview(self) -> dict:
        with urllib.request.urlopen(f"http://{self.rest_address}/overview", timeout=5) as r:
            return json.load(r)

    def start(self, timeout_s: float = 120) -> "LocalFlinkCluster":
        conf = self._write_conf()
        try:
            self.procs.append(self._java("org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
                                         conf, "jobmanager", self.jm_mb // 2))
            for i in range(self.task_managers):
                self.procs.append(self._java("org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
                                             conf, f"taskmanager-{i}", self.tm_mb // 2 + 160))
            wait_for_port(self.rest_port, timeout_s, self.procs[0], "Flink JobManager")
            deadline = time.monotonic() + timeout_s
            while True:
                dead = [p for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a Flink process exited early (code {dead[0].returncode}); "
                                       f"see the logs in {self.workdir}")
                try:
                    if self.overview().get("taskmanagers", 0) >= self.task_managers:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.task_managers} TaskManagers did not register within "
                                       f"{timeout_s:.0f} s; see the logs in {self.workdir}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        log.info("Flink session cluster at %s: %s", self.rest_address, self.overview())
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process_group(p, timeout_s=20)
        self.procs = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
