"""The package's one compiled part, ``runtime._hmac`` (native/hmac.c): HMAC-SHA256 for the authorization
hot path. Everything else is in pyproject.toml. Optional: where it cannot be built (no C compiler or OpenSSL
headers) the install goes on and ``runtime.trusted.capability`` uses its pure-Python reference instead."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime._hmac", ["native/hmac.c"], libraries=["crypto"], optional=True)])
