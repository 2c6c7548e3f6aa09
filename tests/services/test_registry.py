import pytest

from services.config import Config
from services.registry import build_reward, get_reward_class, register, reward_names
from services.reward import Reward, RewardInfo, RewardOutput


def test_builtin_rewards_are_registered_by_file_stem():
    assert "jpeg_compressibility" in reward_names()
    cls = get_reward_class("jpeg_compressibility")
    assert cls.name == "jpeg_compressibility" and cls.__module__.endswith(".jpeg_compressibility")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError) as e:
        get_reward_class("jpeg_compresibility")
    assert "jpeg_compresibility" in str(e.value) and "jpeg_compressibility" in str(e.value)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['qualty'\].*valid keys: \['quality'\]"):
        build_reward("jpeg_compressibility", {"qualty": 80})


def test_invalid_config_value_is_rejected():
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", {"quality": 0})


class _Config(Config):
    pass


class _Dummy(Reward):
    Config = _Config

    def load(self, device="cpu"):
        pass

    def score(self, images, prompts):
        return [RewardOutput(0.0) for _ in images]

    def info(self):
        return RewardInfo("dummy", 0.0, 0.0)


def test_register_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register("jpeg_compressibility")(_Dummy)
    with pytest.raises(ValueError, match="snake_case"):
        register("NotSnake")(_Dummy)
    with pytest.raises(TypeError):
        register("not_a_reward")(object)


def test_the_same_class_imported_again_registers_idempotently():
    # Under Ray a module may be imported twice, making two class objects with one qualified name.
    original = get_reward_class("jpeg_compressibility")
    twin = type(
        original.__name__, (original,), {"__module__": original.__module__, "__qualname__": original.__qualname__}
    )
    try:
        assert register("jpeg_compressibility")(twin) is twin
        assert get_reward_class("jpeg_compressibility") is twin
    finally:
        register("jpeg_compressibility")(original)
    assert get_reward_class("jpeg_compressibility") is original


def test_reward_modules_named_by_the_environment_register(tmp_path, monkeypatch):
    (tmp_path / "extra_reward_for_registry_test.py").write_text(
        "from services.registry import register\n"
        "from tests.services.test_registry import _Dummy\n\n"
        "@register('extra_for_registry_test')\n"
        "class Extra(_Dummy):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REWARDFLEET_REWARD_MODULES", " extra_reward_for_registry_test, ")
    assert "extra_for_registry_test" in reward_names()
    monkeypatch.setenv("REWARDFLEET_REWARD_MODULES", "no_such_reward_module_here")
    with pytest.raises(ImportError, match=r"REWARDFLEET_REWARD_MODULES.*'no_such_reward_module_here'"):
        reward_names()
