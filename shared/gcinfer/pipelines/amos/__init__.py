"""AMOS 2022 task 1 (CT) and task 2 (CT or MRI): the winning nnU-Net v1 ensembles (:mod:`.pipeline`), nnU-Net v1's
own pieces (:mod:`.nnunet_v1`), the ensemble arithmetic (:mod:`.ensemble`), the organ-wise post-processing
(:mod:`.postprocessing`) and the memory of a case (:mod:`.memory`)."""

from gcinfer.pipelines.amos.pipeline import add_arguments, load

__all__ = ["add_arguments", "load"]
