"""The attack catalogue of ``warden redteam``: scenario files, the per-agent policies they run
under, the scripted agent that plays each adversarial model, and the small office world
(mail, bank, documents, web, vault, tickets, chat) whose tools the scenarios use.

Like ``agents/``, this folder is imported by module name from the project directory (the
workers of a job import it from there too); it is not installed as a package.
"""
