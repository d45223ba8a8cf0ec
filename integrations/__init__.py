"""Framework adapters (installed as gsa_rag.integrations): thin wrappers over GistEngine."""
