"""Run tasks through Grand Challenge's runtime (sagemaker-shim) against a local S3 (moto), as Grand Challenge does.

Runs inside the test-only image (containers/shim/Dockerfile, /opt/shim/bin/python), as root, with no network:

1. a moto S3 server on 127.0.0.1:5000; the files under ``WORK/s3/<bucket>/`` uploaded to it (the tasks' inputs and
   the model tarball);
2. ``sagemaker-shim invoke -t TASKS`` with the environment Grand Challenge sets (the image's command and user, the
   model tarball's URI, the memory limit, the API method; ``GRAND_CHALLENGE_COMPONENT_*``), its log to
   ``OUT/shim.log``;
3. every object of the output bucket downloaded to ``OUT/<key>``.

Usage: run-tasks.py WORK OUT --tasks FILE --mode exec|invoke --cmd JSON --user USER --model-key KEY
       [--memory-mb N] [--paths DIR]
``--paths DIR`` puts /input, /output, /opt/ml/... under DIR (the shim's test variables): a run on the host.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

ENDPOINT = "http://127.0.0.1:5000"
INPUT_BUCKET, OUTPUT_BUCKET, MODEL_BUCKET = "gc-inputs", "gc-outputs", "gc-models"


def b64j(value: object) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def upload_tree(s3, root: Path) -> None:
    """Every file under ``root/<bucket>/`` to that bucket, under its relative path."""
    for bucket in sorted(p for p in root.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bucket.name)
        for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket.name, str(path.relative_to(bucket)))


def download_bucket(s3, bucket: str, target: Path) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            path = target / item["Key"]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(path))


def shim_environment(args: argparse.Namespace) -> dict[str, str]:
    """The environment of ``sagemaker-shim``: Grand Challenge's variables, the S3 endpoint and test credentials."""
    env = {
        **os.environ,
        "AWS_S3_ENDPOINT_URL": ENDPOINT,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GRAND_CHALLENGE_COMPONENT_CMD_B64J": b64j(json.loads(args.cmd)),
        "GRAND_CHALLENGE_COMPONENT_ENTRYPOINT_B64J": b64j(None),
        "GRAND_CHALLENGE_COMPONENT_USER": args.user,
        "GRAND_CHALLENGE_COMPONENT_MODEL": f"s3://{MODEL_BUCKET}/{args.model_key}",
        "GRAND_CHALLENGE_COMPONENT_MAX_MEMORY_MB": str(args.memory_mb),
        "GRAND_CHALLENGE_COMPONENT_API_METHOD": args.mode,
        "GRAND_CHALLENGE_COMPONENT_RUNTIME_OUTPUT_BUCKET_NAME": OUTPUT_BUCKET,
        "GRAND_CHALLENGE_COMPONENT_RUNTIME_OUTPUT_PREFIX": f"{args.mode}/runtime/",
        "GRAND_CHALLENGE_COMPONENT_SIGNING_KEY_HEX": "00" * 32,
    }
    if args.paths is not None:
        root = args.paths
        env.update(
            {
                "GRAND_CHALLENGE_COMPONENT_INPUT_PATH": str(root / "input"),
                "GRAND_CHALLENGE_COMPONENT_OUTPUT_PATH": str(root / "output"),
                "GRAND_CHALLENGE_COMPONENT_LINKED_INPUT_PARENT": str(root / "opt/ml/input/data"),
                "GRAND_CHALLENGE_COMPONENT_MODEL_DEST": str(root / "opt/ml/model"),
                "GRAND_CHALLENGE_COMPONENT_WRITABLE_DIRECTORIES": str(root / "opt/ml/model"),
                "GRAND_CHALLENGE_COMPONENT_POST_CLEAN_DIRECTORIES": str(root / "opt/ml/model"),
                "GC_INPUT": str(root / "input"),
                "GC_OUTPUT": str(root / "output"),
                "GC_MODEL": str(root / "opt/ml/model"),
            }
        )
        (root / "output").mkdir(parents=True, exist_ok=True)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", type=Path, required=True)
    parser.add_argument("--mode", choices=("exec", "invoke"), required=True)
    parser.add_argument("--cmd", required=True, help="the image's CMD as JSON")
    parser.add_argument("--user", default="", help="GRAND_CHALLENGE_COMPONENT_USER (the image's USER)")
    parser.add_argument("--model-key", required=True)
    parser.add_argument("--memory-mb", type=int, default=15 * 1024)
    parser.add_argument("--paths", type=Path, default=None)
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=5000, verbose=False)
    server.start()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=ENDPOINT,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        upload_tree(s3, args.work / "s3")
        s3.create_bucket(Bucket=OUTPUT_BUCKET)
        args.out.mkdir(parents=True, exist_ok=True)
        command = [str(Path(sys.executable).with_name("sagemaker-shim")), "invoke", "-t", args.tasks.read_text()]
        with (args.out / "shim.log").open("w") as log:
            code = subprocess.run(command, env=shim_environment(args), stdout=log, stderr=subprocess.STDOUT).returncode
        download_bucket(s3, OUTPUT_BUCKET, args.out)
    finally:
        server.stop()
    print(f"run-tasks: sagemaker-shim invoke ({args.mode}) exited {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
