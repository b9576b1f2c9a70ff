"""``dmc serve``: an OpenAI-compatible server over one shared compressed cache under a KV budget (engine.py: the
continuous-batching loop; app.py: the HTTP API; cli.py: the command), and ``dmc bench-serve`` (benchmark.py)."""
