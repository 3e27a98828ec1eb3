"""The context windows table: lookups by model name, config overrides, unknown models."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.config import ConfigError, load_settings
from extproc.context.models import BUILTIN, FAMILY_MARGINS, ModelLimits, ModelTable


@pytest.fixture
def table() -> ModelTable:
    return ModelTable({}, default_window=8192)


@pytest.mark.parametrize(
    ("model", "window", "max_output", "family"),
    [
        ("gpt-4o", 128_000, 16_384, "o200k"),
        ("gpt-4o-2024-08-06", 128_000, 16_384, "o200k"),
        ("gpt-4o-2024-05-13", 128_000, 4_096, "o200k"),
        ("gpt-4o-mini-2024-07-18", 128_000, 16_384, "o200k"),
        ("gpt-4.1-mini", 1_047_576, 32_768, "o200k"),
        ("gpt-4.1-nano-2025-04-14", 1_047_576, 32_768, "o200k"),
        ("gpt-5-mini", 400_000, 128_000, "o200k"),
        ("gpt-5-chat-latest", 128_000, 16_384, "o200k"),
        ("o3-mini-2025-01-31", 200_000, 100_000, "o200k"),
        ("o1-mini", 128_000, 65_536, "o200k"),
        ("gpt-4", 8_192, 8_192, "cl100k"),
        ("gpt-4-0613", 8_192, 8_192, "cl100k"),
        ("gpt-4-turbo-2024-04-09", 128_000, 4_096, "cl100k"),
        ("gpt-3.5-turbo-0125", 16_385, 4_096, "cl100k"),
        ("claude-3-5-sonnet-20241022", 200_000, 8_192, "claude"),
        ("claude-3-5-haiku-latest", 200_000, 8_192, "claude"),
        ("claude-sonnet-4-20250514", 200_000, 64_000, "claude"),
        ("claude-sonnet-4-5-20250929", 200_000, 64_000, "claude"),
        ("claude-opus-4-1-20250805", 200_000, 32_000, "claude"),
        ("claude-3-opus-20240229", 200_000, 4_096, "claude"),
        # routing and cloud vendor prefixes
        ("openai/gpt-4o-mini", 128_000, 16_384, "o200k"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", 200_000, 8_192, "claude"),
        ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", 200_000, 64_000, "claude"),
        ("GPT-4o", 128_000, 16_384, "o200k"),
    ],
)
def test_known_models_and_their_snapshots(
    table: ModelTable, model: str, window: int, max_output: int, family: str
) -> None:
    limits = table.lookup(model)
    assert (limits.window, limits.max_output, limits.family) == (window, max_output, family)


@pytest.mark.parametrize("model", ["llama3.1:8b", "m", "", "gpt-4x", "gpt-40", "mistral-large"])
def test_unknown_models_get_the_default(table: ModelTable, model: str) -> None:
    """A prefix only counts when it ends at a boundary: gpt-4x is not gpt-4."""
    assert table.lookup(model) == ModelLimits(8192)
    assert table.lookup(model).safety_margin == FAMILY_MARGINS["other"]


def test_reasoning_models_are_marked(table: ModelTable) -> None:
    assert table.lookup("o3").reasoning and table.lookup("gpt-5-nano").reasoning
    assert not table.lookup("gpt-4o").reasoning and not table.lookup("gpt-5-chat-latest").reasoning


def test_margins_per_family(table: ModelTable) -> None:
    assert table.lookup("gpt-4").safety_margin == 0.02
    assert table.lookup("gpt-4o").safety_margin == 0.05
    assert table.lookup("claude-3-haiku-20240307").safety_margin == 0.25


def test_every_builtin_entry_is_sane() -> None:
    for name, limits in BUILTIN.items():
        assert limits.window >= 4096, name
        assert 0 < limits.max_output <= limits.window, name
        assert limits.family in FAMILY_MARGINS, name


def test_overrides_add_models_and_change_known_ones() -> None:
    table = ModelTable(
        {
            "my-model": {"window": 4096},
            "gpt-4o": {"window": 64_000, "margin": 0.0},
            "Claude-3-Haiku": {"max_output": 2000},
        },
        default_window=16_384,
    )
    assert table.lookup("my-model") == ModelLimits(4096)
    assert table.lookup("my-model-v2") == ModelLimits(4096)  # a prefix, like the built-ins
    gpt = table.lookup("gpt-4o-2024-11-20")
    assert (gpt.window, gpt.max_output, gpt.safety_margin) == (64_000, 16_384, 0.0)
    haiku = table.lookup("claude-3-haiku-20240307")
    assert (haiku.window, haiku.max_output, haiku.family) == (200_000, 2000, "claude")
    assert table.lookup("gpt-4o-mini").window == 64_000  # the override is the nearest prefix
    assert table.lookup("unknown").window == 16_384


def test_config_file_models_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "version = 1\n"
        "context_default_window = 32000\n"
        "context_step = 0.1\n"
        '[context.models."my-model"]\nwindow = 4096\nmax_output = 1024\nfamily = "o200k"\n'
        '[context.models."gpt-4o"]\nmargin = 0.08\n'
    )
    settings = load_settings(path, {}, environ={})
    assert settings.context == {
        "models": {
            "my-model": {"window": 4096, "max_output": 1024, "family": "o200k"},
            "gpt-4o": {"margin": 0.08},
        }
    }
    assert settings.context_default_window == 32000 and settings.context_step == 0.1


def test_models_table_from_the_environment_and_flags_is_toml_text() -> None:
    env = {"SESSIONGATE_CONTEXT": 'models."local" = {window = 2048, reasoning = true}'}
    settings = load_settings(None, {}, environ=env)
    assert settings.context == {"models": {"local": {"window": 2048, "reasoning": True}}}
    flags = {"context": 'models."x" = {window = 1000}'}
    assert load_settings(None, flags, environ=env).context == {"models": {"x": {"window": 1000}}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('models."m" = {window = 100}', "window must be an integer >= 256"),
        ('models."m" = {window = 4096, margin = 2}', "margin must be a number from 0 to 1"),
        ('models."m" = {window = 4096, family = "bert"}', "family must be one of"),
        ('models."m" = {window = 4096, colour = 1}', "unknown key(s) colour"),
        ('models."m" = {max_output = 10}', "window is required for a new model"),
        ('models."m" = {window = "big"}', "window must be an integer"),
        ("windows = 3", "unknown key(s) windows"),
        ("models = 3", "expected [context.models"),
        ("models = [", "context:"),
    ],
)
def test_bad_context_tables_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"context": text}, environ={})
    assert str(err.value).startswith("context: ") and message in str(err.value)


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"context_default_window": "100"}, "context_default_window"),
        ({"context_step": "0"}, "context_step"),
        ({"context_step": "1.5"}, "context_step"),
        ({"context_max_messages": "-1"}, "context_max_messages"),
        ({"context_output_tokens": "-5"}, "context_output_tokens"),
        ({"context_reasoning_output_tokens": "-5"}, "context_reasoning_output_tokens"),
        ({"context_image_tokens": "-1"}, "context_image_tokens"),
        ({"context_facts_share": "0.9"}, "context_facts_share"),
        ({"context_facts_share": "-0.1"}, "context_facts_share"),
    ],
)
def test_bad_context_settings(flags: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, flags, environ={})
    assert str(err.value).startswith(setting)


def test_context_settings_from_the_environment() -> None:
    env = {
        "SESSIONGATE_CONTEXT_ENABLED": "false",
        "SESSIONGATE_CONTEXT_MAX_MESSAGES": "40",
        "SESSIONGATE_CONTEXT_STEP": "0.5",
    }
    settings = load_settings(None, {}, environ=env)
    assert not settings.context_enabled
    assert settings.context_max_messages == 40 and settings.context_step == 0.5
