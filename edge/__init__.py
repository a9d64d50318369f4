"""The web edge: ASGI middleware that every request passes before Gradio or the /v1 API.

Each module does one job: origin.py (CORS, cross-site refusals, cookies, security headers),
body.py (request size and idle limits), sessions.py (sign-in, lockout, session lifetimes,
default deny), files.py (who may send and read which file).
"""
