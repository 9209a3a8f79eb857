"""AutoPET II container entry point: ``python run_inference.py [gcinfer autopet2 options]``.

Grand Challenge layout: ``/input/images/<pet socket>/<uuid>.mha`` and ``/input/images/<ct socket>/<uuid>.mha``
-> ``/output/images/<output socket>/<uuid>.mha`` (sockets in ``config.json``). Weights: ``/opt/ml/model``, else
the ``model/`` folder baked in next to this file.
"""

import sys

from gcinfer.entrypoint import main

if __name__ == "__main__":
    sys.exit(main("autopet2", __file__))
