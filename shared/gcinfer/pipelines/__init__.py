"""The pipelines, one sub-package each, behind one contract (:mod:`gcinfer.pipelines.base`).

:data:`PIPELINES` is the only list of them: the command line, the container entry points and the development tools
read it.
"""

from gcinfer.pipelines.base import PIPELINES, Pipeline, PipelineModule, PipelineSpec, spec_of

__all__ = ["PIPELINES", "Pipeline", "PipelineModule", "PipelineSpec", "spec_of"]
