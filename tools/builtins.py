"""The built-in tools. They are ordinary typed functions and register exactly like user tools.

`register_builtins(registry, settings)` adds them; the `shell` tool only when
settings.enable_shell_tool is on, since it runs whatever the model writes on this machine.
"""

from __future__ import annotations

import json
import random
import subprocess
import urllib.parse
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tools.calculator import evaluate
from tools.registry import ToolError, ToolRegistry
from tools.schema import function_spec

WEATHER_URL = "https://wttr.in/{city}?format=j1"
WEATHER_TIMEOUT = 5.0


def random_number_generator(
    seed: Annotated[int, "The random seed used by the generator", True],
    range: Annotated[tuple[int, int], "The range of the generated numbers", True],  # ChatGLM3's name
) -> int:
    """Generates a random number x, s.t. range[0] <= x < range[1]"""
    low, high = range
    if low >= high:
        raise ToolError(f"range must be [low, high] with low < high, got {list(range)}")
    return random.Random(seed).randrange(low, high)


def get_current_time(timezone: str = "UTC") -> str:
    """Get the current date and time in a time zone.

    Args:
        timezone: An IANA time zone name such as "Europe/Paris" or "Asia/Shanghai".
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {timezone!r}: use an IANA name like Europe/Paris or UTC") from None
    now = datetime.now(zone)
    return f"{now.isoformat(timespec='seconds')} ({now:%A}, {timezone})"


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly, e.g. "sqrt(2) * (3 + 4) ** 2".

    Args:
        expression: Numbers, + - * / // % ** and parentheses, pi, e, and functions such as sqrt, sin, log.
    """
    return evaluate(expression)


def get_weather(city_name: str) -> dict[str, Any]:
    """Get the current weather for a city.

    Args:
        city_name: The name of the city to be queried, e.g. "Beijing".
    """
    import httpx

    url = WEATHER_URL.format(city=urllib.parse.quote(city_name))
    try:
        resp = httpx.get(url, timeout=WEATHER_TIMEOUT, follow_redirects=True)
        resp.raise_for_status()
        current = resp.json()["current_condition"][0]
    except httpx.HTTPError as e:
        raise ToolError(f"the weather service is unreachable ({type(e).__name__}); "
                        "this machine may be offline, try again later") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise ToolError(f"the weather service sent an unexpected answer for {city_name!r}") from None
    keep = ["temp_C", "FeelsLikeC", "humidity", "weatherDesc", "observation_time"]
    out = {k: current.get(k) for k in keep}
    if isinstance(out["weatherDesc"], list) and out["weatherDesc"]:
        out["weatherDesc"] = out["weatherDesc"][0].get("value")
    return out


def shell(command: str) -> str:
    """Run a command in the Linux shell of the machine hosting this app and return its output.

    Args:
        command: The shell command line to run.
    """
    try:
        proc = subprocess.run(command, shell=True, capture_output=True, text=True,
                              timeout=SHELL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ToolError(f"the command ran longer than {SHELL_TIMEOUT:g} s and was stopped") from None
    return json.dumps({"exit_code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}, ensure_ascii=False)


SHELL_TIMEOUT = 30.0
BUILTINS = [random_number_generator, get_current_time, calculator, get_weather]


#: What an expression looks like, for the grammar of a constrained call (`x-grammar-pattern`: the
#: grammar's, not the schema check's, so a wrong expression still gets the calculator's own advice):
#: forced calculator calls on SmolLM2 wrote "{6} * {9}", "= 240" and prose without it.
EXPRESSION_PATTERN = r"^[0-9a-z(-][0-9a-z(). +*/%,-]{0,79}$"


def register_builtins(registry: ToolRegistry, settings: Any = None) -> None:
    for func in BUILTINS:
        spec = function_spec(func)
        if func is calculator:
            spec["parameters"]["properties"]["expression"]["x-grammar-pattern"] = EXPRESSION_PATTERN
        registry.register(func, spec=spec, source="builtin")
    if settings is not None and settings.enable_shell_tool:
        registry.register(shell, source="builtin", timeout=SHELL_TIMEOUT + 5)  # let it kill the command first
