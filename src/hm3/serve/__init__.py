"""Serving a merged model over HTTP: the app (`app`), dynamic batching (`batching`), length-sorted
sub-batches (`buckets`), the guard-rail policy (`policy`), the playground page (`page`), the
process (`server`) and the same app on Ray Serve (`ray_app`, needs the `ray` extra).
Needs the `serve` extra: `pip install 'hm3[serve]'`."""
