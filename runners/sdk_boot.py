"""Boot a Beam Python SDK worker for ``--environment_type=PROCESS`` without Docker.

The runner (a Flink TaskManager) starts ``command --id=ID --provision_endpoint=... --control_endpoint=...``
per SDK worker; this does what the boot program in Beam's SDK container does: fetch the pipeline options
from the provision service, then run ``sdk_worker_main`` in this interpreter, which must already have
densebeam and its dependencies installed (the same virtualenv on every TaskManager host). The worker is
a child of the TaskManager, so it ends with it. :func:`write_boot_command` writes the executable that
``--environment_config='{"command": PATH}'`` names.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="densebeam-sdk-boot")
    for flag in ("id", "provision_endpoint", "logging_endpoint", "artifact_endpoint", "control_endpoint",
                 "semi_persist_dir"):
        p.add_argument(f"--{flag}", default="")
    a, _ = p.parse_known_args(argv)
    import grpc
    from google.protobuf import json_format, text_format

    from apache_beam.portability.api import (beam_provision_api_pb2, beam_provision_api_pb2_grpc,
                                             endpoints_pb2)

    with grpc.insecure_channel(a.provision_endpoint) as channel:
        info = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel).GetProvisionInfo(
            beam_provision_api_pb2.GetProvisionInfoRequest(), metadata=[("worker_id", a.id)]).info

    def descriptor(url: str) -> str:
        return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))

    env = os.environ
    env["WORKER_ID"] = a.id
    env["PIPELINE_OPTIONS"] = json_format.MessageToJson(info.pipeline_options)
    env["CONTROL_API_SERVICE_DESCRIPTOR"] = descriptor(a.control_endpoint or info.control_endpoint.url)
    logging_url = a.logging_endpoint or info.logging_endpoint.url
    if logging_url:
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = descriptor(logging_url)
    env["SEMI_PERSISTENT_DIRECTORY"] = a.semi_persist_dir or tempfile.mkdtemp(prefix="beam-sdk-")
    env["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main([])


def write_boot_command(dest: Path, env: Optional[dict] = None) -> Path:
    """An executable running this module with the current interpreter (plus ``env`` exported)."""
    lines = ["#!/bin/sh"]
    lines += [f"export {k}='{v}'" for k, v in (env or {}).items()]
    lines.append(f'exec "{sys.executable}" -m runners.sdk_boot "$@"')
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    dest.chmod(0o755)
    return dest


if __name__ == "__main__":
    main(sys.argv[1:])
