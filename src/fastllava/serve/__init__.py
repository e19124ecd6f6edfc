"""An OpenAI-compatible HTTP server: `fastllava serve`.

protocol.py parses and checks chat requests, content.py turns image URLs into images,
scheduler.py batches the requests of many clients into one prefill/decode loop (continuous
batching over a StaticKVCache), app.py is the ASGI app (routes, auth, SSE), command.py the CLI.
"""
