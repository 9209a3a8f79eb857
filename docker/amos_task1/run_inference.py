"""AMOS 2022 task 1 container entry point: ``python run_inference.py [gcinfer amos-task1 options]``.

Without arguments, as the AMOS 2022 organisers ran it: every ``/workspace/input/*.nii.gz`` -> the same name in
``/workspace/output``; when ``/workspace/input`` does not exist, Grand Challenge's layout
``/input/images/<socket>/<uuid>.mha`` -> ``/output/images/<output socket>/<uuid>.mha``. Weights:
``/opt/ml/model``, else the ``model/`` folder baked in next to this file.
"""

import sys

from gcinfer.entrypoint import main

if __name__ == "__main__":
    sys.exit(main("amos-task1", __file__, workspace=True))
