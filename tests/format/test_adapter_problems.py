"""adapter_problems: what keeps a class from being a contract adapter, named before any engine runs."""

from thaw_format.sdk import CAPABILITIES, CAPABILITY_METHODS, CORE_METHODS, adapter_problems


def _adapter(capabilities=frozenset(), skip=(), **attributes) -> type:
    """A class with every contract method (but `skip`) and the given capabilities."""
    methods = {m: (lambda self, *a, **k: None) for m in CORE_METHODS + sum(CAPABILITY_METHODS.values(), ())
               if m not in skip}
    return type("Mine", (), {"name": "mine", "capabilities": classmethod(lambda cls: capabilities), **methods,
                             **attributes})


def test_a_complete_adapter_has_no_problems():
    assert adapter_problems(_adapter(frozenset(CAPABILITIES))) == []


def test_a_misspelt_capability_is_named_with_the_known_ones():
    (problem,) = adapter_problems(_adapter(frozenset({"seeded", "fork-processes"})))
    assert problem == f"Mine.capabilities() names unknown 'fork-processes'; known: {', '.join(CAPABILITIES)}"


def test_capabilities_must_be_a_classmethod_returning_a_frozenset():
    needs_instance = _adapter(capabilities=None)
    needs_instance.capabilities = lambda self: frozenset()
    assert adapter_problems(needs_instance)[0].startswith(
        "Mine.capabilities() must be a classmethod readable without an instance: TypeError")
    assert adapter_problems(_adapter({"seeded"})) == ["Mine.capabilities() returned set, not a frozenset"]


def test_a_method_a_declared_capability_needs_is_named():
    assert adapter_problems(_adapter(frozenset({"streaming"}), skip=("progress",))) == [
        "Mine has no method progress() (needed by 'streaming')"]
    assert adapter_problems(_adapter(frozenset(), skip=("progress", "launch_spec"))) == []  # not declared
    assert adapter_problems(_adapter(frozenset(), skip=("check",))) == [
        "Mine has no method check() (needed by the core)"]


def test_the_name_must_be_a_non_empty_str():
    assert adapter_problems(_adapter(name="")) == ["Mine.name must be the engine's name as a non-empty str, not ''"]
