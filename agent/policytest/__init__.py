"""`authz-agent policy test`: a policy's expected decisions, kept beside it and run through the engine `run` uses."""

from agent.policytest.runner import CaseResult, FileResult, run_file, run_file_async

__all__ = ["CaseResult", "FileResult", "run_file", "run_file_async"]
