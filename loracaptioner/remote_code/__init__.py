"""The code Hub users download and execute (`trust_remote_code=True`): every saved model folder carries these three
files next to its weights, and `auto_map` points at them.

The boundary, enforced by tests/test_safe_loading.py: they import only torch and transformers (plus numpy and PIL,
which transformers' image processing needs) and one another, never the rest of `loracaptioner`, and do no I/O of
their own when imported. Everything else in the package (training, data, publishing, the CLI) is tooling around them.
"""
