"""Schema derivation: a typed, documented function → its OpenAI spec (table-style)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import pytest

from chatglm_core.errors import ConfigError
from tools.registry import ToolRegistry
from tools.schema import function_spec


def _doc(func):
    func.__doc__ = "Test tool.\n\nArgs:\n    x: The x."
    return func


def t_str(x: str): ...
def t_int(x: int): ...
def t_float(x: float): ...
def t_bool(x: bool): ...
def t_enum(x: Literal["c", "f"]): ...
def t_list(x: list[int]): ...
def t_optional(x: Optional[str] = None): ...  # noqa: UP045 - the spelling under test
def t_union_none(x: int | None = None): ...
def t_dict(x: dict[str, float]): ...
def t_nested(x: dict[str, list[int]]): ...
def t_tuple(x: tuple[int, str]): ...
def t_default(x: int = 3): ...


@pytest.mark.parametrize("func, prop, required", [
    (t_str, {"type": "string"}, ["x"]),
    (t_int, {"type": "integer"}, ["x"]),
    (t_float, {"type": "number"}, ["x"]),
    (t_bool, {"type": "boolean"}, ["x"]),
    (t_enum, {"type": "string", "enum": ["c", "f"]}, ["x"]),
    (t_list, {"type": "array", "items": {"type": "integer"}}, ["x"]),
    (t_optional, {"type": ["string", "null"]}, None),
    (t_union_none, {"type": ["integer", "null"]}, None),
    (t_dict, {"type": "object", "additionalProperties": {"type": "number"}}, ["x"]),
    (t_nested, {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}}}, ["x"]),
    (t_tuple, {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
               "minItems": 2, "maxItems": 2}, ["x"]),
    (t_default, {"type": "integer"}, None),
])
def test_types_become_json_schema(func, prop, required):
    spec = function_spec(_doc(func))
    assert spec["name"] == func.__name__
    assert spec["description"] == "Test tool."
    assert spec["parameters"]["properties"]["x"] == {**prop, "description": "The x."}
    assert spec["parameters"].get("required") == required


def test_chatglm3_annotated_style():
    def get_weather(
        city_name: Annotated[str, "The name of the city to be queried", True],
        days: Annotated[int, "How many days", False] = 1,
    ) -> str:
        """
        Get the current weather for `city_name`
        """

    spec = function_spec(get_weather)
    assert spec == {
        "name": "get_weather",
        "description": "Get the current weather for `city_name`",
        "parameters": {
            "type": "object",
            "properties": {
                "city_name": {"type": "string", "description": "The name of the city to be queried"},
                "days": {"type": "integer", "description": "How many days"},
            },
            "required": ["city_name"],
        },
    }


def test_annotated_required_flag_overrides_default():
    def f(a: Annotated[int, "A", False], b: Annotated[int, "B", True] = 2):
        """F."""

    assert function_spec(f)["parameters"]["required"] == ["b"]


def test_google_docstring_enum_choices():
    def drink(beverage: str):
        """Drink something.

        Args:
            beverage: What to drink (choices: ["tea", "coffee"])
        """

    prop = function_spec(drink)["parameters"]["properties"]["beverage"]
    assert prop == {"type": "string", "enum": ["tea", "coffee"], "description": "What to drink"}


class Custom:
    pass


def no_hint(x):
    """Doc.

    Args:
        x: X.
    """


def no_doc(x: int): ...


def no_arg_doc(x: int):
    """Doc."""


def custom_class(x: Custom):
    """Doc.

    Args:
        x: X.
    """


def star_args(*args: int):
    """Doc."""


def annotated_no_description(x: Annotated[int, 3, True]):
    """Doc."""


def annotated_bad_flag(x: Annotated[int, "X", "yes"]):
    """Doc."""


@pytest.mark.parametrize("func, message", [
    (no_hint, "missing a type hint"),
    (no_doc, "no docstring"),
    (no_arg_doc, "no description for the argument 'x'"),
    (custom_class, "custom class"),
    (star_args, "parameter 'args'"),
    (annotated_no_description, "parameter 'x'"),
    (annotated_bad_flag, "must be True or False"),
])
def test_bad_definitions_fail_when_defined(func, message):
    with pytest.raises(ConfigError) as err:
        ToolRegistry().register(func)
    assert f"'{func.__name__}'" in str(err.value)
    assert message in str(err.value)


def test_decorator_returns_the_function_and_registers_it():
    registry = ToolRegistry()

    @registry.register
    def add(a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: First.
            b: Second.
        """
        return a + b

    assert add(1, 2) == 3
    assert registry.get_tools()[0]["function"]["name"] == "add"
    assert registry.dispatch("add", {"a": 2, "b": 5}).content == "7"


def test_string_annotations_are_resolved():
    # this module uses `from __future__ import annotations`: every hint here is a string
    def f(x: Annotated[list[str], "Names", True]):
        """Greets."""

    assert isinstance(f.__annotations__["x"], str)
    assert function_spec(f)["parameters"]["properties"]["x"] == {
        "type": "array", "items": {"type": "string"}, "description": "Names"}
