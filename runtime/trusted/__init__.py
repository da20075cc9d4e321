"""The trusted computing base: capability tokens, policies, quotas, audit, the supervisor.

Nothing here imports Ray, and nothing here runs model-written code. Every module keeps one
invariant, stated in its docstring, and every error path denies.
"""
