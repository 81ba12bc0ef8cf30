"""Flink preset: Beam's portable Flink runner without Beam's downloader and without Docker.

Two pieces, each usable alone:

* :func:`fetch_job_server` resolves Beam's Flink job server with **Maven** into
  ``~/.cache/densebeam/jars`` (reused across runs) and returns a launcher jar for
  ``--flink_job_server_jar``. It first asks for Beam's own shaded job server
  ``org.apache.beam:beam-runners-flink-<flink>-job-server:<beam>`` for every Flink version this Beam
  publishes (newest first); when the Maven repository does not hold it, it falls back to the newest
  Flink runner artifact it does hold (``beam-runners-flink-<flink>:<beam>`` plus its dependencies, the
  same classes the shaded jar bundles) and writes a small launcher jar whose manifest names them.
* :class:`WorkerPool` runs Beam's Python worker pool (``worker_pool_main``) for
  ``--environment_type=EXTERNAL``: every Flink task manager asks it for SDK worker processes, which
  run outside the caller and outside the JVM, as on a cluster.

(The tests start a real Flink session cluster on this machine from the same jars: ``tests/flink_cluster.py``.)

:class:`JobServer` runs that jar for one Flink master; :func:`preset_args` turns ``--runner flink``
into Beam flags (user flags always win) and manages the job server and worker pool it needs.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from densebeam.runners.flags import flag_value

log = logging.getLogger(__name__)

JOB_SERVER_MAIN = "org.apache.beam.runners.flink.FlinkJobServerDriver"
CACHE_ENV = "DENSEBEAM_JAR_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "densebeam" / "jars"
MAVEN_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.6.1"
# Fallbacks when Beam's shaded job server of the installed Beam version is not in the Maven repository:
# (Flink version, Beam Java version) of runner artifacts whose dependency tree resolves. Newest first.
# The portable Fn API is stable across these releases: a 2.77 Python SDK runs on a 2.62 Java runner
# (tested in tests/test_flink.py).
FALLBACK_RUNNERS = (("1.19", "2.70.0"), ("1.19", "2.62.0"))
MISS_TTL_S = 24 * 3600
# Flink on Java 17 needs these opened to its serializers (the Flink distribution's scripts pass the same).
JAVA17_OPENS = ("java.base/java.lang", "java.base/java.lang.reflect", "java.base/java.lang.invoke",
                "java.base/java.io", "java.base/java.net", "java.base/java.nio", "java.base/sun.nio.ch",
                "java.base/java.math", "java.base/java.text", "java.base/java.time", "java.base/java.util",
                "java.base/java.util.concurrent", "java.base/java.util.concurrent.atomic",
                "java.base/java.util.concurrent.locks", "java.base/java.security", "java.sql/java.sql")


def published_flink_versions() -> list[str]:
    """Flink versions this Beam release publishes job servers for, newest first."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    return sorted(FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS,
                  key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)


def beam_version() -> str:
    import apache_beam

    return apache_beam.__version__


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@dataclasses.dataclass(frozen=True)
class JobServerJar:
    """A fetched job server: ``launcher`` goes to ``--flink_job_server_jar``; ``lib`` holds the jars
    (also what :class:`LocalFlinkCluster` runs Flink from)."""

    launcher: Path
    lib: Path
    flink_version: str
    beam_java_version: str
    artifact: str

    @property
    def shaded(self) -> bool:
        return self.artifact.endswith("-job-server")


def candidates(flink_version: Optional[str] = None) -> list[tuple[str, str, str]]:
    """(artifactId, version, flink version) to try, best first."""
    out = [(f"beam-runners-flink-{v}-job-server", beam_version(), v) for v in published_flink_versions()
           if flink_version in (None, v)]
    out += [(f"beam-runners-flink-{v}", bv, v) for v, bv in FALLBACK_RUNNERS if flink_version in (None, v)]
    return out


def _misses_path(root: Path) -> Path:
    return root / "unavailable.json"


def _read_misses(root: Path) -> dict:
    try:
        misses = json.loads(_misses_path(root).read_text())
    except (OSError, ValueError):
        return {}
    now = time.time()
    return {k: t for k, t in misses.items() if now - t < MISS_TTL_S}


def _record_miss(root: Path, key: str) -> None:
    misses = _read_misses(root)
    misses[key] = time.time()
    _misses_path(root).write_text(json.dumps(misses, indent=1))


def _maven_copy(artifact: str, version: str, lib: Path, timeout_s: float) -> bool:
    """Resolve ``org.apache.beam:artifact:version`` and its runtime dependencies into ``lib``."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise FileNotFoundError("Maven ('mvn') is not on PATH: install Maven 3, or pass "
                                "--flink_job_server_jar PATH to a Flink job server jar you have")
    with tempfile.TemporaryDirectory(prefix="densebeam-mvn-") as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>densebeam</groupId><artifactId>flink-job-server</artifactId><version>0</version>
  <dependencies><dependency>
    <groupId>org.apache.beam</groupId><artifactId>{artifact}</artifactId><version>{version}</version>
  </dependency></dependencies>
</project>
""")
        cmd = [mvn, "-B", "-q", "-f", str(pom), f"{MAVEN_PLUGIN}:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={lib}"]
        log.info("fetching org.apache.beam:%s:%s with Maven", artifact, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-5:])
        log.info("Maven could not resolve %s:%s: %s", artifact, version, tail)
        return False
    return any(lib.glob(f"{artifact}-{version}*.jar"))


def _manifest_line(text: str) -> bytes:
    """A manifest header wrapped at 72 bytes (continuation lines start with a space)."""
    raw, out = text.encode("utf-8"), []
    out.append(raw[:72])
    raw = raw[72:]
    while raw:
        out.append(b" " + raw[:71])
        raw = raw[71:]
    return b"\r\n".join(out) + b"\r\n"


def write_launcher(lib: Path, dest: Path, main_class: str = JOB_SERVER_MAIN) -> Path:
    """A jar holding only a manifest: Main-Class, a Class-Path naming every jar of ``lib`` (relative)
    and the Java 17 Add-Opens Flink needs, so ``java -jar dest`` (what Beam runs) starts the driver."""
    jars = sorted(p.name for p in lib.glob("*.jar"))
    rel = os.path.relpath(lib, dest.parent)
    manifest = (_manifest_line("Manifest-Version: 1.0") + _manifest_line(f"Main-Class: {main_class}")
                + _manifest_line("Class-Path: " + " ".join(f"{rel}/{j}" for j in jars))
                + _manifest_line("Add-Opens: " + " ".join(JAVA17_OPENS)) + b"\r\n")
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", manifest)
    os.replace(tmp, dest)
    return dest


def fetch_job_server(flink_version: Optional[str] = None, root: Optional[Path] = None,
                     timeout_s: float = 1200) -> JobServerJar:
    """The newest Flink job server Maven can provide (cached; a second call does no network I/O
    except re-checking better candidates not known missing in the last 24 h)."""
    root = Path(root or cache_dir())
    root.mkdir(parents=True, exist_ok=True)
    misses = _read_misses(root)
    tried = []
    for artifact, version, fv in candidates(flink_version):
        key = f"{artifact}:{version}"
        home = root / f"{artifact}-{version}"
        if (home / "COMPLETE").exists():
            return JobServerJar(home / "launcher.jar", home / "lib", fv, version, artifact)
        if key in misses:
            tried.append(key + " (missing, cached)")
            continue
        tried.append(key)
        lib = home / "lib"
        if home.exists():
            shutil.rmtree(home)
        lib.mkdir(parents=True)
        if not _maven_copy(artifact, version, lib, timeout_s):
            shutil.rmtree(home, ignore_errors=True)
            _record_miss(root, key)
            continue
        write_launcher(lib, home / "launcher.jar")
        (home / "COMPLETE").write_text(key + "\n")
        log.info("Flink %s job server ready: %s", fv, home / "launcher.jar")
        return JobServerJar(home / "launcher.jar", lib, fv, version, artifact)
    raise FileNotFoundError("no Flink job server could be fetched with Maven (tried: " + ", ".join(tried)
                            + "); check that Maven reaches a repository holding Beam's Flink runner, "
                              f"delete {_misses_path(root)} to retry, or pass --flink_job_server_jar")


def fetch_log_binding(lib: Path, root: Optional[Path] = None, timeout_s: float = 300) -> Optional[Path]:
    """slf4j-simple matching the slf4j-api in ``lib`` (Flink's own logs on stderr), or None if Maven
    cannot provide it (Flink then runs with slf4j's no-op logger)."""
    api = sorted(lib.glob("slf4j-api-*.jar"))
    if not api:
        return None
    version = api[-1].name[len("slf4j-api-"):-len(".jar")]
    dest = Path(root or cache_dir()) / "log"
    jar = dest / f"slf4j-simple-{version}.jar"
    if jar.exists():
        return jar
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [shutil.which("mvn") or "mvn", "-B", "-q", f"{MAVEN_PLUGIN}:copy",
           f"-Dartifact=org.slf4j:slf4j-simple:{version}", f"-DoutputDirectory={dest}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    return jar if proc.returncode == 0 and jar.exists() else None


# -- processes --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: Optional[subprocess.Popen] = None,
                  what: str = "service") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM the process group ``proc`` leads (it was started with ``start_new_session``), then
    SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:  # children (SDK workers, JVM threads' forks) may outlive the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def worker_env(threads_per_worker: Optional[int] = None, extra: Optional[dict] = None) -> dict:
    """Environment for SDK worker processes: this interpreter first on PATH (the pool runs ``python``),
    the project importable, and torch threads bounded."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads_per_worker:
        env["OMP_NUM_THREADS"] = str(threads_per_worker)
    env.update(extra or {})
    return env


class WorkerPool:
    """Beam's Python worker pool (``--environment_type=EXTERNAL --environment_config=localhost:PORT``).

    Each SDK worker it starts is its own process (``python -c SdkHarness(...)``) in the pool's process
    group; :meth:`stop` ends the group, so no worker outlives the pool.
    """

    def __init__(self, port: Optional[int] = None, threads_per_worker: Optional[int] = None,
                 env: Optional[dict] = None, log_path: Optional[str] = None):
        self.port = port or free_port()
        self._env = worker_env(threads_per_worker, env)
        self._log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def start(self, timeout_s: float = 60) -> "WorkerPool":
        out = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                 f"--service_port={self.port}"],
                env=self._env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self._log_path:
                out.close()
        wait_for_port(self.port, timeout_s, self.proc, "Beam worker pool")
        log.info("Beam worker pool (pid %d) at %s", self.proc.pid, self.address)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class JobServer:
    """Beam's Flink job server (``java -jar LAUNCHER``) for one Flink master, on a free port; pipelines
    reach it with ``--job_endpoint``. One JVM serves any number of jobs (``densebeam build`` runs two),
    and :meth:`stop` ends it (Beam's own launcher keeps its JVM until the interpreter exits)."""

    def __init__(self, jar: Path, flink_master: str = "[local]", workdir: Optional[Path] = None,
                 log_path: Optional[str] = None):
        self.jar, self.flink_master = Path(jar), flink_master
        self.port = free_port()
        self._workdir = workdir
        self._log_path = log_path
        self._tmp: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.port}"

    def start(self, timeout_s: float = 120) -> "JobServer":
        self._tmp = tempfile.mkdtemp(prefix="densebeam-jobserver-", dir=self._workdir)
        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        cmd = [java, "-jar", str(self.jar), "--flink-master", self.flink_master,
               "--artifacts-dir", os.path.join(self._tmp, "artifacts"), "--job-port", str(self.port),
               "--artifact-port", "0", "--expansion-port", "0"]
        out = open(self._log_path or os.path.join(self._tmp, "jobserver.log"), "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        try:
            wait_for_port(self.port, timeout_s, self.proc, "Flink job server")
        except BaseException:
            self.stop()
            raise
        log.info("Flink job server (pid %d) at %s for master %s", self.proc.pid, self.endpoint,
                 self.flink_master)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- preset -----------------------------------------------------------------------------------------

_MANAGED: dict = {}  # ("pool", threads) -> WorkerPool, ("jobserver", jar, master) -> JobServer


def shutdown_managed() -> None:
    """Stop the job servers and worker pools :func:`preset_args` started (also run at exit)."""
    while _MANAGED:
        _MANAGED.pop(next(iter(_MANAGED))).stop()


atexit.register(shutdown_managed)


def preset_args(beam_args: Sequence[str], workers: int = 1) -> list[str]:
    """Beam flags for ``--runner flink`` (placed before the user's, which win).

    * Job server: unless ``--job_endpoint`` names one already running, densebeam starts one (kept for
      the process's later pipelines, stopped at exit) from ``--flink_job_server_jar`` if given, else
      from the jar Maven fetched (:func:`fetch_job_server`).
    * ``--flink_master``: ``[local]`` (a Flink mini-cluster inside the job server) unless given; a real
      cluster is ``--flink_master HOST:8081`` (its REST address).
    * ``--parallelism``: ``--workers`` when > 1.
    * Environment: unless ``--environment_type`` is given, an embedded ``[local]`` master gets an
      EXTERNAL Python worker pool started here (``sdk_worker_parallelism`` = parallelism: one Python
      process per slot); a remote master keeps Beam's default (DOCKER); on a cluster without Docker use
      ``--environment_type=EXTERNAL --environment_config=localhost:PORT`` with a worker pool running
      beside every TaskManager (see docs/scale.md).
    """
    args: list[str] = []
    master = flag_value(beam_args, "--flink_master") or "[local]"
    if flag_value(beam_args, "--flink_master") is None:
        args.append("--flink_master=[local]")
    if workers > 1:
        args.append(f"--parallelism={workers}")
    if flag_value(beam_args, "--job_endpoint") is None:
        jar_path = flag_value(beam_args, "--flink_job_server_jar")
        if jar_path is None:
            jar = fetch_job_server(flag_value(beam_args, "--flink_version"))
            jar_path = str(jar.launcher)
            args += [f"--flink_job_server_jar={jar_path}", f"--flink_version={jar.flink_version}"]
        key = ("jobserver", jar_path, master)
        if key not in _MANAGED:
            _MANAGED[key] = JobServer(Path(jar_path), master).start()
        args.append(f"--job_endpoint={_MANAGED[key].endpoint}")
    if flag_value(beam_args, "--environment_type") is None and master == "[local]":
        parallelism = int(flag_value(beam_args, "--parallelism") or workers)
        threads = max(1, (os.cpu_count() or 1) // max(1, parallelism))
        key = ("pool", threads)
        if key not in _MANAGED:
            _MANAGED[key] = WorkerPool(threads_per_worker=threads).start()
        args += ["--environment_type=EXTERNAL", f"--environment_config={_MANAGED[key].address}",
                 f"--sdk_worker_parallelism={max(1, parallelism)}"]
    return args
