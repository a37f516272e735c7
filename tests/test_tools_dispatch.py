"""Dispatch: validation, failures as results, timeouts, truncation, and the built-in tools."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

import tools
from chatglm_core.errors import ConfigError
from chatglm_core.settings import Settings
from tools import builtins
from tools.builtins import register_builtins
from tools.registry import ToolError, ToolRegistry


@pytest.fixture
def registry():
    reg = ToolRegistry(timeout=5, max_result_chars=100)
    register_builtins(reg)
    return reg


def add_tool(reg: ToolRegistry, func, **kw):
    reg.register(func, **kw)
    return func


def test_invalid_arguments_are_an_error_result(registry):
    def pick(colour: str, count: int = 1):
        """Pick.

        Args:
            colour: A colour (choices: ["red", "blue"])
            count: How many.
        """
        return colour * count

    add_tool(registry, pick)
    cases = [
        ({}, "'colour' is a required property"),
        ({"colour": "green"}, "colour: 'green' is not one of ['red', 'blue']"),
        ({"colour": "red", "count": "2"}, "count: '2' is not of type 'integer'"),
    ]
    for args, expected in cases:
        result = registry.dispatch("pick", args)
        assert not result.ok and expected in result.content and "'pick'" in result.content
    assert registry.dispatch("pick", {"colour": "red", "count": 2}).content == "redred"
    assert not registry.dispatch("pick", ["red"]).ok


def test_exceptions_become_results(registry):
    def explode(x: int) -> int:
        """Explode.

        Args:
            x: Anything.
        """
        return 1 // x

    def refuse() -> str:
        """Refuse politely."""
        raise ToolError("not today, ask again tomorrow")

    add_tool(registry, explode)
    add_tool(registry, refuse)
    crashed = registry.dispatch("explode", {"x": 0})
    assert not crashed.ok and crashed.content == "Error: tool 'explode' raised ZeroDivisionError: integer division or modulo by zero"
    assert registry.dispatch("refuse", {}).content == "Error: not today, ask again tomorrow"


def test_a_hung_tool_times_out_without_blocking(registry):
    release = threading.Event()

    def hang() -> str:
        """Never returns on its own."""
        release.wait(30)
        return "late"

    registry.register(hang, timeout=0.3)
    start = time.monotonic()
    result = registry.dispatch("hang", {})
    assert time.monotonic() - start < 2
    assert not result.ok and result.content == "Error: tool 'hang' timed out after 0.3 s."
    release.set()
    assert registry.dispatch("calculator", {"expression": "1+1"}).content == "2"  # the registry still works


def test_truncation_and_json_encoding(registry):
    def big() -> str:
        """A long text."""
        return "x" * 250

    def structured() -> dict:
        """A dict."""
        return {"city": "北京", "when": datetime(2024, 1, 2)}

    add_tool(registry, big)
    add_tool(registry, structured)
    result = registry.dispatch("big", {})
    assert result.truncated and result.content == "x" * 100 + "\n…[truncated: 150 more characters]"
    assert registry.dispatch("structured", {}).content == '{"city": "北京", "when": "2024-01-02 00:00:00"}'


def test_unknown_and_disabled_tools_list_what_is_available(registry):
    result = registry.dispatch("nope", {})
    assert not result.ok and "unknown tool 'nope'" in result.content and "calculator" in result.content
    session = registry.copy()
    session.set_enabled("calculator", False)
    assert not session.dispatch("calculator", {"expression": "1"}).ok
    assert "calculator" not in [t["function"]["name"] for t in session.get_tools()]
    assert registry.dispatch("calculator", {"expression": "1"}).ok  # other sessions are untouched
    with pytest.raises(ConfigError, match="no tool named 'zzz'"):
        session.set_enabled("zzz", False)


def test_manual_tools_are_not_dispatched(registry):
    registry.load_yaml_text("tools:\n  - {name: ask, description: d, manual: true}\n", "t.yaml")
    result = registry.dispatch("ask", {})
    assert not result.ok and "answered by the user" in result.content


def test_same_name_from_another_source_clashes(registry):
    def calculator(expression: str) -> str:
        """Mine.

        Args:
            expression: E.
        """

    with pytest.raises(ConfigError, match="'calculator' is already defined by builtin"):
        registry.register(calculator)


@pytest.mark.parametrize("bad_name", ["", "has space", "x" * 65, "dots.bad"])
def test_tool_names_are_checked(bad_name):
    with pytest.raises(ConfigError, match="name"):
        ToolRegistry().register(lambda: 1, spec={"name": bad_name, "description": "d"})


# --- built-ins ----------------------------------------------------------------------------
@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 10", 1024), ("7 // 2", 3), ("7 % 4", 3), ("-3 + +1", -2),
    ("sqrt(16)", 4.0), ("round(pi, 4)", 3.1416), ("max(1, 5, 3)", 5), ("log(e)", 1.0), ("factorial(5)", 120),
    ("2 ** -1", 0.5), ("1e3 / 8", 125.0), ("hypot(3, 4)", 5.0),
])
def test_calculator_values(registry, expression, value):
    result = registry.dispatch("calculator", {"expression": expression})
    assert result.ok and json.loads(result.content) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('echo hi')", "not allowed"),
    ("open('/etc/passwd').read()", "not allowed"),
    ("(1).__class__", "not allowed"),
    ("x + 1", "not allowed"),
    ("[1, 2][0]", "not allowed"),
    ("'a' * 3", "not allowed"),
    ("lambda: 1", "not allowed"),
    ("sqrt(x=4)", "positional arguments only"),
    ("9 ** 9 ** 9", "more than 4096 bits"),
    ("10 ** 100000", "more than 4096 bits"),
    ("(10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000)", "more than 4096 bits"),
    ("2.0 ** 100000", "exponents are limited"),
    ("exp(1000)", "too large"),
    ("factorial(100000)", "between 0 and 1000"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "cannot compute"),
    ("(-8) ** 0.5", "not a real number"),
    ("2 ^ 3", "write 2 ** 10"),
    ("1 +", "not a valid expression"),
    ("1 + \ud800", "not a valid expression"),  # a lone surrogate: ast.parse raised UnicodeEncodeError
    ("1 + 1\x00", "not a valid expression"),
    ("1" * 600, "longer than 500"),
])
def test_calculator_refuses_unsafe_or_huge_input_quickly(registry, expression, message):
    start = time.monotonic()
    result = registry.dispatch("calculator", {"expression": expression})
    assert time.monotonic() - start < 1
    assert not result.ok and message in result.content


def test_random_number_generator_is_chatglm3_compatible(registry):
    values = {int(registry.dispatch("random_number_generator", {"seed": s, "range": [3, 6]}).content) for s in range(50)}
    assert values == {3, 4, 5}
    same = [registry.dispatch("random_number_generator", {"seed": 7, "range": [0, 1000]}).content for _ in range(2)]
    assert same[0] == same[1]
    assert not registry.dispatch("random_number_generator", {"seed": 1, "range": [5, 5]}).ok
    assert not registry.dispatch("random_number_generator", {"seed": 1, "range": [1, 2, 3]}).ok


def test_get_current_time(registry):
    result = registry.dispatch("get_current_time", {"timezone": "Asia/Tokyo"})
    stamp = datetime.fromisoformat(result.content.split(" ")[0])
    assert stamp.utcoffset() == timedelta(hours=9)
    assert abs(stamp - datetime.now(ZoneInfo("UTC"))) < timedelta(minutes=1)
    bad = registry.dispatch("get_current_time", {"timezone": "Mars/Olympus"})
    assert not bad.ok and "IANA" in bad.content


def test_get_weather_offline_is_a_clear_error(registry, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(builtins, "WEATHER_URL", f"http://127.0.0.1:{port}/{{city}}")
    result = registry.dispatch("get_weather", {"city_name": "Beijing"})
    assert not result.ok and "unreachable" in result.content and "offline" in result.content


def test_shell_tool_only_when_enabled():
    assert "shell" not in tools.build_registry(Settings()).names()
    reg = tools.build_registry(Settings(enable_shell_tool=True))
    result = json.loads(reg.dispatch("shell", {"command": "echo hello; echo oops >&2; exit 3"}).content)
    assert result == {"exit_code": 3, "stdout": "hello\n", "stderr": "oops\n"}


def test_module_level_api_uses_the_default_registry(monkeypatch):
    monkeypatch.setattr(tools, "_default", tools.build_registry(Settings()))

    @tools.register_tool
    def greet(name: str) -> str:
        """Greet someone.

        Args:
            name: Who.
        """
        return f"hello {name}"

    assert "greet" in [t["function"]["name"] for t in tools.get_tools()]
    assert tools.dispatch_tool("greet", {"name": "Ada"}).content == "hello Ada"
    assert tools.dispatch_tool("calculator", {"expression": "6*7"}).content == "42"
