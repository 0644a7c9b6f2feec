"""The template: a toy engine (engine.py), its thaw adapter (adapter.py) and its conformance driver (driver.py).

Copy these three files to start a new engine's adapter; `thaw-conformance --engine template` passes them.
"""
