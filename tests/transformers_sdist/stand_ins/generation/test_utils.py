"""Stand-in for transformers' tests/generation/test_utils.py, which the PyPI sdist does not ship.

`test_modeling_common.py` imports `GenerationTesterMixin` to check that a model which can `generate()` has generation
tests. LoraCaptioner's are tests/test_generation.py (greedy, beam, sampling, the cache), not this class.
"""


class GenerationTesterMixin:
    """Marks a tester whose model's generation tests live elsewhere (here: tests/test_generation.py)."""
