"""An example hybridlab plugin package: normalization ``scalenorm`` and mixer ``shift``.

Nothing here is imported by hybridlab directly: each plugin file is named by an entry
point in the group ``hybridlab`` (see pyproject.toml) and registers itself through its
``hybridlab_register`` hook.
"""

__version__ = "0.1.0"
