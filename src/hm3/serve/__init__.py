"""Serving a merged model over HTTP: the app (`app`), dynamic batching (`batching`), the guard-rail
policy (`policy`), the playground page (`page`), the process (`server`) and a Ray Serve
deployment (`ray_app`, optional). Needs the `serve` extra: `pip install 'hm3[serve]'`."""
