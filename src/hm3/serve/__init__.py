"""Serving a merged model over HTTP: the app (`app`), dynamic batching (`batching`), the guard-rail
policy (`policy`), the playground page (`page`) and the process (`server`).
Needs the `serve` extra: `pip install 'hm3[serve]'`."""
