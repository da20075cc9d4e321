"""The untrusted side: tool workers and (from the isolation work on) their sandboxes.

Nothing here imports ``runtime.trusted``: this side is assumed compromised, and it holds no
key but the one that checks dispatches addressed to it.
"""
