# Community-pipeline entry file for diffusers' ``custom_pipeline=`` loader.
#
#   DiffusionPipeline.from_pretrained(path_or_repo, custom_pipeline="<this repo>/pipelines/msgm_pipeline.py")
#
# diffusers picks the one ``DiffusionPipeline`` subclass defined outside the ``diffusers`` package that this file
# exposes. The class itself is defined once, in ``diffusers_msgm.pipelines.pipeline_msgm`` (``pip install
# diffusers-msgm``); this file only re-exports it so that the Hub/``custom_pipeline`` road reaches the same code.
from diffusers_msgm.pipelines.pipeline_msgm import MSGMPipeline

__all__ = ["MSGMPipeline"]
