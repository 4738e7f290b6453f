"""Training stages, one module each (`qatune.plugins.PLUGINS["stage"]`); `base` says what a stage declares."""
