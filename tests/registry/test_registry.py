"""The plugin registry: load_registry with fresh registries, per-plugin error reports,
clashes that name both packages, and third-party kinds validating inside specs with no
change to the core."""

from __future__ import annotations

import importlib
import tomllib
import importlib.metadata as metadata
import sys
import textwrap
import types
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from hybridlab.core.config import Component, Config, Dims
from hybridlab.core.errors import SpecError
from hybridlab.core.spec import dump_spec, load_model_spec
from hybridlab.registry import (CORE_CATEGORIES, PluginRecord, Registry, default_registry, hookimpl,
                                load_registry)

# the source of truth for the built-ins: their entry points in pyproject.toml
BUILTIN_MODULES = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())[
    "project"]["entry-points"]["hybridlab"]
HYBRIDLAB_VERSION = metadata.version("hybridlab")


# ---------------------------------------------------------------- a third-party plugin's pieces


class ToyMixerConfig(Config):
    """A toy mixer that a third-party package might ship.

    Second line of the docstring (not part of the kind's summary)."""

    kind: Literal["toy"] = "toy"
    width: int = Field(default=2, ge=1)
    """Must divide d_model."""
    gate: Component("normalization") = Field(default_factory=lambda: {"kind": "rmsnorm"}, validate_default=True)
    """A nested component of a core category."""
    inner: Component("ffn") | None = None
    """An optional nested component."""

    def check(self, dims: Dims):
        if dims.d_model % self.width:
            yield "width", f"must divide d_model ({dims.d_model}), got {self.width}"


class ToyMixer(torch.nn.Module):
    def __init__(self, config: ToyMixerConfig, dims: Dims) -> None:
        super().__init__()


class WaveConfig(Config):
    """A positional scheme from the same third-party package."""

    kind: Literal["wave"] = "wave"


class OtherConfig(Config):
    kind: Literal["other"] = "other"


class LooseConfig(BaseModel):  # forgets extra="forbid"
    kind: Literal["loose"] = "loose"


class IgnoreConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    kind: Literal["ignore"] = "ignore"


class StrKindConfig(Config):  # kind is a str, not a Literal
    kind: str = "strkind"


class NoKindConfig(Config):
    width: int = 1


class AttentionLike(Config):
    kind: Literal["attention"] = "attention"


class GreedyConfig(Config):
    kind: Literal["greedy"] = "greedy"


def module(*args):
    return None


def reference(x):
    return x


def fast(x):
    return x


def plugin(fn) -> types.SimpleNamespace:
    """An in-memory plugin whose hybridlab_register is ``fn``."""
    return types.SimpleNamespace(hybridlab_register=hookimpl(fn))


def registers(category, name, config, **extra):
    def fn(register):
        register.kind(category, name, config=config, module=module, **extra)
    return plugin(fn)


def toy_plugin():
    def fn(register):
        register.kind("mixer", "toy", config=ToyMixerConfig, module=ToyMixer)
        register.kind("position", "wave", config=WaveConfig, module=module)
        register.impl("mixer", "toy", "reference", fn=reference)
        register.impl("mixer", "toy", "fast", fn=fast, devices={"cpu"}, priority=1, tolerance=3.0)
    return plugin(fn)


def fresh(*plugins: tuple[str, object]) -> Registry:
    return load_registry(list(plugins), entry_points=False)


def record(registry: Registry, name: str) -> PluginRecord:
    [found] = [r for r in registry.plugins if r.name == name]
    return found


def kind_names(registry: Registry) -> list[str]:
    return [f"{k.category}.{k.name}" for k in registry.kinds()]


# ---------------------------------------------------------------- a plugin that works


def test_load_registry_good_plugin():
    registry = fresh(("acme", toy_plugin()))
    rec = record(registry, "acme")
    assert rec.ok and rec.error is None
    assert rec.registered == ["mixer.toy", "position.wave", "mixer.toy:reference", "mixer.toy:fast"]
    assert (rec.package, rec.version) == ("acme", "")
    assert kind_names(registry) == ["mixer.toy", "position.wave"]
    toy = registry.kind("mixer", "toy")
    assert (toy.config, toy.module, toy.owner.plugin, toy.owner.package) == (
        ToyMixerConfig, ToyMixer, "acme", "acme")
    assert toy.doc == "A toy mixer that a third-party package might ship."
    assert str(toy.owner) == "acme"
    assert registry.find("mixer", "nope") is None
    assert registry.find("nocategory", "toy") is None


def test_impls_best_first():
    registry = fresh(("acme", toy_plugin()))
    impls = registry.impls("mixer", "toy")
    assert [i.name for i in impls] == ["fast", "reference"]
    fast_impl = impls[0]
    assert fast_impl.devices == frozenset({"cpu"}) and fast_impl.tolerance == 3.0
    assert fast_impl.cannot_serve(None, "cuda", torch.float32, training=True) == "does not run on cuda (runs on cpu)"
    assert fast_impl.cannot_serve(None, "cpu", torch.float32, training=True) is None
    assert registry.impls("mixer", "missing") == []

    def same_priority(register):
        register.kind("mixer", "toy", config=ToyMixerConfig, module=ToyMixer)
        for name in ("zeta", "reference", "alpha"):
            register.impl("mixer", "toy", name, fn=fast)
    registry = fresh(("acme", plugin(same_priority)))
    assert [i.name for i in registry.impls("mixer", "toy")] == ["alpha", "zeta", "reference"]


def test_load_registry_is_fresh_each_time():
    with_toy = fresh(("acme", toy_plugin()))
    without = fresh()
    assert with_toy.find("mixer", "toy") is not None
    assert without.find("mixer", "toy") is None and without.kinds() == [] and without.plugins == []
    assert set(without.categories) == set(CORE_CATEGORIES)
    assert default_registry().find("mixer", "toy") is None


def test_module_plugin_uses_its_package():
    mod = types.ModuleType("acme_norms.scalenorm")
    mod.__package__ = "acme_norms"

    class ScaleNormConfig(Config):
        kind: Literal["scalenorm"] = "scalenorm"

    @hookimpl
    def hybridlab_register(register):
        register.kind("normalization", "scalenorm", config=ScaleNormConfig, module=module)

    mod.hybridlab_register = hybridlab_register
    registry = fresh(("scalenorm", mod))
    rec = record(registry, "scalenorm")
    assert rec.ok and (rec.package, rec.module) == ("acme_norms", "acme_norms.scalenorm")
    assert registry.kind("normalization", "scalenorm").owner.package == "acme_norms"


# ---------------------------------------------------------------- broken plugins: reported and skipped


def test_plugin_that_raises_is_reported_and_skipped():
    def boom(register):
        register.kind("mixer", "other", config=OtherConfig, module=module)  # staged, then dropped
        raise RuntimeError("boom\nsecond line of the traceback text")

    registry = fresh(("acme", toy_plugin()), ("broken", plugin(boom)), ("after", registers("position", "other",
                                                                                          OtherConfig)))
    assert record(registry, "broken").error == "hybridlab_register raised RuntimeError: boom"
    assert record(registry, "broken").registered == []
    assert record(registry, "acme").ok and record(registry, "after").ok
    assert kind_names(registry) == ["mixer.toy", "position.other", "position.wave"]


def test_kind_registered_twice_by_one_plugin():
    def twice(register):
        register.kind("mixer", "toy", config=ToyMixerConfig, module=ToyMixer)
        register.kind("mixer", "toy", config=ToyMixerConfig, module=ToyMixer)

    registry = fresh(("twice", plugin(twice)))
    assert record(registry, "twice").error == (
        "mixer kind 'toy' is registered twice: by twice (plugin 'twice') and by twice (plugin 'twice')")
    assert registry.kinds() == []


def test_kind_clash_between_plugins_names_both_and_skips_the_newcomer():
    def clash(register):
        register.kind("position", "other", config=OtherConfig, module=module)  # fine alone...
        register.kind("mixer", "toy", config=ToyMixerConfig, module=module)  # ...but this clashes

    registry = fresh(("acme", toy_plugin()), ("rival", plugin(clash)))
    error = record(registry, "rival").error
    assert error == "mixer kind 'toy' is registered twice: by acme (plugin 'acme') and by rival (plugin 'rival')"
    assert record(registry, "acme").ok
    # the first owner keeps the kind, and nothing of the newcomer's is visible
    assert registry.kind("mixer", "toy").owner.plugin == "acme"
    assert registry.find("position", "other") is None


def test_kind_clash_with_a_builtin_names_the_builtin_package():
    registry = load_registry([("rival", registers("mixer", "attention", AttentionLike))])
    error = record(registry, "rival").error
    assert error == (f"mixer kind 'attention' is registered twice: by hybridlab {HYBRIDLAB_VERSION} "
                     "(plugin 'attention') and by rival (plugin 'rival')")
    assert registry.kind("mixer", "attention").owner.package == "hybridlab"
    assert all(r.ok for r in registry.plugins if r.name != "rival")


@pytest.mark.parametrize("config, fragment", [
    (LooseConfig, "mixer kind 'loose': config LooseConfig must set model_config extra='forbid'"),
    (IgnoreConfig, "mixer kind 'ignore': config IgnoreConfig must set model_config extra='forbid'"),
    (StrKindConfig, "mixer kind 'strkind': config StrKindConfig must declare the field kind: Literal['strkind']"),
    (NoKindConfig, "mixer kind 'nokind': config NoKindConfig must declare the field kind: Literal['nokind']"),
    (OtherConfig, "mixer kind 'mismatch': config OtherConfig must declare the field kind: Literal['mismatch']"),
    (dict, "mixer kind 'notmodel': config must be a pydantic BaseModel subclass, got <class 'dict'>"),
])
def test_bad_config_is_reported_and_skipped(config, fragment):
    name = fragment.split("'")[1]

    def fn(register):
        register.kind("position", "other", config=OtherConfig, module=module)  # fine, but dropped
        register.kind("mixer", name, config=config, module=module)

    registry = fresh(("acme", toy_plugin()), ("bad", plugin(fn)))
    assert record(registry, "bad").error.startswith(fragment)
    assert record(registry, "bad").registered == []
    assert record(registry, "acme").ok
    assert kind_names(registry) == ["mixer.toy", "position.wave"]


def test_kind_in_unknown_category():
    registry = fresh(("bad", registers("sampler", "other", OtherConfig)))
    error = record(registry, "bad").error
    assert error.startswith("sampler kind 'other': unknown category 'sampler'; register.category('sampler') first")
    assert "mixer" in error


def test_module_must_be_callable():
    def fn(register):
        register.kind("mixer", "other", config=OtherConfig, module=3)

    registry = fresh(("bad", plugin(fn)))
    assert record(registry, "bad").error == "mixer kind 'other': module must be a class or callable, got 3"


def test_impl_for_unknown_kind():
    def fn(register):
        register.kind("position", "other", config=OtherConfig, module=module)
        register.impl("mixer", "zzz", "reference", fn=reference)

    registry = fresh(("acme", toy_plugin()), ("bad", plugin(fn)))
    assert record(registry, "bad").error == (
        "implementation 'reference' of mixer kind 'zzz': kind 'zzz' is not registered in 'mixer'")
    assert registry.find("position", "other") is None and record(registry, "acme").ok


def test_impls_without_a_reference():
    def fn(register):
        register.kind("mixer", "other", config=OtherConfig, module=module)
        register.impl("mixer", "other", "fast", fn=fast)
        register.impl("mixer", "other", "faster", fn=fast)

    registry = fresh(("acme", toy_plugin()), ("bad", plugin(fn)))
    assert record(registry, "bad").error == (
        "mixer kind 'other' has implementations ['fast', 'faster'] but no 'reference': "
        "every fast implementation needs a reference to be checked against")
    assert registry.find("mixer", "other") is None and registry.impls("mixer", "other") == []
    assert record(registry, "acme").ok


def test_fast_impl_for_another_plugins_kind_uses_its_reference():
    def fn(register):
        register.impl("mixer", "toy", "extra_fast", fn=fast, priority=5)

    registry = fresh(("acme", toy_plugin()), ("speedy", plugin(fn)))
    assert record(registry, "speedy").ok
    impls = registry.impls("mixer", "toy")
    assert [(i.name, i.owner.plugin) for i in impls] == [
        ("extra_fast", "speedy"), ("fast", "acme"), ("reference", "acme")]


@pytest.mark.parametrize("options, error", [
    ({"colour": "red"}, "unknown options ['colour']"),
    ({"tolerance": 0}, "tolerance must be a number > 0, got 0"),
    ({"tolerance": True}, "tolerance must be a number > 0, got True"),
    ({"tolerance": "2"}, "tolerance must be a number > 0, got '2'"),
    ({"floor": -1.0}, "floor must be a number > 0, got -1.0"),
    # a string is iterable: it became the devices {'c', 'p', 'u'}, and dispatch said "runs on c, p, u"
    ({"devices": "cpu"}, "devices must be a set of device types such as {'cpu', 'cuda'}, got 'cpu'"),
    ({"devices": {"gpu"}}, "devices: 'gpu' is not a torch device type"),
    ({"dtypes": {"float32"}}, "dtypes must be a set of torch dtypes"),
    ({"dtypes": torch.float32}, "dtypes must be a set of torch dtypes"),
    ({"backward": "cuda"}, "backward must be a set of device types"),
    ({"decode": "no"}, "decode must be True or False, got 'no'"),
    ({"priority": "high"}, "priority must be a number, got 'high'"),
    ({"supports": "always"}, "supports must be a function"),
])
def test_bad_impl_options(options, error):
    def fn(register):
        register.kind("mixer", "other", config=OtherConfig, module=module)
        register.impl("mixer", "other", "reference", fn=reference, **options)

    registry = fresh(("bad", plugin(fn)))
    assert record(registry, "bad").error.startswith("implementation 'reference' of mixer kind 'other': ")
    assert error in record(registry, "bad").error
    assert registry.kinds() == []


def test_impl_registered_twice():
    def fn(register):
        register.impl("mixer", "toy", "fast", fn=fast)

    registry = fresh(("acme", toy_plugin()), ("again", plugin(fn)))
    assert record(registry, "again").error == (
        "implementation 'fast' of mixer kind 'toy' is registered twice: by acme and by again")


def test_impl_fn_must_be_callable():
    def fn(register):
        register.kind("mixer", "other", config=OtherConfig, module=module)
        register.impl("mixer", "other", "reference", fn="reference")

    registry = fresh(("bad", plugin(fn)))
    assert record(registry, "bad").error == (
        "implementation 'reference' of mixer kind 'other': fn must be callable, got 'reference'")


def test_plugin_without_the_hook():
    registry = fresh(("empty", types.SimpleNamespace(something_else=1)), ("acme", toy_plugin()))
    assert record(registry, "empty").error == (
        "defines no hybridlab_register hook (a function of that name marked with @hybridlab.registry.hookimpl)")
    assert record(registry, "acme").ok


def test_plugin_with_a_bad_hook_signature():
    def fn(register, unknown_argument):
        pass

    registry = fresh(("odd", plugin(fn)), ("acme", toy_plugin()))
    error = record(registry, "odd").error
    assert error.startswith("invalid plugin: PluginValidationError")
    assert "unknown_argument" in error  # pluggy's reason, from the second line of its message
    assert record(registry, "acme").ok


def test_a_hook_calling_sys_exit_is_reported_and_skipped():
    import sys

    def fn(register):
        register.kind("position", "other", config=OtherConfig, module=module)
        sys.exit("plugin decided to exit")

    registry = fresh(("quitter", plugin(fn)), ("acme", toy_plugin()))
    assert record(registry, "quitter").error == "hybridlab_register raised SystemExit: plugin decided to exit"
    assert record(registry, "acme").ok and registry.find("position", "other") is None


def test_an_impl_for_a_kind_of_a_plugin_loading_later_waits_for_it():
    """Packages load in name order: one adding an implementation to another package's
    kind must not fail because its name sorts first."""
    def fn(register):
        register.impl("mixer", "toy", "extra_fast", fn=fast, priority=5)

    registry = fresh(("speedy", plugin(fn)), ("acme", toy_plugin()))
    assert record(registry, "speedy").ok and record(registry, "speedy").registered
    assert [i.name for i in registry.impls("mixer", "toy")] == ["extra_fast", "fast", "reference"]


def test_supports_that_raises_makes_the_impl_unable_to_serve():
    from hybridlab.registry.registry import Impl, Owner

    def supports(config, device, dtype):
        raise ValueError("exploded")

    impl = Impl("mixer", "toy", "fast", fast, Owner("p", "pkg", ""), supports=supports)
    assert impl.cannot_serve(None, "cpu", torch.float32, training=True) == \
        "its supports() check raised ValueError: exploded"
    assert impl.never_serves(None) == "its supports() check raised ValueError: exploded"


def test_hook_taking_no_arguments_is_allowed():
    registry = fresh(("quiet", plugin(lambda: None)))
    assert record(registry, "quiet").ok and record(registry, "quiet").registered == []


def test_new_category():
    def fn(register):
        register.category("sampler", "picks the next token")
        register.kind("sampler", "greedy", config=GreedyConfig, module=module)

    registry = fresh(("acme", plugin(fn)))
    assert record(registry, "acme").registered == ["category sampler", "sampler.greedy"]
    assert registry.categories["sampler"].owner.plugin == "acme"
    assert registry.categories["sampler"].doc == "picks the next token"
    assert [k.name for k in registry.kinds("sampler")] == ["greedy"]


@pytest.mark.parametrize("name, error", [
    ("mixer", "category 'mixer' is already registered by the core"),
    ("not an identifier", "category name 'not an identifier' is not an identifier"),
])
def test_bad_category(name, error):
    registry = fresh(("bad", plugin(lambda register: register.category(name))))
    assert record(registry, "bad").error == error
    assert set(registry.categories) == set(CORE_CATEGORIES)


def test_category_clash_between_plugins():
    registry = fresh(("first", plugin(lambda register: register.category("sampler"))),
                     ("second", plugin(lambda register: register.category("sampler"))))
    assert record(registry, "first").ok
    assert record(registry, "second").error == "category 'sampler' is already registered by first"


# ---------------------------------------------------------------- unknown kinds


def test_unknown_kind_message():
    registry = fresh(("acme", toy_plugin()), ("other", registers("mixer", "other", OtherConfig)))
    assert registry.unknown_kind_message("mixer", "tyo") == (
        "unknown mixer kind 'tyo' (did you mean 'toy'?); registered mixer kinds: other (other), toy (acme)")
    assert registry.unknown_kind_message("mixer", "transformer") == (
        "unknown mixer kind 'transformer'; registered mixer kinds: other (other), toy (acme)")
    assert registry.unknown_kind_message("ffn", "mlp") == (
        "unknown ffn kind 'mlp'; registered ffn kinds: none registered")
    assert registry.unknown_kind_message("mixr", "toy").startswith("unknown category 'mixr'; categories: block_wrapper, data, ")
    with pytest.raises(KeyError, match="did you mean 'toy'"):
        registry.kind("mixer", "tyo")


def test_unknown_kind_message_names_plugins_that_failed_to_load(site, tmp_path, monkeypatch):
    (site / "hltest_relu2.py").write_text("raise ImportError('needs triton')\n")
    _dist(site, "relu2-ffn", "0.1", "hybridlab_test_group", {"relu2": "hltest_relu2"})
    registry = load_registry([("acme", toy_plugin())], group="hybridlab_test_group")
    hint = ("; plugin 'relu2' (relu2-ffn: import failed: ImportError: needs triton) failed to load and may "
            "provide it (see `hybridlab plugins`)")
    assert registry.unknown_kind_message("mixer", "relu2") == (
        "unknown mixer kind 'relu2'; registered mixer kinds: toy (acme)" + hint)
    assert registry.unknown_kind_message("mixr", "toy").endswith(hint)
    # through a spec: the located error carries the hint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yaml").write_text("vocab_size: 8\nd_model: 8\nlayers:\n  - mixer: {kind: relu2}\n")
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml", registry=registry)
    [problem] = [p for p in info.value.problems if p.path == "layers[0].mixer"]  # (no built-ins here)
    assert str(problem).startswith("m.yaml:4: layers[0].mixer: unknown mixer kind 'relu2'")
    assert str(problem).endswith(hint)
    assert "plugin" not in fresh(("acme", toy_plugin())).unknown_kind_message("mixer", "relu2")


def test_unknown_kind_message_names_versions_free_packages_for_builtins():
    registry = default_registry()
    message = registry.unknown_kind_message("normalization", "rmsnrm")
    assert message == ("unknown normalization kind 'rmsnrm' (did you mean 'rmsnorm'?); registered normalization "
                       "kinds: layernorm (hybridlab), none (hybridlab), rmsnorm (hybridlab)")


# ---------------------------------------------------------------- the built-ins and entry points


def test_default_registry_loads_every_builtin():
    registry = default_registry()
    assert registry is default_registry()  # loaded once per process
    assert all(r.ok for r in registry.plugins), [r for r in registry.plugins if not r.ok]
    builtins = {r.name: r for r in registry.plugins if r.package == "hybridlab"}
    assert set(builtins) == set(BUILTIN_MODULES)
    assert {r.name: r.module for r in builtins.values()} == BUILTIN_MODULES
    assert all(r.version == HYBRIDLAB_VERSION for r in builtins.values())
    for kind in ("mixer.attention", "normalization.rmsnorm", "normalization.layernorm", "position.rope",
                 "position.none", "ffn.swiglu", "ffn.mlp", "embedding.token", "residual.prenorm", "head.lm",
                 "loss.cross_entropy", "optimizer.adamw", "schedule.cosine", "schedule.constant", "data.mqar"):
        assert kind in kind_names(registry)
    assert [i.name for i in registry.impls("mixer", "attention")][-1] == "reference"


def test_builtins_load_through_the_same_path_as_third_party_plugins(tmp_path, monkeypatch):
    # no entry points: the built-in modules given as plain plugin objects suffice for a spec
    registry = load_registry([(name, importlib.import_module(mod)) for name, mod in BUILTIN_MODULES.items()],
                             entry_points=False)
    assert all(r.ok for r in registry.plugins)
    assert kind_names(registry) == kind_names(load_registry())
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    spec = load_model_spec("specs/models/tiny-hybrid.yaml", registry=registry)
    assert spec == load_model_spec("specs/models/tiny-hybrid.yaml")


def _dist(site: Path, package: str, version: str, group: str, entries: dict[str, str]) -> None:
    info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    lines = [f"[{group}]"] + [f"{name} = {value}" for name, value in entries.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


TOY_MODULE = '''
from typing import Literal
from hybridlab.core.config import Config
from hybridlab.registry import hookimpl

class {cls}(Config):
    kind: Literal["{kind}"] = "{kind}"

@hookimpl
def hybridlab_register(register):
    register.kind("{category}", "{kind}", config={cls}, module=lambda config, dims: None)
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path that tests fill with modules and *.dist-info entry points."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("hltest_"):
            del sys.modules[name]


def test_entry_points_broken_import_is_reported_and_skipped(site):
    (site / "hltest_good.py").write_text(TOY_MODULE.format(cls="SpinConfig", kind="spin", category="mixer"))
    (site / "hltest_broken.py").write_text("raise ImportError('needs a GPU library')\n")
    (site / "hltest_nohook.py").write_text("x = 1\n")
    _dist(site, "acme-plugins", "0.2", "hybridlab_test_group",
          {"spin": "hltest_good", "broken": "hltest_broken", "nohook": "hltest_nohook", "gone": "hltest_missing"})
    registry = load_registry(group="hybridlab_test_group")
    by_name = {r.name: r for r in registry.plugins}
    assert set(by_name) == {"spin", "broken", "nohook", "gone"}
    assert by_name["spin"].ok and (by_name["spin"].package, by_name["spin"].version) == ("acme-plugins", "0.2")
    assert by_name["spin"].module == "hltest_good"
    assert by_name["broken"].error == "import failed: ImportError: needs a GPU library"
    assert by_name["gone"].error == "import failed: ModuleNotFoundError: No module named 'hltest_missing'"
    assert by_name["nohook"].error.startswith("defines no hybridlab_register hook")
    assert kind_names(registry) == ["mixer.spin"]
    kind = registry.kind("mixer", "spin")
    assert str(kind.owner) == "acme-plugins 0.2" and kind.owner.plugin == "spin"


def test_entry_points_third_party_clash_with_builtin_blames_the_newcomer(site):
    # "aaa-plugins" sorts before "hybridlab", but built-ins load first regardless
    (site / "hltest_clash.py").write_text(TOY_MODULE.format(cls="RMSConfig", kind="rmsnorm", category="normalization"))
    _dist(site, "aaa-plugins", "1.0", "hybridlab", {"my_rmsnorm": "hltest_clash"})
    registry = load_registry()
    by_name = {r.name: r for r in registry.plugins}
    assert by_name["my_rmsnorm"].error == (
        f"normalization kind 'rmsnorm' is registered twice: by hybridlab {HYBRIDLAB_VERSION} (plugin 'rmsnorm') "
        "and by aaa-plugins 1.0 (plugin 'my_rmsnorm')")
    assert by_name["rmsnorm"].ok
    assert registry.kind("normalization", "rmsnorm").owner.package == "hybridlab"
    assert [r.package for r in registry.plugins][-1] == "aaa-plugins"


def test_entry_points_clash_between_third_parties_blames_the_later_package(site):
    (site / "hltest_first.py").write_text(TOY_MODULE.format(cls="SpinConfig", kind="spin", category="mixer"))
    (site / "hltest_second.py").write_text(TOY_MODULE.format(cls="SpinConfig", kind="spin", category="mixer"))
    _dist(site, "zzz-plugins", "3.0", "hybridlab_test_group", {"spin_z": "hltest_second"})
    _dist(site, "mmm-plugins", "2.0", "hybridlab_test_group", {"spin_m": "hltest_first"})
    registry = load_registry(group="hybridlab_test_group")
    by_name = {r.name: r for r in registry.plugins}
    assert by_name["spin_m"].ok
    assert by_name["spin_z"].error == ("mixer kind 'spin' is registered twice: by mmm-plugins 2.0 (plugin 'spin_m') "
                                       "and by zzz-plugins 3.0 (plugin 'spin_z')")


# ---------------------------------------------------------------- third-party kinds inside specs


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def toy_registry():
    """The built-ins (through entry points) plus the in-memory third-party toy plugin."""
    registry = load_registry([("acme", toy_plugin())])
    assert all(r.ok for r in registry.plugins)
    return registry


def test_third_party_kind_validates_in_a_spec(tmp_path, monkeypatch, toy_registry):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.yaml", """
        vocab_size: 64
        d_model: 64
        defaults:
          mixer: {kind: toy, gate: {kind: layernorm, eps: 0.01}}
        layers:
          - mixer: {width: 4}
          - mixer: {kind: toy, width: 8, gate: {kind: rmsnorm}, inner: {kind: mlp, hidden: 16}}
          - mixer: {kind: attention, heads: 4, position: {kind: wave}}
    """)
    spec = load_model_spec("m.yaml", registry=toy_registry)
    first, second, third = (b.mixer for b in spec.layers)
    assert isinstance(first, ToyMixerConfig) and isinstance(second, ToyMixerConfig)
    assert (first.width, first.gate.kind, first.gate.eps, first.inner) == (4, "layernorm", 0.01, None)
    # a different gate kind replaces the defaults' gate instead of merging eps into it
    assert (second.width, second.gate.kind, second.gate.eps) == (8, "rmsnorm", 1e-6)
    assert (second.inner.kind, second.inner.hidden) == ("mlp", 16)
    assert isinstance(third.position, WaveConfig)
    # round trip through the resolved YAML with the same registry
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_spec(spec))
    assert load_model_spec(out, registry=toy_registry) == spec


def test_third_party_kind_errors_in_a_spec(tmp_path, monkeypatch, toy_registry):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.yaml", """
        vocab_size: 64
        d_model: 64
        layers:
          - mixer: {kind: toy, widht: 4}
          - mixer: {kind: toy, width: 0}
          - mixer:
              kind: toy
              gate: {kind: rmsnrm}
          - mixer:
              kind: toy
              gate: {kind: rmsnorm, epss: 1}
              inner: {kind: swiglu, hidden: 0}
          - mixer: {kind: tyo}
    """)
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml", registry=toy_registry)
    got = {(p.line, p.path): p.message for p in info.value.problems}
    assert set(got) == {(4, "layers[0].mixer.widht"), (5, "layers[1].mixer.width"), (8, "layers[2].mixer.gate"),
                        (11, "layers[3].mixer.gate.epss"), (12, "layers[3].mixer.inner.hidden"),
                        (13, "layers[4].mixer")}
    assert got[(4, "layers[0].mixer.widht")] == (
        "unknown field 'widht' (did you mean 'width'?); allowed: kind, width, gate, inner")
    assert "greater than or equal to 1, got 0" in got[(5, "layers[1].mixer.width")]
    assert got[(8, "layers[2].mixer.gate")] == (
        "unknown normalization kind 'rmsnrm' (did you mean 'rmsnorm'?); registered normalization kinds: "
        "layernorm (hybridlab), none (hybridlab), rmsnorm (hybridlab)")
    assert got[(11, "layers[3].mixer.gate.epss")].startswith("unknown field 'epss' (did you mean 'eps'?)")
    assert "greater than or equal to 1, got 0" in got[(12, "layers[3].mixer.inner.hidden")]
    assert got[(13, "layers[4].mixer")].startswith(
        "unknown mixer kind 'tyo' (did you mean 'toy'?); registered mixer kinds: attention (hybridlab), ")
    assert got[(13, "layers[4].mixer")].endswith(", toy (acme)")
    assert all(p.file == "m.yaml" for p in info.value.problems)


def test_third_party_check_runs_with_dims(tmp_path, monkeypatch, toy_registry):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.yaml", """
        vocab_size: 64
        d_model: 48
        layers:
          - repeat: 2
            blocks:
              - mixer: {kind: toy, width: 5}
              - mixer: {kind: toy, width: 6}
    """)
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml", registry=toy_registry)
    assert [str(p) for p in info.value.problems] == [
        "m.yaml:6: layers[0].blocks[0].mixer.width: must divide d_model (48), got 5"]


def test_third_party_kind_is_unknown_to_a_registry_without_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.yaml", "vocab_size: 64\nd_model: 64\nlayers:\n  - mixer: {kind: toy}\n")
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml")  # the default registry: built-ins only
    [problem] = [str(p) for p in info.value.problems]
    assert problem.startswith("m.yaml:4: layers[0].mixer: unknown mixer kind 'toy'; registered mixer kinds: "
                              "attention (hybridlab), ")
    assert "(acme)" not in problem


def test_spec_with_a_plugin_category_component(tmp_path, monkeypatch):
    # a third-party plugin opens a category and a kind whose config nests it
    class PickerConfig(Config):
        kind: Literal["picker"] = "picker"
        sampler: Component("sampler")

    def fn(register):
        register.category("sampler", "picks the next token")
        register.kind("sampler", "greedy", config=GreedyConfig, module=module)
        register.kind("mixer", "picker", config=PickerConfig, module=module)

    registry = load_registry([("acme", plugin(fn))])
    assert record(registry, "acme").ok
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "m.yaml", """
        vocab_size: 64
        d_model: 64
        layers:
          - mixer: {kind: picker, sampler: {kind: greedy}}
          - mixer: {kind: picker, sampler: {kind: gredy}}
          - mixer: {kind: picker}
    """)
    with pytest.raises(SpecError) as info:
        load_model_spec("m.yaml", registry=registry)
    assert [str(p) for p in info.value.problems] == [
        "m.yaml:5: layers[1].mixer.sampler: unknown sampler kind 'gredy' (did you mean 'greedy'?); "
        "registered sampler kinds: greedy (acme)",
        "m.yaml:6: layers[2].mixer.sampler: required field is missing",
    ]


def test_plugin_code_that_crashes_on_a_spec_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A config validator raising TypeError, a check() raising and a module constructor
    raising gave tracebacks from validate and summary."""
    from pydantic import field_validator

    from hybridlab.core.cli import main
    from hybridlab.core.config import Config

    class CrashConfig(Config):
        kind: Literal["crashy"] = "crashy"
        width: int = 4
        """Width."""
        where: str = "none"
        """Which part crashes."""

        @field_validator("width")
        @classmethod
        def _width(cls, value):
            if value == 13:
                raise TypeError("validator bug")
            return value

        def check(self, dims):
            if self.where == "check":
                raise KeyError("check bug")
            return ()

    def crashy_module(config, dims):
        if config.where == "init":
            raise RuntimeError("constructor bug")
        return torch.nn.Identity()

    def fn(register):
        register.kind("ffn", "crashy", config=CrashConfig, module=crashy_module)

    registry = load_registry([("crashy", plugin(fn))])
    monkeypatch.setattr("hybridlab.core.cli._registry", lambda: registry)
    monkeypatch.setattr("hybridlab.registry.default_registry", lambda: registry)
    for text, command, message in [
        ("width: 13", "validate", "m.yaml: validating raised TypeError: validator bug"),
        ("where: check", "validate", "m.yaml:4: layers[0].ffn: its check() raised KeyError: 'check bug'"),
        ("where: init", "summary", "building ffn kind 'crashy' in layer 0 raised RuntimeError: constructor bug"),
    ]:
        (tmp_path / "m.yaml").write_text("vocab_size: 16\nd_model: 8\nlayers:\n"
                                         f"  - {{mixer: {{kind: attention, heads: 2}}, ffn: {{kind: crashy, {text}}}}}\n")
        assert main([command, str(tmp_path / "m.yaml")]) == 2, command
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_impl_options_may_be_any_iterable_even_a_generator():
    def fn(register):
        register.kind("mixer", "other", config=OtherConfig, module=module)
        register.impl("mixer", "other", "reference", fn=reference, devices=(d for d in ["cpu"]),
                      dtypes=(t for t in [torch.float32]))

    registry = fresh(("gen", plugin(fn)))
    [impl] = registry.impls("mixer", "other")
    assert (impl.devices, impl.dtypes) == (frozenset({"cpu"}), frozenset({torch.float32}))
