"""Errors shared by the fine-tune's modules."""


class FinetuneError(RuntimeError):
    """A fine-tune that cannot run (no base model, no labelled data) or whose members all failed."""
