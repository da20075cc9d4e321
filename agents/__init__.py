"""Example agent classes and tools used by the example jobs in ``jobs/``.

Imported by module name from the project directory; not installed as a package (the name
``agents`` is taken by another SDK on PyPI).
"""
