"""Engines are plug-ins: each of the table's engines is an EnginePlugin under its table name, the config's
choices are the table's, `serve.engine: auto` picks by asking the plug-ins, and an engine's config rules
refuse a plan. Nothing is loaded."""

from __future__ import annotations

import typing

import pytest

from qatune import plugins
from qatune.config import ServeConfig, load_config
from qatune.serve.engine_plugin import AutoFit, EnginePlugin


def cpu_runtime():
    from qatune.runtime import Runtime

    return Runtime(device="cpu")


def test_every_engine_of_the_table_is_a_plugin_of_its_name():
    engines = plugins.loaded("engine")
    assert list(engines) == ["hf", "llamacpp", "vllm"]
    for name, plugin in engines.items():
        assert isinstance(plugin, EnginePlugin) and plugin.name == name
    assert typing.get_args(ServeConfig.model_fields["engine"].annotation) == ("auto", *plugins.names("engine"))


def test_auto_takes_the_ready_engine_the_plugins_rank_first(monkeypatch):
    from qatune.serve.recipe import pick_engine

    llamacpp = plugins.load("engine", "llamacpp")
    monkeypatch.setattr(llamacpp, "auto_fit", lambda device: AutoFit(0, False, "it is off for this test"))
    assert pick_engine("auto", "cpu") == ("hf", "serve.engine auto: a CPU, and it is off for this test")
    monkeypatch.setattr(llamacpp, "auto_fit", lambda device: AutoFit(0, True, "it is on for this test"))
    assert pick_engine("auto", "cpu") == ("llamacpp", "serve.engine auto: a CPU, and it is on for this test")
    monkeypatch.setattr(llamacpp, "auto_fit", lambda device: None)  # never on this device
    assert pick_engine("auto", "cpu")[0] == "hf"
    assert pick_engine("vllm", "cpu") == ("vllm", "serve.engine vllm")  # a named engine is not asked


def test_the_chosen_engines_rules_refuse_the_plan(monkeypatch, tiny_model_dir):
    """serve.max_batch_size above what llama.cpp holds: its `validate` says so, and a plan that picks it (here
    under auto) refuses with the key and the fix."""
    from qatune.serve.protocol import ServeError
    from qatune.serve.recipe import plan

    llamacpp = plugins.load("engine", "llamacpp")
    config = load_config(None, [f"model={tiny_model_dir}", "serve.engine=auto", "serve.max_batch_size=300"])
    [problem] = llamacpp.validate(config)
    assert problem.key == "serve.max_batch_size" and "255 or less" in problem.fix
    assert plugins.load("engine", "hf").validate(config) == []
    monkeypatch.setattr(llamacpp, "auto_fit", lambda device: AutoFit(0, True, "on for this test"))
    monkeypatch.setattr(llamacpp, "check_here", lambda runtime: None)
    with pytest.raises(ServeError, match=r"(?s)serve.max_batch_size: 300 is above .* 255 or less"):
        plan(config, cpu_runtime())
