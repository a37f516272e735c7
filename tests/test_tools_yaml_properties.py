"""Property-based tests of the YAML tool loader: whatever a tools file holds, loading it either
registers tools or raises ONE ConfigError naming the file (and, for a bad entry, the tool and the
field) — never another exception, and a bad file registers nothing.

EXAMPLES generated documents per property (HYPOTHESIS_EXAMPLES).
"""

from __future__ import annotations

import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

tools_yaml = pytest.importorskip("tools.yaml_tools", reason="the tools package is not merged into this branch yet")
from chatglm_core.errors import ConfigError  # noqa: E402
from tools.builtins import register_builtins  # noqa: E402
from tools.registry import ToolRegistry  # noqa: E402

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "200"))
prop = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOURCE = "/configs/generated-tools.yaml"
FILE_PROBLEM = re.compile(r"(not valid YAML|the file.s top-level keys must be|nested too deeply)")
ENTRY_PROBLEM = re.compile(r"tool '.*': (.*: \S|each tool must be a mapping)", re.S)

scalars = st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=10)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
names = st.sampled_from(["weather", "convert_units", "calculator", "t-1", "has space", "", "x" * 70]) | \
    st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True) | scalars
schemas = st.one_of(
    st.just({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
    st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "strng", 3])}, optional={
        "properties": st.dictionaries(st.sampled_from(["q", "s", "x", "path"]), st.fixed_dictionaries(
            {"type": st.sampled_from(["string", "integer", "nope"])}), max_size=3) | values,
        "required": st.lists(st.sampled_from(["q", "s", "x", "path"]), max_size=3) | values}),
    values)
# callables that are safe to import: real ones with various signatures, and ones that don't exist
pythons = st.sampled_from(["json:loads", "json:dumps", "posixpath:basename", "posixpath:join", "math:pi",
                           "json", "json:", ":loads", "zz_no_such_module_q:f", "json:no_such_attr",
                           "tools.examples.units:convert_units", "tools.calculator:calculate"]) | scalars
https = st.fixed_dictionaries({"url": st.sampled_from(["http://127.0.0.1:9/x", "https://e.invalid", "ftp://x"]) |
                                      scalars},
                              optional={"method": st.sampled_from(["GET", "post", "PUT"]) | scalars,
                                        "headers": st.dictionaries(st.text(max_size=5), st.text(max_size=5)) | values,
                                        "verb": scalars})
entries = st.fixed_dictionaries({}, optional={
    "name": names, "description": st.text(max_size=20) | scalars, "parameters": schemas,
    "python": pythons, "http": https | values, "manual": st.booleans() | scalars,
    "timeout": st.floats(-1, 30) | scalars, "colour": scalars}) | values
valid_entries = st.builds(
    lambda name, description, runner: {"name": name, "description": description, **runner},
    st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,10}", fullmatch=True), st.text(min_size=1, max_size=15).filter(str.strip),
    st.sampled_from([
        {"manual": True},
        {"manual": True, "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
        {"python": "json:loads", "parameters": {"type": "object", "properties": {"s": {"type": "string"}},
                                                "required": ["s"]}},
        {"python": "posixpath:basename", "parameters": {"type": "object", "properties": {"p": {"type": "string"}},
                                                        "required": ["p"]}, "timeout": 2},
        {"http": {"url": "http://127.0.0.1:9/price", "method": "post"}},
    ]))


def mostly_valid(draw_valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    return st.integers(0, 2).flatmap(lambda k: anything if k == 2 else draw_valid)


documents = mostly_valid(
    st.fixed_dictionaries({"tools": st.lists(mostly_valid(valid_entries, entries), max_size=4)}),
    st.fixed_dictionaries({"tools": st.lists(entries, max_size=4) | values}, optional={"extra": values}) | values)


_builtins: list[ToolRegistry] = []


def fresh_registry() -> ToolRegistry:
    """The built-in tools (so YAML names can clash with them), registered once, copied per example."""
    if not _builtins:
        registry = ToolRegistry()
        register_builtins(registry)
        _builtins.append(registry)
    return _builtins[0].copy()


def check_load(text: str) -> None:
    registry = fresh_registry()
    before = set(registry.names(include_disabled=True))
    try:
        loaded = registry.load_yaml_text(text, SOURCE)
    except ConfigError as e:
        message = str(e)
        event("ConfigError")
        assert message.startswith(SOURCE + ": "), message
        problems = message[len(SOURCE) + 2:].removeprefix("\n  - ").split("\n  - ")
        for problem in problems:  # a file-level problem, or one naming the tool and the field at fault
            assert FILE_PROBLEM.match(problem) or ENTRY_PROBLEM.match(problem), (problem, message)
        assert set(registry.names(include_disabled=True)) == before  # all or none
    else:
        event(f"loaded {len(loaded)} tool(s)")
        assert set(registry.names(include_disabled=True)) == before | set(loaded)
        for name in loaded:
            assert registry.get(name).source == SOURCE


@prop
@given(documents)
def test_any_document_loads_or_gives_one_config_error(doc):
    check_load(yaml.safe_dump(doc, allow_unicode=True))


yamlish = st.lists(st.sampled_from(["tools:", "\n", "  - ", "name: ", "description: ", "parameters: ", "{", "}",
                                    "[", "]", ":", "&a ", "*a", "!!python/object:os.system", "'", '"', "\t", "---",
                                    "manual: true", "python: json:loads", "%YAML 1.1", "? ", "|", ">"]) |
                   st.text(max_size=5), max_size=25).map("".join)


@prop
@given(yamlish | st.text(max_size=200))
def test_any_text_loads_or_gives_one_config_error(text):
    check_load(text)


def test_deep_nesting_and_unsafe_tags_are_config_errors():
    deep_schema = "tools:\n  - {name: t, description: d, manual: true, parameters: {type: object, properties: {a: " + \
        "{items: " * 400 + "{}" + "}" * 402 + "}\n"
    for text in ["[" * 2000, "tools: " + "{a: " * 2000, "tools: !!python/object/apply:os.system ['true']", deep_schema]:
        with pytest.raises(ConfigError) as e:
            ToolRegistry().load_yaml_text(text, SOURCE)
        assert str(e.value).startswith(SOURCE)
