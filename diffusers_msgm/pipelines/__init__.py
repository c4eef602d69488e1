from .pipeline_msgm import MSGMPipeline

__all__ = ["MSGMPipeline"]
