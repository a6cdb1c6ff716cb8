"""`pam-jax serve`: a web page and a JSON API over a loaded PAM (see `app.py` for the routes).

engine.py  the model: images encoded once and cached, masks, batched streamed descriptions
stream.py  chunked jitted generation (prefill, then decode calls of N tokens each)
worker.py  the one model thread behind a bounded queue; concurrent regions batched
media.py   uploads checked by content and decoded in memory; limits
app.py     the Starlette routes; static/index.html the page
cli.py     the command
"""
