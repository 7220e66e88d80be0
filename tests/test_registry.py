import pytest

from gendd_framework.errors import ConfigError
from gendd_framework.plugins import import_plugin, load_plugins
from gendd_framework.registry import LOSSES, METHODS, MODELS, Registry


def test_unknown_name_lists_closest_matches():
    with pytest.raises(ConfigError) as err:
        MODELS.get("resnet2O")
    msg = str(err.value)
    assert "unknown model 'resnet2O'" in msg
    assert "'resnet20'" in msg and "gendd-list model" in msg


def test_unknown_kwarg_names_the_accepted_ones():
    with pytest.raises(ConfigError) as err:
        METHODS.build({"name": "kd", "temprature": 2.0}, student=None)
    msg = str(err.value)
    assert "'temprature' (did you mean 'temperature'?)" in msg
    assert "alpha" in msg and "beta" in msg


def test_missing_required_argument():
    reg = Registry("thing")
    reg.add("needs_x", lambda x, y=1: (x, y))
    with pytest.raises(ConfigError, match="missing required argument.*x"):
        reg.build({"name": "needs_x"})
    assert reg.build({"name": "needs_x", "x": 3}) == (3, 1)


def test_missing_name_key():
    with pytest.raises(ConfigError, match="needs a 'name' key"):
        MODELS.build({"num_classes": 10})


def test_aliases_wildcards_and_duplicates():
    reg = Registry("thing")

    @reg.register("alpha_one", aliases=["a1"])
    def alpha_one(v: int = 1):
        """First line of doc."""
        return v

    reg.add("alpha_two", lambda: 2)
    reg.add("beta", lambda: 3)
    assert reg.get("a1") is alpha_one
    assert reg.names("alpha*") == ["alpha_one", "alpha_two"]
    assert reg.names("*", include_aliases=True) == ["a1", "alpha_one", "alpha_two", "beta"]
    with pytest.raises(ConfigError, match="already registered"):
        reg.add("beta", lambda: 4)
    reg.add("beta", lambda: 5, force=True)
    assert reg.build("beta") == 5
    assert reg.build({"name": "a1", "v": 7}) == 7


def test_runtime_kwargs_do_not_override_config():
    reg = Registry("thing")
    reg.add("f", lambda a=0, b=0: (a, b))
    assert reg.build({"name": "f", "a": 1}, a=9, b=2) == (1, 2)


def test_torchvision_and_timm_prefixes_build_offline():
    tv = MODELS.build({"name": "tv:resnet18", "num_classes": 7})
    assert tv.fc.out_features == 7
    tm = MODELS.build({"name": "timm:test_resnet", "num_classes": 5})
    assert tm.get_classifier().out_features == 5
    with pytest.raises(ConfigError, match="Did you mean"):
        MODELS.get("tv:resnet1800")
    with pytest.raises(ConfigError, match="download"):
        MODELS.build({"name": "timm:test_resnet", "pretrained": True})


def test_plugin_file_registers_and_is_imported_once(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from gendd_framework.registry import LOSSES\n"
        "@LOSSES.register('tmp_zero_loss')\n"
        "def tmp_zero_loss(scale: float = 1.0):\n"
        "    '''A loss that is always zero.'''\n"
        "    return scale * 0\n"
    )
    import_plugin(str(plugin))
    import_plugin(str(plugin))  # a second import must not raise "already registered"
    assert LOSSES.build({"name": "tmp_zero_loss", "scale": 2.0}) == 0


def test_missing_plugin_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="plugin path not found"):
        import_plugin(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="cannot be imported"):
        import_plugin("no_such_module_xyz")


def test_registry_folder_example_is_loaded():
    load_plugins()
    assert "mimic" in METHODS and "logit_mse" in LOSSES


def test_registrations_and_plugin_imports_end_with_the_isolated_block(tmp_path):
    """The per-test isolation of tests/conftest.py: what a block registers (itself or through a plugin)
    and the names it replaces are back as they were after it, and the plugin registers again later."""
    from conftest import isolated_components, registries

    plugin = tmp_path / "iso_plugin.py"
    plugin.write_text(
        "from gendd_framework.registry import LOSSES\n"
        "@LOSSES.register('iso_loss')\n"
        "def iso_loss():\n"
        "    return 1\n"
    )
    names = {reg.kind: reg.names(include_aliases=True) for reg in registries()}
    kd = METHODS.get("kd")
    with isolated_components():
        import_plugin(str(plugin))
        METHODS.add("kd", lambda: None, force=True)
        MODELS.add("iso_model", lambda: None, aliases=["iso_alias"])
        assert "iso_loss" in LOSSES and "iso_alias" in MODELS and METHODS.get("kd") is not kd
    assert {reg.kind: reg.names(include_aliases=True) for reg in registries()} == names
    assert METHODS.get("kd") is kd
    with isolated_components():
        import_plugin(str(plugin))  # not remembered as imported: it runs and registers again
        assert LOSSES.build("iso_loss") == 1
    assert "iso_loss" not in LOSSES


def test_entry_point_plugins_are_loaded(monkeypatch):
    import sys
    import types

    import gendd_framework.plugins as plugins

    source = (
        "from gendd_framework.registry import LOSSES\n"
        "@LOSSES.register('ep_loss')\n"
        "def ep_loss():\n"
        "    return 42\n"
    )

    class FakeEntryPoint:
        value = "fake_ep_plugin"

        def load(self):  # registration happens only when the entry point is loaded
            module = types.ModuleType("fake_ep_plugin")
            exec(source, module.__dict__)
            sys.modules["fake_ep_plugin"] = module
            return module

    seen = {}

    def fake_entry_points(group):
        seen["group"] = group
        return [FakeEntryPoint()]

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    assert "ep_loss" not in LOSSES
    load_plugins()
    assert seen["group"] == "gendd_framework.plugins"
    assert LOSSES.build("ep_loss") == 42
