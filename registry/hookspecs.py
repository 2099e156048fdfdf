"""The hooks a hybridlab plugin may implement.

A plugin is any importable object (usually a module) named by an entry point in the
group ``hybridlab``. Each hook below is a function with a docstring-only body; the
plugin implements it as a function of the same name marked with
``hybridlab.registry.hookimpl``. Implementations may accept a subset of the arguments,
so hooks can gain arguments later without breaking old plugins.
"""

import pluggy

hookspec = pluggy.HookspecMarker("hybridlab")
hookimpl = pluggy.HookimplMarker("hybridlab")


@hookspec
def hybridlab_register(register):
    """Declare this plugin's categories, kinds and implementations.

    When: once per plugin, at start-up, the first time anything asks for the registry
    (a CLI command, ``hybridlab.build_model``, ``hybridlab.load_spec``...).

    ``register`` is a :class:`hybridlab.registry.Register` bound to this plugin: it
    records which package made each call, so a clash names both packages. Call

    - ``register.category(name, doc)`` to open a new category (optional; the core's
      categories exist already),
    - ``register.kind(category, name, config=ConfigModel, module=ModuleClass)`` once per
      kind: ``ConfigModel`` is a pydantic model with ``extra="forbid"`` whose field
      ``kind`` is ``Literal[name]``; ``ModuleClass(config, dims, ...)`` builds it (the
      arguments after ``config`` depend on the category: docs/plugins.md, section 3),
    - ``register.impl(category, kind, name, fn=..., devices=..., dtypes=...)`` for each
      implementation of a kind's core op (exactly one named ``reference``),
    - ``register.skip(reason)``, before anything else, to register nothing on purpose
      (an optional dependency is missing): ``hybridlab plugins`` shows the reason.

    Return nothing. Everything the plugin registers is committed together: if any call
    raises, the whole plugin is reported (``hybridlab plugins``) and skipped.

    Example::

        from hybridlab.registry import hookimpl

        @hookimpl
        def hybridlab_register(register):
            register.kind("normalization", "scalenorm", config=ScaleNormConfig,
                          module=ScaleNorm)
    """
