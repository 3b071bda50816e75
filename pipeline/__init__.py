"""`gptoss pipeline`: every stage once, in order (pipeline/run.py)."""

from gptoss.pipeline.run import PipelineError, PipelineSummary, pipeline

__all__ = ["PipelineError", "PipelineSummary", "pipeline"]
