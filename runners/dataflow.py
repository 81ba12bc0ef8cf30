"""Dataflow preset: the DataflowRunner with this project packaged for its workers.

Workers get densebeam one of two ways:

* ``--setup_file`` (the preset's default): Beam builds an sdist of this repo's ``setup.py`` and every
  worker ``pip install``\\s it with its ``install_requires`` at start-up (minutes per worker, simplest).
* ``--sdk_container_image IMAGE``: a container built from ``runners/Dockerfile`` with everything
  installed (fast start, reproducible; the way to run GPU workers with a CUDA torch).

GPU encoding: pass ``--dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;
install-nvidia-driver``; the preset then picks an N1 machine (T4s attach to N1 only) and one SDK process
per worker (``no_use_multiple_sdk_containers``) so one model, not one per vCPU, sits on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from densebeam.runners.flags import flag_value, has_flag

SETUP_FILE = Path(__file__).resolve().parents[1] / "setup.py"
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile"
CPU_MACHINE = "n2-standard-8"   # 8 vCPU, 32 GB: one SDK process per vCPU, model shared per process
GPU_MACHINE = "n1-standard-8"   # T4 attach to N1 machines
DEFAULT_MAX_WORKERS = 20


def uses_gpu(beam_args: Sequence[str]) -> bool:
    return any("worker_accelerator" in a for a in beam_args)


def check_required(beam_args: Sequence[str]) -> None:
    """Dataflow needs a project, a region and a gs:// temp location; say so before Beam does."""
    missing = [f for f in ("--project", "--region", "--temp_location") if not has_flag(beam_args, f)]
    if missing:
        raise ValueError("--runner dataflow needs " + ", ".join(missing)
                         + " (e.g. --project my-proj --region us-central1 --temp_location gs://bucket/tmp)")
    temp = flag_value(beam_args, "--temp_location") or ""
    if not temp.startswith("gs://"):
        raise ValueError(f"--temp_location must be a gs:// path for Dataflow, not {temp!r}")


def preset_args(beam_args: Sequence[str], workers: int = 1) -> list[str]:
    """Defaults for ``--runner dataflow`` (the user's flags come after them and win)."""
    check_required(beam_args)
    gpu = uses_gpu(beam_args)
    args: list[str] = []
    if not any(has_flag(beam_args, f) for f in ("--setup_file", "--sdk_container_image",
                                             "--requirements_file", "--extra_package")):
        args.append(f"--setup_file={SETUP_FILE}")
    if not has_flag(beam_args, "--machine_type") and not has_flag(beam_args, "--worker_machine_type"):
        args.append(f"--machine_type={GPU_MACHINE if gpu else CPU_MACHINE}")
    if not has_flag(beam_args, "--autoscaling_algorithm"):
        args.append("--autoscaling_algorithm=THROUGHPUT_BASED")
    if not has_flag(beam_args, "--max_num_workers"):
        args.append(f"--max_num_workers={workers if workers > 1 else DEFAULT_MAX_WORKERS}")
    if gpu:
        args.append("--experiments=no_use_multiple_sdk_containers")
    if not has_flag(beam_args, "--disk_size_gb"):
        args.append("--disk_size_gb=100")  # torch + model + container images
    return args


def example_command(project: str = "my-proj", region: str = "us-central1", bucket: str = "my-bucket",
                    gpu: Optional[str] = "nvidia-tesla-t4") -> str:
    """The documented full command (docs/scale.md)."""
    cmd = ["densebeam build", f"--input 'gs://{bucket}/msmarco/collection-*.tsv'",
           "--format tsv --tsv-columns id,text", f"--output gs://{bucket}/indexes/msmarco-minilm",
           "--model sentence-transformers/all-MiniLM-L6-v2 --codec SQ8",
           f"--runner dataflow --project {project} --region {region}",
           f"--temp_location gs://{bucket}/tmp --workers 16"]
    if gpu:
        cmd.append(f"--dataflow_service_options='worker_accelerator=type:{gpu};count:1;install-nvidia-driver'"
                   f" --sdk_container_image {region}-docker.pkg.dev/{project}/densebeam/worker:0.1.0")
    return " \\\n  ".join(cmd)
