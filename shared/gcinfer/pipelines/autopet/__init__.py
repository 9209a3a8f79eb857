"""AutoPET II: the DynUNet fold ensemble on the PET of each PET/CT pair (:mod:`.pipeline`), its checkpoints
(:mod:`.networks`) and the memory of a case (:mod:`.memory`)."""

from gcinfer.pipelines.autopet.pipeline import add_arguments, load

__all__ = ["add_arguments", "load"]
