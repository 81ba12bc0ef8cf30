"""Dataflow, offline: both pipelines translate for the DataflowRunner (``--dry_run``: the job is built,
never submitted; fake project and gs:// paths; no credentials, no metadata server), the workers get
this project through ``--setup_file`` or a container, and the package builds with every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import apache_beam as beam
import pytest

from densebeam.index_store.ivf.plan import plan_build
from densebeam.index_store.artifacts.embeddings import open_embeddings
from densebeam.index_store.encoding.encoder import load_encoder
from densebeam.pipelines import encode
from densebeam.pipelines.options import read_options
from densebeam.runners import dataflow
from densebeam.runners.presets import pipeline_options
from densebeam.index_store.corpus_io import expand_patterns
from densebeam.transforms.index import BuildIndex
from conftest import REPO, make_passages, write_jsonl

pytestmark = pytest.mark.timeout(300)

GCP = ["--project=densebeam-test", "--region=us-central1", "--temp_location=gs://densebeam-test/tmp",
       "--staging_location=gs://densebeam-test/staging", "--dry_run=True", "--no_auth"]
GPU = "--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
PACKAGES = ("pipelines", "transforms", "index_store", "runners")


@pytest.fixture(autouse=True)
def offline_gcp(monkeypatch):
    """No credential lookup and no GCE metadata-server probe."""
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "densebeam-test")
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


def translate(build, beam_args, workers=1):
    """Build a pipeline with ``build(p)`` and translate it for Dataflow without submitting it."""
    p = beam.Pipeline(options=pipeline_options("dataflow", beam_args, workers=workers,
                                               job_name="densebeam-dry-run"))
    build(p)
    result = p.run()
    result.wait_until_finish()
    return p.runner.proto_pipeline, result.job


def transform_names(proto) -> set[str]:
    return {t.unique_name for t in proto.components.transforms.values()}


def staged_names(proto) -> set[str]:
    from apache_beam.portability.api import beam_runner_api_pb2

    names = set()
    for env in proto.components.environments.values():
        for dep in env.dependencies:
            payload = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload)
            names.add(payload.staged_name)
    return names


def job_dict(job) -> dict:
    """The Dataflow Job message as plain JSON-like data."""
    return type(job).to_dict(job)


def job_environment(job, proto) -> dict:
    """The worker environment Dataflow would get (built offline: create_job builds it after staging)."""
    from apache_beam.runners.dataflow.internal import apiclient

    env = apiclient.Environment(packages=[], options=job.options,
                                environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
                                proto_pipeline_staged_url="gs://densebeam-test/staging/pipeline.pb",
                                proto_pipeline=proto).proto
    return type(env).to_dict(env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("df")
    return write_jsonl(tmp / "corpus.jsonl", make_passages(50, seed=1))


def test_encode_pipeline_translates_for_dataflow(corpus, tiny_cos_model, tmp_path):
    args, _ = encode.build_parser().parse_known_args(
        ["--input", str(corpus), "--output", "memory://df-emb", "--model", tiny_cos_model])
    files = expand_patterns(args.input)
    facts = load_encoder(args.model, precision="fp32", device="cpu").facts(dtype=args.dtype)

    def build(p):
        encode.encode_stage(p, files, read_options(args), encode.encode_options(args), facts,
                            args.output, args)

    proto, job = translate(build, GCP + [GPU], workers=8)
    from apache_beam.runners.dataflow.internal import apiclient

    assert job.proto.type_ == apiclient.dataflow.JobType.JOB_TYPE_BATCH
    names = transform_names(proto)
    for stage in ("ReadCorpus/SpreadPieces", "ReadCorpus/ParseValidate", "ReadCorpus/GroupById",
                  "Encode/RunInference", "Encode/CheckVectors", "Write/WriteShards", "Write/Finalize"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage
    assert "workflow.tar.gz" in staged_names(proto)  # the project's sdist, built from setup.py
    env = job_environment(job, proto)
    opts = env["sdk_pipeline_options"]["options"]
    assert opts["setup_file"] == str(dataflow.SETUP_FILE)
    assert env["worker_pools"][0]["machine_type"] == dataflow.GPU_MACHINE
    assert int(opts["max_num_workers"]) == 8
    assert any("worker_accelerator=type:nvidia-tesla-t4" in s for s in env["service_options"])
    assert "no_use_multiple_sdk_containers" in opts["experiments"]
    assert job.proto.name == "densebeam-dry-run"


def test_index_pipeline_translates_with_a_container(tmp_path):
    from test_build_index import FACTS, clustered, write_embeddings_dir

    emb_dir = write_embeddings_dir(tmp_path / "emb", clustered(900), FACTS, shard_rows=300)
    plan = plan_build([open_embeddings(emb_dir)], nlist=8, codec=None, memory_budget_bytes=None,
                      n_queries=50, k=10, target_recall=0.9, layout="merged", seed=1)
    image = "us-central1-docker.pkg.dev/densebeam-test/densebeam/worker:0.1.0"

    def build(p):
        _ = p | "BuildIndex" >> BuildIndex(plan, "gs://densebeam-test/index", {})

    proto, job = translate(build, GCP + [f"--sdk_container_image={image}", "--machine_type=n2-highmem-8"])
    names = transform_names(proto)
    for stage in ("BuildIndex/SpreadShards", "BuildIndex/Sample", "BuildIndex/Train", "BuildIndex/AddShards",
                  "BuildIndex/Publish"):
        assert any(n == stage or n.startswith(stage + "/") for n in names), stage
    images = {env.payload for env in proto.components.environments.values()}
    assert any(image.encode() in payload for payload in images)
    assert "workflow.tar.gz" not in staged_names(proto)  # the container already holds densebeam
    env = job_environment(job, proto)
    opts = env["sdk_pipeline_options"]["options"]
    assert "setup_file" not in opts
    assert env["worker_pools"][0]["machine_type"] == "n2-highmem-8"  # the user's flag wins
    assert opts["autoscaling_algorithm"] == "THROUGHPUT_BASED"


def test_dataflow_preset_says_what_is_missing():
    with pytest.raises(ValueError, match="--region.*--temp_location"):
        pipeline_options("dataflow", ["--project=p"])
    with pytest.raises(ValueError, match="gs://"):
        pipeline_options("dataflow", ["--project=p", "--region=r", "--temp_location=/tmp/x"])
    d = pipeline_options("dataflow", GCP).get_all_options()
    assert d["machine_type"] == dataflow.CPU_MACHINE and d["setup_file"] == str(dataflow.SETUP_FILE)
    assert d["runner"] == "DataflowRunner"


def _source_copy(dest: Path) -> Path:
    """The project's source (what a clean clone holds) without build leftovers."""
    for name in ("setup.py", "__init__.py", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_sdist_and_wheel_hold_every_package_under_densebeam(tmp_path):
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=180)
    sdist = next((tmp_path / "dist").glob("densebeam-*.tar.gz"))
    wheel = next((tmp_path / "dist").glob("densebeam-*.whl"))
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    for pkg in PACKAGES:
        modules = {str(p.relative_to(REPO)) for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts}
        assert modules <= in_sdist, modules - in_sdist
        assert {f"densebeam/{m}" for m in modules} <= in_wheel, {f"densebeam/{m}" for m in modules} - in_wheel
    # One top-level name in site-packages: densebeam (and its dist-info), nothing else.
    top = {n.split("/", 1)[0] for n in in_wheel}
    assert {t for t in top if not t.endswith(".dist-info")} == {"densebeam"}, top
    assert "densebeam/__init__.py" in in_wheel and "densebeam/setup.py" not in in_wheel
    assert "densebeam/runners/flink.py" in in_wheel and "densebeam/runners/Dockerfile" in in_wheel
    entry = next(n for n in in_wheel if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "densebeam = densebeam.pipelines.cli:main" in z.read(entry).decode()
