"""`prefalign serve`: an OpenAI-compatible server for local models and LoRA runs, batched.

models.py   the served models (base weights once; adapters on them)
jobs.py     a request as the engine sees it: rows, its own seeded sampler, stop rules
engine.py   the scheduler thread: continuous batching with the KV cache
responses.py, schemas.py, api.py   OpenAI's request and response shapes, the routes, auth and limits
host.py     which addresses bind without a key (loopback); server.py: load, start the engine, run uvicorn
"""
