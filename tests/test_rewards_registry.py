"""The reward registry: names, the --rewards spec, and loading plugin files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import rewards
from rewards import registry

EXAMPLE_PLUGIN = Path(__file__).parent / "plugins" / "example_reward_plugin.py"
BUILT_IN = ["boxed", "content", "count", "format", "format_strict", "math", "ocr"]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the built-in rewards only (plugins other test modules loaded are
    dropped), and leaves no registrations behind."""
    built_in = {name: fn for name, fn in registry._REGISTRY.items() if name in BUILT_IN}
    monkeypatch.setattr(registry, "_REGISTRY", built_in)
    monkeypatch.setattr(registry, "_LOADED_PLUGINS", {})
    yield


def test_builtins_are_available() -> None:
    assert rewards.available() == BUILT_IN
    for name in BUILT_IN:
        assert callable(rewards.get_reward(name))


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown reward 'ocrr'.*boxed, content, count"):
        rewards.get_reward("ocrr")


def test_register_and_replace() -> None:
    @rewards.register("shout")
    def shout(completions: list[str], **_: list) -> list[float | None]:
        return [float(c.isupper()) for c in completions]

    assert rewards.get_reward("shout") is shout
    assert "shout" in rewards.available()
    assert shout(["HI", "hi"]) == [1.0, 0.0]  # the decorator returns the function unchanged
    with pytest.raises(ValueError, match="'shout' is already registered"):
        rewards.register("shout")(lambda completions, **_: [])

    def quiet(completions: list[str], **_: list) -> list[float | None]:
        return [0.0] * len(completions)

    rewards.register("shout", replace=True)(quiet)
    assert rewards.get_reward("shout") is quiet


@pytest.mark.parametrize("bad", ["", "a,b", "a:b", " a"])
def test_register_rejects_names_the_spec_cannot_express(bad: str) -> None:
    with pytest.raises(ValueError, match="reward name"):
        rewards.register(bad)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ocr:1.0,format:0.5", [("ocr", 1.0), ("format", 0.5)]),
        ("ocr", [("ocr", 1.0)]),
        (" ocr : 2 , format ", [("ocr", 2.0), ("format", 1.0)]),
        ("format:-0.5", [("format", -0.5)]),
        ({"ocr": 1.0, "format": 0.5}, [("ocr", 1.0), ("format", 0.5)]),
        ({"ocr": None, "count": 3}, [("ocr", 1.0), ("count", 3.0)]),
    ],
)
def test_parse_reward_spec(spec: str | dict, expected: list[tuple[str, float]]) -> None:
    assert rewards.parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("ocr:1.0,", "part '' has no reward name"),
        ("ocr:abc", "'ocr:abc': weight 'abc' is not a number"),
        ("ocr:", "'ocr:': weight '' is not a number"),
        (":1.0", "part ':1.0' has no reward name"),
        ("ocr:nan", "finite"),
        ("ocr:inf,format", "finite"),
        ("ocr:1:2", "weight '1:2' is not a number"),
        ("ocr,ocr:2", "ocr more than once"),
        ({"ocr": "x"}, "weight 'x' is not a number"),
        ({"ocr": True}, "finite number"),
        ({}, "empty"),
    ],
)
def test_parse_reward_spec_errors_name_the_bad_part(spec: str | dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rewards.parse_reward_spec(spec)


def test_load_example_plugin() -> None:
    added = rewards.load_plugin(EXAMPLE_PLUGIN)
    assert added == ["example_brevity", "example_mentions_solution"]
    assert set(added) <= set(rewards.available())
    brevity = rewards.get_reward("example_brevity")
    assert brevity(["x" * 10, "x" * 60, "x" * 200], solution=["", "", ""]) == [1.0, 0.5, 0.0]
    mentions = rewards.get_reward("example_mentions_solution")
    assert mentions(["it is 42", "it is 41", "?"], solution=["42", "42", None]) == [1.0, 0.0, None]
    # Loading it again (say from a config and the command line) is harmless.
    assert rewards.load_plugin(str(EXAMPLE_PLUGIN)) == added


def test_plugin_may_override_a_builtin_explicitly(tmp_path: Path) -> None:
    plugin = tmp_path / "my_ocr.py"
    plugin.write_text(
        "from rewards import register\n"
        "@register('ocr', replace=True)\n"
        "def ocr(completions, **columns):\n"
        "    return [0.25] * len(completions)\n"
    )
    assert rewards.load_plugin(plugin) == ["ocr"]
    assert rewards.get_reward("ocr")(["a"], solution=["a"]) == [0.25]


def test_missing_plugin_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"reward plugin file not found: .*nope\.py"):
        rewards.load_plugin("/nonexistent/nope.py")


def test_plugin_that_raises_registers_nothing(tmp_path: Path) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "from rewards import register\n"
        "@register('half_done')\n"
        "def half_done(completions, **columns):\n"
        "    return [1.0] * len(completions)\n"
        "raise RuntimeError('oops in plugin')\n"
    )
    with pytest.raises(
        rewards.PluginError, match=r"broken.py failed to import: RuntimeError: oops"
    ):
        rewards.load_plugin(plugin)
    assert "half_done" not in rewards.available()


def test_plugin_clashing_with_a_builtin_fails_clearly(tmp_path: Path) -> None:
    plugin = tmp_path / "clash.py"
    plugin.write_text("from rewards import register\nregister('ocr')(lambda c, **k: [])\n")
    with pytest.raises(rewards.PluginError, match="'ocr' is already registered"):
        rewards.load_plugin(plugin)
    assert rewards.get_reward("ocr") is registry._REGISTRY["ocr"]


def test_plugin_with_a_syntax_error(tmp_path: Path) -> None:
    plugin = tmp_path / "typo.py"
    plugin.write_text("def f(:\n")
    with pytest.raises(rewards.PluginError, match=r"typo\.py failed to import: SyntaxError"):
        rewards.load_plugin(plugin)
