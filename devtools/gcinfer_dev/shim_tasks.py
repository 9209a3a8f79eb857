"""Tasks for Grand Challenge's runtime (sagemaker-shim) and the checks of what it uploaded; used by
``containers/shim-test.sh`` as ``python -m gcinfer_dev.shim_tasks prepare|check``.

``prepare NAME WORK``: one task per fixture case (each input image under its own uuid, as Grand Challenge names them,
and ``inputs.json``), then a task whose first input is not an image; the files as the local S3 serves them
(``WORK/s3/<bucket>/<key>``, the model tarball in bucket ``gc-models``), the task lists per mode
(``WORK/tasks-<mode>.json``, the corrupt task last: the shim stops at the first failing task), and the library's
own output for each good task computed here on the host (``WORK/reference/<pk>/``).

``check WORK --mode MODE``: per task, what the shim recorded and uploaded (``WORK/out/<mode>/``): a good task has
``return_code`` 0, the duration of its mode, exactly the expected output keys, bytes identical to the host's output,
and an output socket that panimg imports as one uint8 image on the input's grid; the corrupt task has a non-zero
``return_code``, nothing uploaded, and the process's log for that task names the file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

from gcinfer import cli
from gcinfer.cases import discover_cases
from gcinfer.config import Sockets, read_json
from gcinfer_dev import container_config
from gcinfer_dev.checks import convert_to_mha, header_geometry, task, write_inputs_json
from gcinfer_dev.panimg_check import check_socket

MODES = ("exec", "invoke")
INPUT_BUCKET, OUTPUT_BUCKET, MODEL_BUCKET = "gc-inputs", "gc-outputs", "gc-models"
CORRUPT = "corrupt"
RESULT = ".sagemaker_shim/inference_result.json"
TIMEOUT_SECONDS = 900


def image_name(name: str, case: str, socket: str) -> str:
    """A uuid file name per image (reproducible), as Grand Challenge names its inputs."""
    return f"{uuid.uuid5(uuid.NAMESPACE_URL, f'gcinfer/{name}/{case}/{socket}')}.mha"


def shim_task(pk: str, folder: Path, mode: str) -> dict:
    """The shim's definition of one task whose input files are ``folder``'s (in bucket ``gc-inputs`` under ``pk/``)."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return {
        "pk": pk,
        "inputs": [{"relative_path": f, "bucket_name": INPUT_BUCKET, "bucket_key": f"{pk}/{f}"} for f in files],
        "output_bucket_name": OUTPUT_BUCKET,
        "output_prefix": f"{mode}/{pk}/",
        "timeout": TIMEOUT_SECONDS,
    }


def prepare(name: str, fixtures: Path, work: Path, model_tarball: Path) -> None:
    """Write the tasks, their S3 files and the host's reference outputs (see the module docstring)."""
    config_path = container_config(name)
    sockets = Sockets.of(read_json(config_path), config_path)
    cases = discover_cases(fixtures / name / "input", work / "unused", sockets)
    folders = {}
    for k, case in enumerate(cases):
        folder = folders[f"case-{k}"] = work / "s3" / INPUT_BUCKET / f"case-{k}"
        for socket in sockets.inputs:
            convert_to_mha(case.inputs[socket], folder / "images" / socket / image_name(name, case.name, socket))
        write_inputs_json(folder, sockets)
    corrupt = folders[CORRUPT] = work / "s3" / INPUT_BUCKET / CORRUPT
    shutil.copytree(folders["case-0"], corrupt)
    for path in (corrupt / "images" / sockets.inputs[0]).iterdir():
        path.write_bytes(b"not an image")
    (work / "s3" / MODEL_BUCKET).mkdir(parents=True)
    shutil.copy(model_tarball, work / "s3" / MODEL_BUCKET / f"{name}-model.tar.gz")
    for mode in MODES:
        tasks = [shim_task(pk, folder, mode) for pk, folder in folders.items()]
        (work / f"tasks-{mode}.json").write_text(json.dumps(tasks, indent=2))
    command = [*task(name).extra_args, "--device", "cpu", "--model", str(fixtures / name / "model")]
    for pk, folder in folders.items():
        if pk != CORRUPT:
            output = work / "reference" / pk
            argv = ["--quiet", "--no-progress", task(name).command, *command, "--config", str(config_path)]
            if cli.main([*argv, "--input", str(folder), "--output", str(output)]) != 0:
                raise SystemExit(f"the library's own run failed on {folder}")


def files_under(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def task_log(log: Path, pk: str) -> list[dict]:
    """The shim's JSON log records of task ``pk`` that came from the algorithm's process."""
    records = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("task") == pk and record.get("internal") is False:
            records.append(record)
    return records


def check_task(name: str, work: Path, mode: str, definition: dict) -> tuple[list[str], float | None]:
    """Problems of one task's result and uploads, and its duration in seconds."""
    pk, out = definition["pk"], work / "out" / mode
    uploaded = files_under(out / definition["output_prefix"])
    result_text = uploaded.pop(RESULT, None)
    if result_text is None:
        return [f"no {RESULT} uploaded"], None
    result = json.loads(result_text)
    config_path = container_config(name)
    sockets = Sockets.of(read_json(config_path), config_path)
    first = next(
        i["relative_path"]
        for i in definition["inputs"]
        if i["relative_path"].startswith(f"images/{sockets.inputs[0]}/")
    )
    duration_field = f"{mode}_duration"
    other = "exec_duration" if mode == "invoke" else "invoke_duration"
    seconds = _seconds(result.get(duration_field))
    problems = []
    if pk == CORRUPT:
        if result["return_code"] == 0:
            problems.append("return_code 0 for a corrupt input")
        if uploaded:
            problems.append(f"uploaded {sorted(uploaded)} for a failed task")
        if not any(first in r["log"] and r["source"] == "stderr" for r in task_log(out / "shim.log", pk)):
            problems.append(f"no error line of the process names {first}")
        return problems, seconds
    if result["return_code"] != 0:
        problems.append(f"return_code {result['return_code']}: {result.get('user_process_last_stderr_lines')}")
    if seconds is None or result.get(other) is not None:
        problems.append(f"{duration_field} {result.get(duration_field)}, {other} {result.get(other)}")
    reference = files_under(work / "reference" / pk)
    if sorted(uploaded) != sorted(reference):
        problems.append(f"output keys {sorted(uploaded)} != expected {sorted(reference)}")
    problems += [
        f"{key}: bytes differ from the host's output"
        for key in reference
        if uploaded.get(key) not in (None, reference[key])
    ]
    expected = header_geometry(work / "s3" / INPUT_BUCKET / pk / first)
    problems += check_socket(out / definition["output_prefix"] / "images" / sockets.output, expected)
    return problems, seconds


def _seconds(value: str | float | None) -> float | None:
    """A pydantic timedelta as JSON (ISO 8601 ``PT12.5S``, or seconds) in seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = value.removeprefix("PT")
    minutes, _, rest = text.rpartition("M")
    return float(minutes or 0) * 60 + float(rest.rstrip("S") or 0)


def check(name: str, work: Path, mode: str) -> bool:
    """Check every task of ``mode``; print one line per task and the mean duration of the good ones."""
    ok, durations = True, []
    for definition in json.loads((work / f"tasks-{mode}.json").read_text()):
        problems, seconds = check_task(name, work, mode, definition)
        ok &= not problems
        if definition["pk"] != CORRUPT and seconds is not None:
            durations.append(seconds)
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        shown = "-" if seconds is None else f"{seconds:.1f}s"
        print(f"  {name} {mode} {definition['pk']}: {mode}_duration {shown}, {status}")
    if durations:
        mean = sum(durations) / len(durations)
        print(f"  {name} {mode}: mean {mode}_duration {mean:.1f}s over {len(durations)} case(s)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gcinfer_dev.shim_tasks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="tasks, S3 files and the host's reference outputs")
    make.add_argument("name")
    make.add_argument("work", type=Path)
    make.add_argument("--fixtures", type=Path, required=True)
    make.add_argument("--model-tarball", type=Path, required=True)
    verify = commands.add_parser("check", help="what the shim recorded and uploaded for each task")
    verify.add_argument("name")
    verify.add_argument("work", type=Path)
    verify.add_argument("--mode", choices=MODES, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.name, args.fixtures, args.work, args.model_tarball)
        return 0
    return 0 if check(args.name, args.work, args.mode) else 1


if __name__ == "__main__":
    sys.exit(main())
