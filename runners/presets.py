"""Runner presets: turn ``--runner NAME`` plus a few densebeam flags into Beam pipeline options.

* ``local`` (the default) is Beam's FnApiRunner named explicitly, so nothing tries to download a runner
  binary (Beam's default local runner first tries to fetch Prism). With ``--workers N > 1`` it runs N
  Beam workers as threads of this process (Beam's ``multi_threading`` mode): every stage's input is
  split N ways and the parts run at once, and the workers share one model, one ``auto`` measurement and
  at most one forward pass per core (:func:`densebeam.index_store.encoding.encoder.cpu_lanes`). N worker
  processes would each import torch and load the model, and move every element through gRPC: slower
  (docs/scale.md).
* ``flink`` is Beam's portable FlinkRunner with a job server fetched by Maven and Python workers that
  need no Docker (:mod:`runners.flink`); ``--workers N`` sets the parallelism.
* ``dataflow`` is the DataflowRunner with this project packaged for the workers (:mod:`runners.dataflow`);
  ``--workers N`` caps autoscaling.

Any other runner name (``DataflowRunner``, ``FlinkRunner``, ...) is passed to Beam unchanged. In every
case the user's own Beam flags come last and win over the preset's defaults.
"""

from __future__ import annotations

from typing import Optional, Sequence

LOCAL = "local"
FLINK = "flink"
DATAFLOW = "dataflow"
PRESETS = (LOCAL, FLINK, DATAFLOW)
FNAPI_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def preset_args(runner: str, beam_args: Sequence[str], workers: int = 1,
                job_name: Optional[str] = None) -> list[str]:
    """The preset's Beam flags (without the user's ``beam_args``, which go after them)."""
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    args: list[str] = []
    if runner == LOCAL:
        args += [f"--runner={FNAPI_RUNNER}", f"--direct_num_workers={workers}",
                 "--direct_running_mode=" + ("in_memory" if workers == 1 else "multi_threading")]
    elif runner == FLINK:
        from densebeam.runners import flink

        args += ["--runner=FlinkRunner", *flink.preset_args(beam_args, workers)]
    elif runner == DATAFLOW:
        from densebeam.runners import dataflow

        args += ["--runner=DataflowRunner", *dataflow.preset_args(beam_args, workers)]
    else:
        args.append(f"--runner={runner}")
    if job_name:
        args.append(f"--job_name={job_name}")
    return args


def pipeline_options(runner: str, beam_args: Sequence[str], workers: int = 1,
                     job_name: Optional[str] = None):
    """Beam ``PipelineOptions`` for a preset; ``beam_args`` are the user's own Beam flags and win over the
    preset. (Beam is imported here, not with the module: the CLI reads the presets' names first.)"""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(preset_args(runner, beam_args, workers, job_name) + list(beam_args))
