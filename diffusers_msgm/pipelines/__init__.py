from .pipeline_msgm import MSGMPipeline

__all__ = ["MSGMPipeline"]
from .pipeline_msgm_inpaint import MSGMInpaintPipeline  # noqa: E402
from .pipeline_msgm_reconstruction import (  # noqa: E402
    MSGMReconstructionPipeline,
    MSGMReconstructionPipelineOutput,
)

__all__ += ["MSGMInpaintPipeline", "MSGMReconstructionPipeline", "MSGMReconstructionPipelineOutput"]
