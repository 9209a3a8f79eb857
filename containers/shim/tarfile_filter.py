"""Test image only: ``TarFile.extractall(filter="data")`` on a Python older than 3.11.4 (Debian bookworm's 3.11.2,
the stand-in base image's), which sagemaker-shim calls to extract the model tarball.

On Grand Challenge the shim is a self-contained binary with its own Python 3.12; here it runs on the image's Python.
Where that Python lacks extraction filters, this module (imported by a ``.pth`` file of /opt/shim's venv) checks the
members as the ``data`` filter would refuse them (absolute paths, ``..``, links, devices) and then extracts.
"""

import inspect
import os
import tarfile

_extractall = tarfile.TarFile.extractall


def _extractall_with_data_filter(self, path=".", members=None, *, numeric_owner=False, filter=None):
    for member in self.getmembers() if members is None else members:
        name = os.path.normpath(member.name)
        if os.path.isabs(name) or name.split(os.sep)[0] == ".." or not (member.isfile() or member.isdir()):
            raise tarfile.TarError(f"{member.name}: refused by the data filter")
    return _extractall(self, path, members, numeric_owner=numeric_owner)


if "filter" not in inspect.signature(_extractall).parameters:
    tarfile.TarFile.extractall = _extractall_with_data_filter
