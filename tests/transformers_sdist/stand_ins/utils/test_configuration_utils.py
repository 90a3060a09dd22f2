"""Stand-in for transformers' tests/utils/test_configuration_utils.py, which the PyPI sdist does not ship.

`test_configuration_common.py` imports `config_common_kwargs` for `ConfigTester.check_config_arguments_init`, which
returns before reading it for a composite config (one with `sub_configs`, as LoraCaptioner's). Should it ever be
read, it fails instead of passing on made-up values.
"""


class _NotInTheSdist(dict):
    def __deepcopy__(self, memo):
        raise RuntimeError("config_common_kwargs is a stand-in: the real one is not in the transformers sdist")

    def items(self):
        self.__deepcopy__(None)


config_common_kwargs = _NotInTheSdist()
