import pytest

from mmtard.errors import ConfigError
from mmtard.registry import Registry


def test_register_get_and_list():
    things = Registry("thing")

    @things.register("b")
    @things.register("a")
    def entry():
        return 1

    assert things.get("a") is entry and things.get("b") is entry
    assert things.names() == ["a", "b"] and "a" in things and "c" not in things and len(things) == 2


def test_unknown_name_is_a_config_error_naming_the_field_and_choices():
    things = Registry("balance")
    things.add("sigmoid", object())
    with pytest.raises(ConfigError, match=r"balance: unknown balance 'nope'; expected one of sigmoid"):
        things.get("nope")


def test_a_name_taken_by_another_entry_is_refused():
    things = Registry("thing")
    things.add("a", 1)
    things.add("a", 1)  # the same entry again is harmless (module reloads)
    with pytest.raises(ValueError, match="already registered"):
        things.add("a", 2)
